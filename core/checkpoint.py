"""Loading ERes2NetV2 weights: upstream's released files and spkft's own checkpoints.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never arbitrary pickled objects. Accepted layouts:
- upstream's plain ``state_dict`` (``pretrained_eres2netv2w24s4ep4.ckpt``), with or without the
  ``module.`` prefix that DataParallel/DDP training leaves on every key;
- an spkft checkpoint: a dict with ``format == "spkft"``, the variant, the model arguments and the
  embedding-model weights under ``model`` (training adds head, optimiser and progress state;
  ``spkft adapt`` adds a backend adaptation under ``adaptation``, see
  :meth:`~spkft.core.adaptation.Adaptation.to_dict`, or a PLDA scorer under ``plda``, see
  :meth:`~spkft.core.plda.Plda.to_dict`; ``spkft calibrate`` adds ``calibration``, see
  :meth:`~spkft.core.calibration.Calibration.to_dict`).

When the caller names no variant, the architecture is read off the tensor shapes.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from spkft.core.adaptation import AdaptedModel, Adaptation
from spkft.core.calibration import Calibration
from spkft.core.catalogue import CATALOGUE, resolve_checkpoint
from spkft.core.errors import CheckpointError, first_line
from spkft.core.model import VARIANTS, ERes2NetV2, ERes2NetV2Config, model_config
from spkft.core.plda import Plda, score_kind

SPKFT_FORMAT = "spkft"
SPKFT_FORMAT_VERSION = 1
# Constructor arguments that size a network rather than choose its block design.
SIZE_ARGS = ("num_blocks", "m_channels", "feat_dim", "embedding_size", "two_emb_layer")


@dataclass(frozen=True)
class LoadedModel:
    """An eval-mode model plus where it came from.

    ``model`` is always the bare network (for training, state_dicts and 3D-Speaker's format);
    embeddings for users come from :attr:`inference_model`, which adds the checkpoint's
    adaptation when it carries one.
    """

    model: ERes2NetV2
    variant: str
    config: ERes2NetV2Config
    checkpoint: dict[str, Any]  # the whole file as read (metadata of spkft checkpoints lives here)
    adaptation: Adaptation | None = None
    plda: Plda | None = None  # the PLDA scorer it carries: trials are scored by its LLR, not the cosine
    calibration: Calibration | None = None  # the map from its scores to calibrated LLRs

    @property
    def score_kind(self) -> str:
        """What its scores are: ``plda`` log-likelihood ratios or ``cosine`` similarities."""
        return score_kind(self.plda)

    @property
    def inference_model(self) -> ERes2NetV2 | AdaptedModel:
        """The module whose output users get as the embedding: the model behind its adaptation, if any."""
        if self.adaptation is None:
            return self.model
        device = next(self.model.parameters()).device
        return AdaptedModel(self.model, self.adaptation).to(device).eval()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely; errors say what is wrong with the file.

    ``path`` may also name a released model (:mod:`spkft.core.catalogue`), fetched on first use.
    """
    path = resolve_checkpoint(path)
    if path.is_dir():
        best = path / "best.ckpt"
        hint = f"; a run folder's best checkpoint is {best}" if best.is_file() else ""
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        names = "" if path.suffix or len(path.parts) > 1 else f" (released models by name: {', '.join(CATALOGUE)})"
        raise CheckpointError(f"{path}: no such checkpoint file{names}")
    if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: [^\s]+ [^\s]+", str(exc))
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers"
            + (f" ({found.group(0)})" if found else "")
        ) from None
    except Exception as exc:  # torch raises many types for damaged archives
        raise CheckpointError(f"{path}: damaged or not a PyTorch checkpoint ({first_line(exc)})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state_dict or an spkft checkpoint, found {type(obj).__name__}")
    return dict(obj)


def _is_legacy_torch_file(path: Path) -> bool:
    """Pre-1.6 ``torch.save`` files are a bare pickle stream (protocol 2 starts with 0x80 0x02)."""
    with path.open("rb") as handle:
        return handle.read(2) == b"\x80\x02"


