"""Exporting a checkpoint: to ONNX (with metadata and a parity check) or to 3D-Speaker's own format.

ONNX: one input ``feature`` float32 ``[batch, frames, 80]`` (mean-normalised fbank), one output
``embedding`` float32 ``[batch, dim]`` (not normalised), batch and frames dynamic. The model is
traced by ``torch.onnx.export(dynamo=False)``: the network has no data-dependent control flow, and
the dynamo exporter takes far longer for the same graph. The file's custom metadata (all strings):

- read by sherpa-onnx, so the file runs there unchanged as a 3D-Speaker model: ``framework``
  (``3d-speaker``), ``sample_rate`` (``16000``), ``output_dim``, ``normalize_samples`` (``1``:
  samples in [-1, 1]), ``feature_normalize_type`` (``global-mean``), ``language`` (free text);
- spkft's own: ``spkft_version``, ``spkft_variant``, ``spkft_model_args`` (JSON of the
  constructor arguments), ``spkft_epoch`` (when the checkpoint records one);
- when a threshold is known: ``spkft_threshold``, the decision threshold served by default, and
  ``spkft_threshold_source`` (``eer`` when it is the evaluation's EER threshold, ``given`` when
  it was passed to the export);
- when the checkpoint carries an evaluation (training stores the validation result of the
  checkpoint's epoch): ``spkft_eer``, ``spkft_eer_threshold``, ``spkft_min_dcf``,
  ``spkft_min_dcf_threshold``, ``spkft_min_dcf_p_target``, ``spkft_threshold_at_far_<far>``,
  ``spkft_trials``, ``spkft_target_trials``, ``spkft_evaluation_data`` (e.g. ``validation``);
- when the checkpoint carries a backend adaptation (``spkft adapt``, :mod:`spkft.core.adaptation`):
  ``spkft_adaptation`` (``center``, ``whiten`` or ``wccn``), ``spkft_adaptation_recordings``,
  ``spkft_adaptation_speakers`` (when it was fitted with labels), ``spkft_adaptation_shrinkage``
  and ``spkft_adaptation_source``;
- in an int8 file only: ``spkft_quantization`` (``int8``).

An adaptation is part of the ONNX graph (the network's output, normalised, minus the domain's
mean, times the transform), so the file embeds exactly as the adapted checkpoint does in spkft.
3D-Speaker's format is a bare state_dict with no place for it: that export writes the network's
weights alone and says so in :attr:`ExportResult.warnings`.

The export checks itself before anything is written: the file is built under a temporary name
beside the output, onnxruntime runs it against PyTorch (the adapted module, when there is an
adaptation) on several batch sizes and lengths, and only if every embedding agrees (cosine >=
:data:`MIN_COSINE`) is it renamed into place.
"""

from __future__ import annotations

import io
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import torch

from spkft.core import __version__
from spkft.core.adaptation import Adaptation
from spkft.core.average import average_checkpoints
from spkft.core.checkpoint import LoadedModel, load_model, model_from_checkpoint
from spkft.core.embedding import Embedder, SpeakerEmbedder
from spkft.core.errors import ExportError, ModelError, first_line
from spkft.core.features import SAMPLE_RATE
from spkft.core.files import staged
from spkft.core.model import MIN_FRAMES
from spkft.core.onnx_model import INPUT_NAME, OUTPUT_NAME, THRESHOLD_KEY, VARIANT_KEY, OnnxEmbedder

DEFAULT_OPSET = 17
# What torch.onnx.export(dynamo=False) writes in torch 2.11; outside it, it fails after dumping its whole graph.
MIN_OPSET, MAX_OPSET = 9, 20
DEFAULT_LANGUAGE = "unspecified"
ADAPTATION_KEY = "spkft_adaptation"
MIN_COSINE = 0.99999
# int8 weights cannot meet MIN_COSINE; below this the quantized model is broken, not just coarser.
MIN_QUANTIZED_COSINE = 0.9
BATCH_SIZES = (1, 2, 4)
# The shortest legal input, an odd length the strides do not divide, and four seconds.
FRAME_COUNTS = (MIN_FRAMES, 137, 400)


@dataclass(frozen=True)
class Agreement:
    """How closely two models' embeddings agree on the same inputs."""

    worst_cosine: float
    mean_cosine: float
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    frame_counts: tuple[int, ...]


@dataclass(frozen=True)
class QuantizedModel:
    path: Path
    size_bytes: int
    agreement: Agreement  # against the fp32 ONNX model


