"""Static int8 quantization of an exported model: NNCF calibrated on the user's recordings, judged by EER.

NNCF's post-training quantization (``nncf.quantize`` on the ONNX graph) runs the fp32 model on
calibration inputs, records the range of every activation that feeds a convolution or a matrix
product, and inserts QuantizeLinear/DequantizeLinear pairs with those scales (weights per output
channel). The result stays one ONNX file with the same input, output and metadata: OpenVINO
turns each pair into int8 kernels (VNNI or AMX multiply-accumulates), onnxruntime runs the same
graph with its own int8 kernels, and sherpa-onnx (onnxruntime) reads it unchanged.

The scales are only as good as the calibration inputs: a few hundred crops of the recordings the
model will hear. By default they are the run's own training recordings (the checkpoint carries
its run config), and the proof is the EER on the run's validation speakers, whom neither the
training nor the calibration saw. A cosine to fp32 says how far embeddings moved; only the EER
says whether the verifier got worse.

Some layers do not survive int8: most often the stem convolution, which reads the fbank itself.
So the quantization runs under NNCF's accuracy control (``nncf.quantize_with_accuracy_control``)
with the EER as its metric (:class:`EerCheck`): when the fully quantized model's EER is more than
the tolerance above fp32's, NNCF ranks the quantized layers by how far each moves the embeddings
on the evaluation recordings, puts the worst back in fp32, measures the EER again, and repeats,
up to ``max_fp32_layers`` layers. Each layer kept in fp32 costs a little speed; the file's metadata
names them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from pydantic import ValidationError

from spkft.core.audio import load_audio, read_samples
from spkft.core.data import make_trials, scan, segment
from spkft.core.errors import DataError, ExportError
from spkft.core.features import fbank
from spkft.core.metrics import VerificationMetrics, compute_metrics
from spkft.core.model import MIN_FRAMES
from spkft.core.onnx_model import INPUT_NAME, QUANTIZATION_KEY, OnnxEmbedder
from spkft.core.scoring import score_trials, trial_labels
from spkft.core.records import Recording, Trial
from spkft.core.train.config import TrainConfig
from spkft.core.train.trainer import split_data, validation_trials

DEFAULT_CALIBRATION_CROPS = 300
CALIBRATION_SECONDS = 3.0
# The int8 EER may exceed fp32's by this fraction of it (0.02: 10.0 % may become 10.2 %).
DEFAULT_MAX_EER_INCREASE = 0.02
# How many layers the EER check may put back in fp32 when the fully quantized model fails it.
DEFAULT_MAX_FP32_LAYERS = 8
# Evaluation recordings on which NNCF ranks the layers (those whose embeddings int8 moved most).
RANKING_RECORDINGS = 64
# The operations int8 is for; a model's others run in fp32 in any case.
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# Per-channel QuantizeLinear (an axis attribute) came with opset 13.
MIN_OPSET = 13
# Trials generated from evaluation data given by hand, as `spkft eval` generates them.
SEGMENT_SECONDS = 4.0
MAX_TRIALS = 20_000


@dataclass(frozen=True)
class Int8Settings:
    """How to calibrate and check an int8 model; every field has a default that needs a run checkpoint."""

    calibration: Path | None = None  # recordings to calibrate on; default: the run's training data
    evaluation: Path | None = None  # labelled recordings for the EER check; default: the run's validation trials
    crops: int = DEFAULT_CALIBRATION_CROPS
    max_eer_increase: float = DEFAULT_MAX_EER_INCREASE
    max_fp32_layers: int = DEFAULT_MAX_FP32_LAYERS  # 0: quantize every layer, with no search
    force: bool = False  # write the int8 model even when its EER rose too much (marked as forced)

    def check(self) -> None:
        if self.crops < 1:
            raise ExportError(f"calibration needs at least 1 crop, got {self.crops}")
        if self.max_fp32_layers < 0:
            raise ExportError(f"the most layers to keep in fp32 must be 0 or more, got {self.max_fp32_layers}")
        if not self.max_eer_increase >= 0:
            raise ExportError(f"the allowed EER increase must be 0 or more, got {self.max_eer_increase}")


@dataclass(frozen=True)
class QuantizationData:
    """What calibrates the int8 model and what measures it, with a short name for each."""

    calibration: tuple[Recording, ...]
    calibration_source: str
    recordings: tuple[Recording, ...]  # those the trials name
    trials: tuple[Trial, ...]
    evaluation_source: str  # "validation" for the run's own validation trials


class EerRoseError(ExportError):
    """The int8 model verifies worse than fp32 by more than allowed; it was not written."""

    def __init__(self, fp32: VerificationMetrics, int8: VerificationMetrics, allowed: float, fp32_path: Path,
                 output: Path) -> None:
        self.fp32, self.int8, self.allowed = fp32, int8, allowed
        super().__init__(
            f"int8 raised the EER from {100 * fp32.eer:.2f} % to {100 * int8.eer:.2f} % "
            f"({relative(eer_increase(fp32.eer, int8.eer))}, more than the {100 * allowed:g} % allowed): "
            f"{output} was not written, only the fp32 {fp32_path}; --force writes the int8 model anyway, "
            "marked as forced"
        )


def eer_increase(fp32: float, int8: float) -> float:
    """int8's EER above fp32's as a fraction of fp32's (0.05: 5 % higher); inf when only int8 makes errors."""
    if fp32 == 0:
        return 0.0 if int8 == 0 else math.inf
    return (int8 - fp32) / fp32


