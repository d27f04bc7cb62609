"""Values the schema accepts but a run almost never wants: each with the reason, to warn about.

The schema refuses what cannot work (a negative learning rate); this catches what can run and is
still very likely a slip (a learning rate of 5, a batch larger than the data). The wizard shows
each warning beside its field and ``spkft train`` prints them before training; neither refuses.
"""

from __future__ import annotations

from spkft.core.train.config import TrainConfig
from spkft.core.train.memory import BatchSuggestion

# The learning rate 3D-Speaker trains ERes2NetV2 from scratch with (SGD, large batches).
UPSTREAM_LR = 0.2
# AdamW runs of this model (spkft's recipes: 1e-3 fine-tuning, 2e-3 from scratch) diverge far above these.
ADAMW_HIGHEST = 1e-2
LOWEST_LR = 1e-6


def implausible(config: TrainConfig, training_recordings: int | None = None,
                memory: BatchSuggestion | None = None) -> dict[str, str]:
    """Warnings by config key (``optim.lr``, ``run.batch_size``) for values that are very likely mistakes.

    ``training_recordings`` (after held-out speakers) and ``memory`` (the measured cost of a crop)
    enable the checks of the batch size against the data and the device.
    """
    warnings = {}
    lr, optimizer = config.optim.lr, config.optim.optimizer
    pretrained = config.model.init is not None
    if optimizer == "adamw" and lr > ADAMW_HIGHEST:
        warnings["optim.lr"] = (f"{lr:g} is far above AdamW's usual range for this model (1e-4 to 2e-3; spkft's "
                                f"recipes use 1e-3): the loss will most likely diverge")
    elif optimizer == "sgd" and pretrained and lr > UPSTREAM_LR / 10:
        warnings["optim.lr"] = (f"{lr:g} is above 1/10 of the {UPSTREAM_LR:g} ERes2NetV2 is trained from scratch "
                                "with: fine-tuning that fast erases what the checkpoint knows")
    elif optimizer == "sgd" and lr > 5 * UPSTREAM_LR:
        warnings["optim.lr"] = (f"{lr:g} is over 5 times the {UPSTREAM_LR:g} ERes2NetV2 is trained from scratch "
                                "with: the loss will most likely diverge")
    elif lr < LOWEST_LR:
        warnings["optim.lr"] = f"{lr:g} is so small that the weights will barely move in {config.run.epochs} epochs"
    batch = config.run.batch_size
    if training_recordings is not None and batch > training_recordings:
        warnings["run.batch_size"] = (f"{batch} crops per step from {training_recordings} training recordings: "
                                      "every step repeats recordings and an epoch is a single step; "
                                      f"{data_batch(training_recordings)} fits the data")
    elif memory is not None and memory.state_bytes + batch * memory.bytes_per_crop > memory.free_bytes:
        need = (memory.state_bytes + batch * memory.bytes_per_crop) / 2**30
        warnings["run.batch_size"] = (f"{batch} crops need about {need:.1f} GiB and {memory.free_bytes / 2**30:.1f} "
                                      "GiB is free: expect to run out of memory")
    return warnings


def data_batch(training_recordings: int) -> int:
    """The largest power of two of crops that leaves at least 4 steps per pass over the recordings."""
    batch = 2
    while batch * 2 <= training_recordings // 4:
        batch *= 2
    return batch
