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
- when the checkpoint carries a PLDA scorer (``spkft adapt --method plda``): ``spkft_plda`` (its
  parameters as JSON, arrays in base64; :func:`spkft.core.plda.plda_to_json`) and
  ``spkft_plda_description``; the server then scores Verify and Identify by its LLR;
- when the checkpoint carries a calibration (``spkft calibrate``): ``spkft_calibration`` (JSON of
  :meth:`spkft.core.calibration.Calibration.to_dict`); the server then answers with LLRs and
  probabilities;
- in an int8 file only (:mod:`spkft.core.quantize`): ``spkft_quantization`` (``int8``);
  ``spkft_eer``, ``spkft_min_dcf``, their thresholds, the thresholds at each false-accept rate and
  the trial counts as measured on the int8 model itself, and ``spkft_threshold`` its EER threshold
  (unless one was given); ``spkft_fp32_eer``, ``spkft_fp32_eer_threshold``,
  ``spkft_fp32_min_dcf`` and ``spkft_fp32_min_dcf_threshold`` of the fp32 file on the same
  trials; ``spkft_int8_eer_increase`` (relative), ``spkft_int8_max_eer_increase`` (the
  tolerance), ``spkft_int8_check`` (``passed``, or ``forced``), ``spkft_int8_calibration`` (how
  many crops of what), ``spkft_int8_fp32_layers`` (the convolutions and matrix products left in
  fp32, comma-separated) and ``spkft_int8_source_sha256`` (of the fp32 file: serving takes a twin
  only for the file it was made from).

With ``quantize="int8"`` the fp32 file is written first, then its int8 twin
(``<stem>.int8.onnx``) only if its EER on the evaluation trials is within the tolerance of the
fp32 file's on the same trials, both measured in OpenVINO, which serves them; to get there, the
layers that int8 damages most may go back to fp32 (see :mod:`spkft.core.quantize`).

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
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch

from spkft.core import __version__
from spkft.core.adaptation import Adaptation
from spkft.core.calibration import Calibration
from spkft.core.average import average_checkpoints
from spkft.core.checkpoint import LoadedModel, load_model, model_from_checkpoint
from spkft.core.embedding import Embedder, SpeakerEmbedder
from spkft.core.errors import ExportError, ModelError, first_line
from spkft.core.features import SAMPLE_RATE
from spkft.core.files import sha256_of, staged
from spkft.core.metrics import VerificationMetrics
from spkft.core.model import MIN_FRAMES
from spkft.core.plda import Plda, plda_to_json
from spkft.core.onnx_model import (
    CALIBRATION_KEY,
    INPUT_NAME,
    INT8_CHECK_KEY,
    INT8_SOURCE_KEY,
    OUTPUT_NAME,
    PLDA_KEY,
    QUANTIZATION_KEY,
    THRESHOLD_KEY,
    VARIANT_KEY,
    OnnxEmbedder,
    int8_twin,
)
from spkft.core.quantize import (
    MIN_OPSET as MIN_INT8_OPSET,
    EerCheck,
    EerRoseError,
    Int8Settings,
    QuantizationData,
    calibration_features,
    eer_increase,
    fp32_layers,
    quantization_data,
    quantize_static,
)

DEFAULT_OPSET = 17
# What torch.onnx.export(dynamo=False) writes in torch 2.11; outside it, it fails after dumping its whole graph.
MIN_OPSET, MAX_OPSET = 9, 20
DEFAULT_LANGUAGE = "unspecified"
ADAPTATION_KEY = "spkft_adaptation"
MIN_COSINE = 0.99999
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
    """The int8 twin as written, and both models' figures on the same trials."""

    path: Path
    size_bytes: int
    fp32: VerificationMetrics
    int8: VerificationMetrics
    evaluation_source: str  # "validation" for the run's validation trials, else the data given
    calibration: str  # how many crops of what
    max_eer_increase: float
    fp32_layers: tuple[str, ...]  # convolutions and matrix products left in fp32
    forced: bool  # written despite an EER increase beyond max_eer_increase

    @property
    def eer_increase(self) -> float:
        return eer_increase(self.fp32.eer, self.int8.eer)


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
    int8: Int8Settings = Int8Settings(),
    note: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint to ONNX, check it against PyTorch, and write it (and an int8 twin if asked).

    ``threshold`` overrides the calibrated decision threshold stored in the metadata; with
    ``quantize="int8"`` a statically quantized twin is written beside the output as
    ``<stem>.int8.onnx`` (see :func:`export_int8`, which ``int8`` and ``note`` go to). A list of
    checkpoints exports their average (:func:`~spkft.core.average.average_checkpoints`).
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantization {quantize!r}; the only one is int8")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"ONNX opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    if quantize == "int8" and opset < MIN_INT8_OPSET:
        raise ExportError(f"int8 needs ONNX opset {MIN_INT8_OPSET} or later (per-channel quantization), got {opset}")
    started = time.monotonic()
    output = Path(output)
    loaded = _load(checkpoint, variant)
    # Scanned before the slow part, so that missing data fails in seconds.
    data = quantization_data(loaded.checkpoint, int8) if quantize == "int8" else None
    model = loaded.inference_model
    metadata = onnx_metadata(loaded.variant, model.config.to_dict(), loaded.checkpoint, language, threshold,
                             loaded.adaptation, loaded.plda, loaded.calibration)
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
    quantized = None if data is None else export_int8(output, data, int8, note)
    return ExportResult(output, "onnx", output.stat().st_size, opset, metadata, parity,
                        time.monotonic() - started, quantized)