def embedding_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The embedding model's weights from any accepted layout, without wrapper prefixes."""
    if checkpoint.get("format") == SPKFT_FORMAT:
        state = checkpoint.get("model")
        if not isinstance(state, Mapping):
            raise CheckpointError("spkft checkpoint has no 'model' weights")
    else:
        state = checkpoint
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) != len(state):
        others = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(
            "not an ERes2NetV2 state_dict"
            + (f": non-tensor entries {', '.join(map(str, others))}" if others else ": no tensors")
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        # A diverged or corrupted model would embed everything as NaN, which no caller can use.
        raise CheckpointError(f"the weights hold NaN or infinite values ({len(broken)} tensor(s), first "
                              f"{', '.join(broken[:3])}); use an earlier checkpoint of the run")
    return tensors


def infer_config(state: Mapping[str, torch.Tensor]) -> tuple[str, ERes2NetV2Config]:
    """Read the variant and constructor arguments off the tensor shapes of a state_dict."""
    try:
        m_channels = state["conv1.weight"].shape[0]
        stage_blocks = []
        for stage in range(1, 5):
            indices = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
            stage_blocks.append(len(indices))
        scale = sum(1 for k in state if re.fullmatch(r"layer1\.0\.convs\.\d+\.weight", k))
        expansion = state["layer1.0.conv3.weight"].shape[0] // m_channels
        embedding_size = state["seg_1.weight"].shape[0]
        stats_per_frequency = m_channels * 8 * expansion * 2
        feat_dim_over_8 = state["seg_1.weight"].shape[1] // stats_per_frequency
        # width = floor(planes * baseWidth / 64); layer4 (planes = 8 * m_channels) pins it down best.
        width4 = state["layer4.0.convs.0.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not an ERes2NetV2 state_dict: missing key {exc.args[0]!r}") from None
    if min(stage_blocks) == 0 or scale == 0 or expansion == 0:
        raise CheckpointError("not an ERes2NetV2 state_dict: a stage or its sub-band convs are missing")
    planes4 = 8 * m_channels
    widths = [w for w in range(1, 257) if planes4 * w // 64 == width4]
    variant = next(
        (name for name, cfg in VARIANTS.items()
         if cfg.scale == scale and cfg.expansion == expansion and cfg.baseWidth in widths),
        None,
    )
    if variant is None:
        variant = next((n for n, c in VARIANTS.items() if c.scale == scale), "eres2netv2")
    base_width = VARIANTS[variant].baseWidth if VARIANTS[variant].baseWidth in widths else widths[0]
    # fbank bins are a multiple of 8 in every known recipe; 80 unless the shapes say otherwise.
    feat_dim = 80 if feat_dim_over_8 == 10 else 8 * feat_dim_over_8
    config = model_config(
        variant,
        num_blocks=tuple(stage_blocks),
        m_channels=m_channels,
        feat_dim=feat_dim,
        embedding_size=embedding_size,
        baseWidth=base_width,
        scale=scale,
        expansion=expansion,
        two_emb_layer="seg_2.weight" in state,
    )
    return variant, config


def describe_mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """A message naming missing, unexpected and wrongly shaped keys, or None if all fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shaped = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shaped)):
        if keys:
            shown = "; ".join(keys[:4]) + (f"; ... ({len(keys)} in all)" if len(keys) > 4 else "")
            parts.append(f"{label}: {shown}")
    return " | ".join(parts) or None


def check_layout(path: str | Path, variant: str, args: Mapping[str, Any] | None = None) -> None:
    """Raise unless the file's weights load strictly into ``variant`` built with ``args``: every key, every shape."""
    try:
        state = embedding_state_dict(read_checkpoint(path))
    except CheckpointError as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None
    model = ERes2NetV2(model_config(variant, **dict(args or {})))
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{path}: not ERes2NetV2 variant {variant!r} as released ({problem})")
    model.load_state_dict(state, strict=True)


def _described_config(checkpoint: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> tuple[str, ERes2NetV2Config]:
    """The variant and config a checkpoint declares (spkft) or its shapes imply (upstream)."""
    if checkpoint.get("format") != SPKFT_FORMAT:
        return infer_config(state)
    variant = str(checkpoint.get("variant"))
    try:
        return variant, model_config(variant, **checkpoint.get("model_args", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"spkft checkpoint with a bad model description: {exc}") from None


def load_model(
    path: str | Path,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> LoadedModel:
    """Load an embedding model from a checkpoint, in eval mode, on ``device``.

    ``variant`` and ``overrides`` (constructor arguments) are inferred from the file when absent;
    when given, they must match the file's tensors, or the error names the keys that do not.
    """
    return model_from_checkpoint(read_checkpoint(path), path, variant, device, **overrides)


def model_from_checkpoint(
    checkpoint: Mapping[str, Any],
    source: str | Path,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> LoadedModel:
    """:func:`load_model` for a checkpoint already in memory (such as an average); ``source`` names it in errors."""
    checkpoint = dict(checkpoint)
    try:
        state = embedding_state_dict(checkpoint)
        found_variant, found = _described_config(checkpoint, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if variant is None:
        variant, args = found_variant, found.to_dict()
    else:
        # A named variant fixes the block design; sizes still come from the file.
        args = {k: v for k, v in found.to_dict().items() if k in SIZE_ARGS}
    try:
        config = model_config(variant, **(args | overrides))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    model = ERes2NetV2(config)
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{source}: does not fit ERes2NetV2 variant {variant!r} ({problem})")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    plda, calibration = _scoring(source, checkpoint, config)
    return LoadedModel(model=model, variant=variant, config=config, checkpoint=checkpoint,
                       adaptation=_adaptation(source, checkpoint, config), plda=plda, calibration=calibration)


def output_for(checkpoint: Path, loaded: LoadedModel, output: str | Path | None, holds: str) -> Path:
    """Where a checkpoint that gains ``holds`` (``a PLDA``, ...) is written: ``output``, else the
    checkpoint itself, which only an spkft checkpoint can be (a 3D-Speaker state_dict holds weights alone)."""
    if output is not None:
        return Path(output)
    if loaded.checkpoint.get("format") != SPKFT_FORMAT:
        raise CheckpointError(f"{checkpoint} is a 3D-Speaker state_dict, which cannot hold {holds}; "
                              "give an output file for the spkft checkpoint")
    return checkpoint


def with_entries(loaded: LoadedModel, entries: Mapping[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint as read, less ``drop``, with ``entries``; a 3D-Speaker state_dict becomes an spkft
    checkpoint of its weights and ``entries``."""
    if loaded.checkpoint.get("format") != SPKFT_FORMAT:
        return embedding_checkpoint(loaded.model, loaded.variant, **entries)
    return {k: v for k, v in loaded.checkpoint.items() if k not in drop} | dict(entries)


def _scoring(path: str | Path, checkpoint: Mapping[str, Any], config: ERes2NetV2Config
             ) -> tuple[Plda | None, Calibration | None]:
    """The PLDA scorer and the calibration an spkft checkpoint carries, checked against the model."""
    if checkpoint.get("format") != SPKFT_FORMAT:
        return None, None
    found = []
    for key, kind in (("plda", Plda), ("calibration", Calibration)):
        record = checkpoint.get(key)
        if record is None:
            found.append(None)
            continue
        if not isinstance(record, Mapping):
            raise CheckpointError(f"{path}: malformed {key} record (a {type(record).__name__})")
        try:
            found.append(kind.from_dict(record))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    plda, calibration = found
    if plda is not None and plda.input_dim != config.embedding_size:
        raise CheckpointError(f"{path}: its PLDA is for {plda.input_dim}-dim embeddings; "
                              f"the model makes {config.embedding_size}-dim ones")
    if calibration is not None and calibration.scores != score_kind(plda):
        raise CheckpointError(f"{path}: its calibration maps {calibration.scores} scores, but the model is scored "
                              f"by {'cosine' if plda is None else 'PLDA'}; calibrate it again (spkft calibrate)")
    return plda, calibration


def _adaptation(path: str | Path, checkpoint: Mapping[str, Any], config: ERes2NetV2Config) -> Adaptation | None:
    """The adaptation an spkft checkpoint carries, checked against the model's embedding size."""
    record = checkpoint.get("adaptation") if checkpoint.get("format") == SPKFT_FORMAT else None
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{path}: malformed adaptation record (a {type(record).__name__})")
    try:
        adaptation = Adaptation.from_dict(record)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if adaptation.dim != config.embedding_size:
        raise CheckpointError(f"{path}: its adaptation is for {adaptation.dim}-dim embeddings; "
                              f"the model makes {config.embedding_size}-dim ones")
    return adaptation


def embedding_checkpoint(model: ERes2NetV2, variant: str, **extra: Any) -> dict[str, Any]:
    """An spkft checkpoint dict for an embedding model; ``extra`` adds training state."""
    return {
        "format": SPKFT_FORMAT,
        "format_version": SPKFT_FORMAT_VERSION,
        "variant": variant,
        "model_args": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