@dataclass(frozen=True)
class ExportResult:
    output: Path
    format: str  # "onnx" or "3dspeaker"
    size_bytes: int
    opset: int | None
    metadata: dict[str, str]
    parity: Agreement  # the written model against the checkpoint's PyTorch model
    seconds: float
    quantized: QuantizedModel | None = None
    warnings: tuple[str, ...] = ()  # what the written file leaves out that the checkpoint has

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def export_onnx(
    checkpoint: str | Path | Sequence[str | Path],
    output: str | Path,
    opset: int = DEFAULT_OPSET,
    variant: str | None = None,
    language: str = DEFAULT_LANGUAGE,
    threshold: float | None = None,
    quantize: str | None = None,
) -> ExportResult:
    """Export a checkpoint to ONNX, check it against PyTorch, and write it (and an int8 copy if asked).

    ``threshold`` overrides the calibrated decision threshold stored in the metadata; with
    ``quantize="int8"`` a dynamically quantized copy is written beside the output as ``<stem>.int8.onnx``.
    A list of checkpoints exports their average (:func:`~spkft.core.average.average_checkpoints`).
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantization {quantize!r}; the only one is int8")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"ONNX opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    started = time.monotonic()
    output = Path(output)
    loaded = _load(checkpoint, variant)
    model = loaded.inference_model
    metadata = onnx_metadata(loaded.variant, model.config.to_dict(), loaded.checkpoint, language, threshold,
                             loaded.adaptation)
    proto = _trace(model, opset)
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    with staged(output) as tmp:
        onnx.save(proto, str(tmp))
        parity = agreement(Embedder(model), _open(tmp))
        if parity.worst_cosine < MIN_COSINE:
            raise ExportError(
                f"onnxruntime disagrees with PyTorch (worst cosine {parity.worst_cosine:.7f} < {MIN_COSINE}, "
                f"max abs diff {parity.max_abs_diff:.3g}); {output} was not written"
            )
    quantized = _quantize_int8(output, metadata) if quantize == "int8" else None
    return ExportResult(output, "onnx", output.stat().st_size, opset, metadata, parity,
                        time.monotonic() - started, quantized)


def export_3dspeaker(
    checkpoint: str | Path | Sequence[str | Path], output: str | Path, variant: str | None = None
) -> ExportResult:
    """Write the embedding model as upstream's plain state_dict (like ``pretrained_*.ckpt``), checked by reloading.

    A list of checkpoints writes their average (:func:`~spkft.core.average.average_checkpoints`).
    """
    started = time.monotonic()
    output = Path(output)
    loaded = _load(checkpoint, variant)
    model = loaded.model
    left_out: tuple[str, ...] = ()
    if loaded.adaptation is not None:
        left_out = (f"{checkpoint}'s {loaded.adaptation.method} adaptation is not in the 3D-Speaker format "
                    "(a bare state_dict): these weights embed without it; export --format onnx to keep it",)
    with staged(output) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
        parity = agreement(Embedder(model), Embedder(load_model(tmp).model))
        if parity.max_abs_diff != 0.0:
            raise ExportError(f"the reloaded state_dict embeds differently (max abs diff {parity.max_abs_diff:.3g}); "
                              f"{output} was not written")
    return ExportResult(output, "3dspeaker", output.stat().st_size, None, {}, parity, time.monotonic() - started,
                        warnings=left_out)


def _load(checkpoint: str | Path | Sequence[str | Path], variant: str | None) -> LoadedModel:
    """One checkpoint file, or the average of several."""
    if isinstance(checkpoint, (str, Path)):
        return load_model(checkpoint, variant=variant)
    return model_from_checkpoint(average_checkpoints(checkpoint), "the averaged checkpoints", variant=variant)


def onnx_metadata(
    variant: str, model_args: dict[str, Any], checkpoint: dict[str, Any], language: str, threshold: float | None,
    adaptation: Adaptation | None = None,
) -> dict[str, str]:
    """The ONNX custom metadata of the module docstring."""
    metadata = {
        "framework": "3d-speaker",
        "sample_rate": str(SAMPLE_RATE),
        "output_dim": str(model_args["embedding_size"]),
        "normalize_samples": "1",
        "feature_normalize_type": "global-mean",
        "language": language,
        "spkft_version": __version__,
        VARIANT_KEY: variant,
        "spkft_model_args": json.dumps(model_args, sort_keys=True),
    }
    if isinstance(checkpoint.get("epoch"), int):
        metadata["spkft_epoch"] = str(checkpoint["epoch"])
    evaluation = checkpoint.get("evaluation")
    if isinstance(evaluation, dict):
        metadata |= _evaluation_metadata(evaluation)
        metadata |= {THRESHOLD_KEY: metadata["spkft_eer_threshold"], "spkft_threshold_source": "eer"}
    if threshold is not None:
        metadata |= {THRESHOLD_KEY: repr(float(threshold)), "spkft_threshold_source": "given"}
    if adaptation is not None:
        metadata |= {
            ADAPTATION_KEY: adaptation.method,
            "spkft_adaptation_recordings": str(adaptation.recordings),
            "spkft_adaptation_shrinkage": repr(adaptation.shrinkage),
            "spkft_adaptation_source": adaptation.source,
        }
        if adaptation.speakers is not None:
            metadata["spkft_adaptation_speakers"] = str(adaptation.speakers)
    return metadata


def _evaluation_metadata(evaluation: dict[str, Any]) -> dict[str, str]:
    try:
        figures = {
            "spkft_eer": evaluation["eer"],
            "spkft_eer_threshold": evaluation["eer_threshold"],
            "spkft_min_dcf": evaluation["min_dcf"],
            "spkft_min_dcf_threshold": evaluation["min_dcf_threshold"],
            "spkft_min_dcf_p_target": evaluation["p_target"],
        }
        figures |= {f"spkft_threshold_at_far_{far}": point["threshold"]
                    for far, point in evaluation.get("at_far", {}).items()}
        counts = {
            "spkft_trials": int(evaluation["target_trials"]) + int(evaluation["nontarget_trials"]),
            "spkft_target_trials": int(evaluation["target_trials"]),
        }
        metadata = {k: repr(float(v)) for k, v in figures.items()} | {k: str(v) for k, v in counts.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"the checkpoint's evaluation record is incomplete or malformed ({exc!r})") from None
    return metadata | {"spkft_evaluation_data": str(evaluation.get("data", "unknown"))}


def parity_inputs(
    batch_sizes: tuple[int, ...] = BATCH_SIZES, frame_counts: tuple[int, ...] = FRAME_COUNTS, seed: int = 0
) -> list[torch.Tensor]:
    """Seeded random mean-normalised features, one batch per (batch size, frame count)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for frames in frame_counts:
        for batch in batch_sizes:
            x = torch.randn(batch, frames, 80, generator=generator)
            batches.append(x - x.mean(dim=1, keepdim=True))
    return batches


