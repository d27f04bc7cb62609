"""Checkpoint averaging: one model whose weights are the mean of several checkpoints of the same network.

Averaging the last (or the best) epochs of a run gives a model that usually verifies a little
better and varies less from run to run than any single epoch; speaker-verification toolkits
such as WeSpeaker average before they release a model. The average is an ordinary spkft
checkpoint, so everything that takes a checkpoint (eval, embed, export, serve) takes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

from spkft.core.checkpoint import (
    SPKFT_FORMAT,
    describe_mismatch,
    embedding_checkpoint,
    embedding_state_dict,
    model_from_checkpoint,
    read_checkpoint,
)
from spkft.core.errors import CheckpointError

CheckpointSource = Union[str, Path, Mapping[str, Any]]


def average_checkpoints(sources: Sequence[CheckpointSource]) -> dict[str, Any]:
    """An spkft checkpoint whose embedding-model weights are the elementwise mean of ``sources``'.

    ``sources`` are checkpoint files (3D-Speaker's plain state_dicts or spkft checkpoints) or
    checkpoints already read, at least two, all of one architecture: the same keys with the same
    shapes, or the error names the file and the keys that differ. Every floating tensor is summed
    in float64, divided by the count and cast back to its dtype; BatchNorm's ``running_mean`` and
    ``running_var`` are averaged like the weights, as WeSpeaker's ``average_model.py`` averages
    every entry of the state_dict. Integer buffers (BatchNorm's ``num_batches_tracked``) are not
    quantities to average and are taken from the last source.

    Only the embedding model is averaged: classifier heads, optimiser state and evaluations
    describe single checkpoints and are left out. A checkpoint carrying a backend adaptation is
    refused, since the adaptation was fitted to that checkpoint's embeddings alone. The result
    records what it averages under ``averaged``: ``checkpoints`` (the files, or ``checkpoint N``
    for one given in memory) and, when every source records its epoch, ``epochs``.
    """
    if len(sources) < 2:
        raise CheckpointError(f"averaging needs at least two checkpoints, got {len(sources)}")
    names = [str(s) if isinstance(s, (str, Path)) else f"checkpoint {i + 1}" for i, s in enumerate(sources)]
    checkpoints = [read_checkpoint(s) if isinstance(s, (str, Path)) else dict(s) for s in sources]
    for name, checkpoint in zip(names, checkpoints):
        if checkpoint.get("format") == SPKFT_FORMAT and checkpoint.get("adaptation") is not None:
            raise CheckpointError(f"{name}: carries a backend adaptation fitted to its own weights; average "
                                  "checkpoints without one, then fit an adaptation to the average (spkft adapt)")
    first = model_from_checkpoint(checkpoints[0], names[0])
    states = [first.model.state_dict()]
    for name, checkpoint in zip(names[1:], checkpoints[1:]):
        try:
            state = embedding_state_dict(checkpoint)
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
        problem = describe_mismatch(first.model, state)
        if problem:
            raise CheckpointError(f"{name}: not the same network as {names[0]}, cannot average them ({problem})")
        states.append(state)
    averaged = {}
    for key, tensor in states[0].items():
        if tensor.is_floating_point():
            total = sum(state[key].to(torch.float64) for state in states)
            averaged[key] = (total / len(states)).to(tensor.dtype)
        else:
            averaged[key] = states[-1][key].clone()
    first.model.load_state_dict(averaged)
    record: dict[str, Any] = {"checkpoints": names}
    epochs = [c.get("epoch") if c.get("format") == SPKFT_FORMAT else None for c in checkpoints]
    if all(isinstance(e, int) for e in epochs):
        record["epochs"] = epochs
    return embedding_checkpoint(first.model, first.variant, averaged=record)