def export_int8(fp32_path: Path, data: QuantizationData, settings: Int8Settings = Int8Settings(),
                note: Callable[[str], None] | None = None) -> QuantizedModel:
    """Quantize an exported fp32 model, measure both on ``data``'s trials, and write the int8 twin if it
    verifies as well (see :mod:`spkft.core.quantize`); otherwise raise :class:`EerRoseError`, which
    holds both sets of figures. ``note`` hears what is being done, a line per stage.
    """
    say = note or (lambda line: None)
    output = int8_twin(fp32_path)
    model = onnx.load(str(fp32_path))
    metadata = {p.key: p.value for p in model.metadata_props}
    say(f"int8: measuring fp32 on {len(data.trials)} trials ({data.evaluation_source})")
    check = EerCheck(model, data.recordings, data.trials)
    search = (f"; while its EER is more than {100 * settings.max_eer_increase:g} % above fp32's, up to "
              f"{settings.max_fp32_layers} layer(s) go back to fp32" if settings.max_fp32_layers else "")
    say(f"int8: quantizing, calibrated on {settings.crops} crops of {data.calibration_source}{search}")
    quantized = quantize_static(model, calibration_features(data.calibration, settings.crops), check,
                                settings.max_eer_increase, settings.max_fp32_layers)
    kept = fp32_layers(quantized)
    if kept:
        say(f"int8: {len(kept)} layer(s) kept in fp32: {', '.join(kept)}")
    say("int8: measuring int8")
    # The file as written, not NNCF's last measurement: NNCF stores the weights as int8 after measuring.
    measured = check.measure(quantized)
    increase = eer_increase(check.fp32.eer, measured.eer)
    if increase > settings.max_eer_increase and not settings.force:
        raise EerRoseError(check.fp32, measured, settings.max_eer_increase, fp32_path, output)
    result = QuantizedModel(output, 0, check.fp32, measured, data.evaluation_source,
                            f"{settings.crops} crops of {data.calibration_source}", settings.max_eer_increase,
                            tuple(kept), forced=increase > settings.max_eer_increase)
    onnx.helper.set_model_props(quantized, metadata | _int8_metadata(result, metadata, sha256_of(fp32_path)))
    with staged(output) as tmp:
        onnx.save(quantized, str(tmp))
    return replace(result, size_bytes=output.stat().st_size)


def _int8_metadata(result: QuantizedModel, fp32_metadata: dict[str, str], source_sha256: str) -> dict[str, str]:
    """The int8 file's own figures and threshold, fp32's on the same trials, and how it was made."""
    metadata = _evaluation_metadata(result.int8.to_dict() | {"data": result.evaluation_source})
    if fp32_metadata.get("spkft_threshold_source") != "given":
        metadata |= {THRESHOLD_KEY: repr(result.int8.eer_threshold), "spkft_threshold_source": "eer"}
    fp32 = result.fp32
    return metadata | {
        QUANTIZATION_KEY: "int8",
        "spkft_fp32_eer": repr(fp32.eer),
        "spkft_fp32_eer_threshold": repr(fp32.eer_threshold),
        "spkft_fp32_min_dcf": repr(fp32.min_dcf),
        "spkft_fp32_min_dcf_threshold": repr(fp32.min_dcf_threshold),
        "spkft_int8_eer_increase": repr(result.eer_increase),
        "spkft_int8_max_eer_increase": repr(result.max_eer_increase),
        INT8_CHECK_KEY: "forced" if result.forced else "passed",
        "spkft_int8_calibration": result.calibration,
        "spkft_int8_fp32_layers": ",".join(result.fp32_layers),
        INT8_SOURCE_KEY: source_sha256,
    }


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
    for what, present in (("PLDA scorer", loaded.plda), ("calibration", loaded.calibration)):
        if present is not None:
            left_out += (f"{checkpoint}'s {what} has no place in the 3D-Speaker format (a bare state_dict); "
                         "export --format onnx to keep it",)
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
    plda: Plda | None = None,
    calibration: Calibration | None = None,
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
    if plda is not None:
        metadata |= {PLDA_KEY: plda_to_json(plda), "spkft_plda_description": plda.describe()}
    if calibration is not None:
        metadata[CALIBRATION_KEY] = json.dumps(calibration.to_dict(), sort_keys=True)
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