def agreement(
    reference: SpeakerEmbedder,
    candidate: SpeakerEmbedder,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    frame_counts: tuple[int, ...] = FRAME_COUNTS,
) -> Agreement:
    """Cosines and absolute differences of the raw embeddings of two models on :func:`parity_inputs`."""
    cosines, max_abs = [], 0.0
    for features in parity_inputs(batch_sizes, frame_counts):
        expected, found = reference.raw_embeddings(features), candidate.raw_embeddings(features)
        norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(found, axis=1)
        cosines.extend((np.sum(expected * found, axis=1) / np.maximum(norms, 1e-12)).tolist())
        max_abs = max(max_abs, float(np.abs(expected - found).max()))
    # A NaN anywhere is as bad as a disagreement: report it as the worst possible cosine.
    cosines = [c if np.isfinite(c) else -1.0 for c in cosines]
    return Agreement(min(cosines), float(np.mean(cosines)), max_abs, tuple(batch_sizes), tuple(frame_counts))


def _trace(model: torch.nn.Module, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    example = torch.zeros(2, 200, model.config.feat_dim)
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice and the tracer's note on the (constant) input-shape check.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                model.eval(), (example,), buffer, opset_version=opset, dynamo=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch", 1: "frames"}, OUTPUT_NAME: {0: "batch"}},
            )
        except Exception as exc:  # the exporter raises many types, e.g. for an unsupported opset
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {first_line(exc)}") from None
    return onnx.load_model_from_string(buffer.getvalue())


def _open(path: Path) -> OnnxEmbedder:
    try:
        # The parity check is onnxruntime's, the reference runtime: the file must run there as exported.
        return OnnxEmbedder.from_file(path, engine="onnxruntime")
    except ModelError as exc:
        raise ExportError(f"the exported file does not load in onnxruntime: {exc}") from None


def _quantize_int8(fp32_path: Path, metadata: dict[str, str]) -> QuantizedModel:
    """Dynamic int8 quantization of a written fp32 model, written beside it and measured against it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = fp32_path.with_name(f"{fp32_path.stem}.int8.onnx")
    with staged(output) as tmp, _quiet_root_logger():
        quantize_dynamic(fp32_path, tmp, weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, metadata | {"spkft_quantization": "int8"})
        onnx.save(proto, str(tmp))
        measured = agreement(_open(fp32_path), _open(tmp))
        if measured.worst_cosine < MIN_QUANTIZED_COSINE:
            raise ExportError(f"int8 quantization broke the model (worst cosine {measured.worst_cosine:.4f} "
                              f"against fp32); {output} was not written")
    return QuantizedModel(output, output.stat().st_size, measured)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer logs advice about pre-processing to the root logger; it is not the user's concern."""
    root = logging.getLogger()

    def drop_warnings(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING

    root.addFilter(drop_warnings)
    try:
        yield
    finally:
        root.removeFilter(drop_warnings)