def relative(increase: float) -> str:
    """``+3.1 % relative`` (or ``-1.0 % relative``) for a fraction from :func:`eer_increase`."""
    return f"{100 * increase:+.1f} % relative" if math.isfinite(increase) else "from no errors to some"


def quantization_data(checkpoint: Mapping[str, Any], settings: Int8Settings = Int8Settings()) -> QuantizationData:
    """The calibration recordings and the EER trials: as given, or the run's training and validation data."""
    settings.check()
    split = config = None
    if settings.calibration is None or settings.evaluation is None:
        config = run_config(checkpoint)
        split, _ = split_data(config)
    if settings.calibration is not None:
        report = scan(settings.calibration, allow_unlabelled=True)
        calibration, calibration_source = report.recordings, report.source_label
    else:
        calibration, calibration_source = split.train, f"the run's training data ({config.data.train})"
    if not calibration:
        raise DataError(f"{settings.calibration}: no usable recordings to calibrate on")
    if settings.evaluation is not None:
        report = scan(settings.evaluation)
        recordings = segment(report.recordings, SEGMENT_SECONDS)
        trials = make_trials(recordings, max_target=MAX_TRIALS // 2, nontarget_per_target=None,
                             max_nontarget=MAX_TRIALS - MAX_TRIALS // 2)
        evaluation_source = report.source_label
    else:
        recordings, trials = validation_trials(config, split)
        evaluation_source = "validation"
    needed = {t.enrol for t in trials} | {t.test for t in trials}
    return QuantizationData(tuple(calibration), calibration_source,
                            tuple(r for r in recordings if r.utt_id in needed), tuple(trials), evaluation_source)


def run_config(checkpoint: Mapping[str, Any]) -> TrainConfig:
    """The run config a checkpoint of ``spkft train`` carries, with its data sources where it says."""
    given_by_hand = "give --calibration DATA and --eval-data DATA"
    record = checkpoint.get("config")
    if not isinstance(record, Mapping):
        raise ExportError("int8 is calibrated on the run's training data and checked on its validation trials, "
                          f"but this checkpoint has no run config (spkft train writes one): {given_by_hand}")
    try:
        config = TrainConfig.model_validate(record)
    except ValidationError as exc:
        raise ExportError(f"the checkpoint's run config is not valid ({exc.error_count()} problem(s)): "
                          f"{given_by_hand}") from None
    for name in ("train", "val", "trials"):
        path = getattr(config.data, name)
        if path is not None and not Path(path).exists():
            raise ExportError(f"the run's data.{name}, {path}, is not here (a relative path is relative to the "
                              f"folder the run was trained in): export from there, or {given_by_hand}")
    return config


def calibration_features(recordings: tuple[Recording, ...], crops: int, seconds: float = CALIBRATION_SECONDS,
                         seed: int = 0) -> list[np.ndarray]:
    """``crops`` seeded crops of ``seconds`` (a shorter recording whole) as fbank ``[1, frames, 80]``.

    The recordings take turns in a seeded order, so a few hundred crops span as many recordings.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(recordings))
    features = []
    for index in range(crops):
        recording = recordings[order[index % len(order)]]
        spare = (recording.duration_seconds or 0.0) - seconds
        if spare > 0:
            start = recording.start_seconds + rng.uniform(0.0, spare)
            samples = read_samples(recording.path, start, start + seconds)
        else:
            samples = read_samples(recording.path, recording.start_seconds, recording.stop_seconds)
        crop = fbank(torch.from_numpy(samples))
        if len(crop) >= MIN_FRAMES:
            features.append(crop.numpy()[None])
    if not features:
        raise DataError(f"none of {len(recordings)} calibration recording(s) is long enough to embed")
    return features


class EerCheck:
    """The EER of ONNX models on a fixed set of trials, measured in OpenVINO as the server runs them.

    It opens with the fp32 model's figures (:attr:`fp32`). It is also the validation function of
    NNCF's accuracy control, called with a model and evaluation items (``(utt_id, fbank)``, see
    :attr:`items`). Given all of them it returns minus the EER (NNCF's metrics grow with quality);
    given some, as when NNCF ranks layers on the recordings int8 moved most, the mean cosine of
    their embeddings to fp32's. With either it returns each item's cosine to fp32, from which NNCF
    picks those recordings.

    Ranking runs in OpenVINO too, though it compiles one int8 graph per quantized layer (a second or
    more each, where onnxruntime opens one in a fraction of that): onnxruntime's int8 kernels round
    differently, enough to move some embeddings of a badly calibrated demo model by 0.15 in cosine,
    so only the serving engine can rank the layers by the damage it does.
    """

    def __init__(self, fp32_model: onnx.ModelProto, recordings: tuple[Recording, ...],
                 trials: tuple[Trial, ...]) -> None:
        self.fp32_model, self.trials, self.labels = fp32_model, trials, trial_labels(trials)
        # Decoded once: NNCF measures one model per quantized layer on the same recordings.
        self.items = [(r.utt_id, fbank(load_audio(r.path, start_seconds=r.start_seconds,
                                                  stop_seconds=r.stop_seconds).tensor())) for r in recordings]
        self._fp32_embeddings = self._embed(_openvino(fp32_model), self.items)
        self.fp32 = self._metrics(self._fp32_embeddings)

    def measure(self, model: onnx.ModelProto) -> VerificationMetrics:
        """The model's metrics on the trials."""
        return self._metrics(self._embed(_openvino(model), self.items))

    def __call__(self, model: onnx.ModelProto, items: Iterable[tuple[str, torch.Tensor]]) -> tuple[float, list[float]]:
        items = list(items)
        if len(items) < len(self.items):  # the recordings NNCF ranks layers on
            cosines = self._cosines(self._embed(_openvino(model), items))
            return float(np.mean(cosines)), cosines
        if model is self.fp32_model:
            return -self.fp32.eer, self._cosines(self._fp32_embeddings)
        embeddings = self._embed(_openvino(model), items)
        return -self._metrics(embeddings).eer, self._cosines(embeddings)

    @staticmethod
    def _embed(embedder: OnnxEmbedder, items: list[tuple[str, torch.Tensor]]) -> dict[str, np.ndarray]:
        return {utt_id: embedder.embed_features(features) for utt_id, features in items}

    def _cosines(self, embeddings: dict[str, np.ndarray]) -> list[float]:
        return [float(vector @ self._fp32_embeddings[utt_id]) for utt_id, vector in embeddings.items()]

    def _metrics(self, embeddings: dict[str, np.ndarray]) -> VerificationMetrics:
        return compute_metrics(score_trials(embeddings, self.trials), self.labels)


def _openvino(model: onnx.ModelProto) -> OnnxEmbedder:
    """The model in OpenVINO as the server runs it: fp32, or int8 for a quantized graph (whatever metadata
    it carries), which OpenVINO runs with the same fp32 setting around its int8 operations."""
    with tempfile.TemporaryDirectory(prefix="spkft-int8-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, str(path))
        labelled_int8 = any(p.key == QUANTIZATION_KEY and p.value == "int8" for p in model.metadata_props)
        return OnnxEmbedder.from_file(path, engine="openvino", precision="int8" if labelled_int8 else "fp32")


def quantize_static(model: onnx.ModelProto, features: list[np.ndarray], check: EerCheck | None = None,
                    max_eer_increase: float = DEFAULT_MAX_EER_INCREASE,
                    max_fp32_layers: int = DEFAULT_MAX_FP32_LAYERS) -> onnx.ModelProto:
    """``model`` with int8 QuantizeLinear/DequantizeLinear pairs, their scales measured on ``features``.

    With an EER ``check`` of ``model`` and ``max_fp32_layers`` above 0, up to that many layers go
    back to fp32 while the EER exceeds fp32's by more than ``max_eer_increase`` of it (see the
    module docstring).
    """
    if check is not None and check.fp32_model is not model:
        raise ValueError("the EER check must be of the model being quantized")
    with _quiet_nncf():
        import nncf  # seconds to import: only an int8 export pays for it

        calibration = nncf.Dataset(features, lambda crop: {INPUT_NAME: crop})
        if check is None or max_fp32_layers == 0:
            return nncf.quantize(model, calibration, subset_size=len(features), target_device=nncf.TargetDevice.CPU)
        search = nncf.AdvancedAccuracyRestorerParameters(
            max_num_iterations=max_fp32_layers, ranking_subset_size=min(RANKING_RECORDINGS, len(check.items)))
        return nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(check.items), check,
            max_drop=max_eer_increase * check.fp32.eer, drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(features), target_device=nncf.TargetDevice.CPU,
            advanced_accuracy_restorer_parameters=search)


def fp32_layers(model: onnx.ModelProto) -> list[str]:
    """The names of a quantized model's convolutions and matrix products that run in fp32: none of their
    inputs comes from a DequantizeLinear."""
    dequantized = {output for node in model.graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    return [node.name for node in model.graph.node
            if node.op_type in WEIGHTED_OPS and not dequantized.intersection(node.input)]


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF draws progress bars on stdout and logs notes, and torch warns of CUDA as NNCF imports it:
    none of it is the user's concern, and a library call must leave stdout to its caller."""
    loggers = [logging.getLogger(name) for name in ("nncf", "torch.utils.cpp_extension")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
