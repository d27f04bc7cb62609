"""Speaker embeddings from an exported ONNX model, on the CPU, through OpenVINO or onnxruntime.

:class:`OnnxEmbedder` embeds recordings exactly as :class:`~spkft.core.embedding.Embedder` does
(same fbank, same windowing of long recordings, L2-normalised output); only the network runs in
an inference engine. A model file must have one input ``feature`` float32 ``[batch, frames, 80]``
and one output ``embedding`` ``[batch, dim]``, as :func:`spkft.core.export.export_onnx` writes
it; the custom metadata (see :mod:`spkft.core.export` for the keys) says what it is.

Two engines read the same file:
- ``openvino``: OpenVINO's CPU plugin compiles the graph into its own kernels. In fp32 it agrees
  with onnxruntime to ~1e-7 and is faster on this network; on CPUs that compute bfloat16 natively
  (AVX512_BF16 or AMX) it can run in ``bf16`` (fp32 accumulation), about twice as fast again, with
  embeddings within a cosine of ~1e-5 of fp32 (measured in ``benchmarks/serve_speed.py``).
- ``onnxruntime``: the reference runtime, in fp32 or int8; the export's parity check uses it,
  and so does sherpa-onnx.
``auto`` (the default) takes OpenVINO, and onnxruntime for a graph OpenVINO cannot compile.

Precision ``int8`` runs the statically quantized twin that ``spkft export --quantize int8`` writes
beside the model (``model.int8.onnx`` beside ``model.onnx``; see :mod:`spkft.core.quantize`), or
the int8 file itself when that is the one named: its convolutions in int8, the rest in fp32.
Precision ``auto`` takes that twin when it is *verified* (its EER passed the export's check
against this very fp32 file, whose SHA-256 it records) and the engine is OpenVINO, where the
check measured it; otherwise bf16 where the engine and the CPU have it, else fp32.
One embedder serves concurrent callers: onnxruntime sessions are thread-safe, and OpenVINO calls
each take an infer request from a pool that grows to the number of calls ever in flight at once
(not one per thread: a request keeps its buffers, and a server has many threads).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
from openvino.frontend import FrontEndManager
import torch

from spkft.core.calibration import Calibration
from spkft.core.embedding import SpeakerEmbedder
from spkft.core.errors import CheckpointError, ModelError, first_line
from spkft.core.features import FEATURE_DIM
from spkft.core.files import sha256_of
from spkft.core.plda import Plda, plda_from_json, score_kind

log = logging.getLogger(__name__)

INPUT_NAME = "feature"
OUTPUT_NAME = "embedding"
# Metadata keys this module reads; spkft.core.export writes them (and documents the rest).
VARIANT_KEY = "spkft_variant"
THRESHOLD_KEY = "spkft_threshold"
OUTPUT_DIM_KEY = "output_dim"
QUANTIZATION_KEY = "spkft_quantization"  # "int8" in a quantized file
INT8_CHECK_KEY = "spkft_int8_check"  # "passed", or "forced" when written despite a failed check
INT8_SOURCE_KEY = "spkft_int8_source_sha256"  # of the fp32 file it was quantized from
INT8_SUFFIX = ".int8.onnx"
PLDA_KEY = "spkft_plda"  # the PLDA scorer, as JSON (spkft.core.plda.plda_to_json)
CALIBRATION_KEY = "spkft_calibration"  # the score-to-LLR map, as JSON

ENGINES = ("auto", "openvino", "onnxruntime")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
# An int8 graph's remaining operations (pooling, the embedding layer's input) stay in fp32.
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_ORT_TYPES = {"tensor(float)": "f32"}  # onnxruntime's element type names, in OpenVINO's words


@dataclass(frozen=True)
class _Port:
    """An input or output of the graph: its name, shape (None where dynamic) and element type."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


class OnnxRuntimeEngine:
    """The graph in an onnxruntime CPU session (fp32, or int8 for a quantized file)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None, precision: str = "auto") -> None:
        self.path = path
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: optimiser notes are not the user's concern
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.precision = _file_precision(path, self.metadata, precision, auto="fp32")
        self.inputs = [_ort_port(i) for i in self.session.get_inputs()]
        self.outputs = [_ort_port(o) for o in self.session.get_outputs()]

    def run(self, features: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: features})[0]


class OpenVinoEngine:
    """The graph compiled by OpenVINO for the CPU, in fp32 or bf16 (``auto``: bf16 where the CPU
    has it), or int8 for a quantized file; one stream per parallel call."""

    name = "openvino"

    def __init__(self, path: Path, threads: int | None, precision: str = "auto", parallel_calls: int = 1) -> None:
        self.path = path
        core = ov.Core()
        try:
            model = _read_onnx(path)
        except Exception as exc:  # OpenVINO raises untyped errors for unreadable graphs
            raise ModelError(f"{path}: OpenVINO cannot run this model ({first_line(exc)})") from None
        self.metadata = _openvino_metadata(model)
        # What the file allows is said first (an int8 file runs in int8 only), then what the CPU allows.
        self.precision = _file_precision(path, self.metadata, precision, auto="bf16" if cpu_has_bf16(core) else "fp32")
        if self.precision == "bf16" and not cpu_has_bf16(core):
            raise ModelError("bf16 needs a CPU that computes bfloat16 natively (AVX512_BF16 or AMX); "
                             "this one does not: use precision fp32")
        self.inputs = [_ov_port(p) for p in model.inputs]
        self.outputs = [_ov_port(p) for p in model.outputs]
        try:
            config = {
                "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[self.precision],
                "NUM_STREAMS": parallel_calls,
                # OpenVINO counts threads over all streams; 0 leaves it every core.
                "INFERENCE_NUM_THREADS": 0 if threads is None else threads * parallel_calls,
            }
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises untyped errors for unreadable or unsupported graphs
            raise ModelError(f"{path}: OpenVINO cannot run this model ({first_line(exc)})") from None
        self._idle: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()

    def run(self, features: np.ndarray) -> np.ndarray:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:  # an infer request runs one call at a time
            request = self.compiled.create_infer_request()
        try:
            # The request reuses its output buffer for the next call: hand back a copy.
            return request.infer({INPUT_NAME: features})[OUTPUT_NAME].copy()
        finally:
            self._idle.put(request)


def cpu_has_bf16(core: ov.Core | None = None) -> bool:
    """Whether OpenVINO can compute bfloat16 natively on this CPU."""
    return "BF16" in (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def engine_choice_problems(engine: str, precision: str) -> list[str]:
    """What cannot work in an engine and precision choice, one sentence each; empty when it can."""
    problems = []
    if engine not in ENGINES:
        problems.append(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        problems.append(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if engine == "onnxruntime" and precision == "bf16":
        problems.append("onnxruntime runs this model in fp32 or int8 only; use the openvino engine for bf16")
    return problems


def int8_twin(path: Path) -> Path:
    """Where ``spkft export --quantize int8`` puts the int8 model of ``path``: ``model.int8.onnx`` beside ``model.onnx``."""
    return path.with_name(f"{path.stem}{INT8_SUFFIX}")


def int8_twin_problem(path: Path, allow_forced: bool = False) -> str | None:
    """Why the int8 twin of ``path`` is not a verified int8 model of this very file; None when it is.

    ``allow_forced`` accepts a twin written with ``--force`` despite a failed EER check.
    """
    twin = int8_twin(path)
    if not twin.is_file():
        return f"there is no int8 model beside it ({twin.name}; spkft export --quantize int8 writes one)"
    try:
        metadata = {p.key: p.value for p in onnx.load(str(twin), load_external_data=False).metadata_props}
    except Exception as exc:  # onnx raises protobuf's untyped errors for a damaged file
        return f"{twin.name} is not a readable ONNX model ({first_line(exc)})"
    if metadata.get(QUANTIZATION_KEY) != "int8":
        return f"{twin.name} is not an int8 model of spkft export"
    if metadata.get(INT8_SOURCE_KEY) != sha256_of(path):
        return f"{twin.name} was quantized from another version of {path.name}: export again with --quantize int8"
    if metadata.get(INT8_CHECK_KEY) != "passed" and not allow_forced:
        return f"{twin.name} was written with --force after its EER rose beyond the check's tolerance"
    return None


def _model_file(path: Path, engine: str, precision: str) -> Path:
    """The file to open for ``precision``: ``path``, or its int8 twin (see the module docstring)."""
    if precision not in ("auto", "int8") or not int8_twin(path).exists():
        return path  # with int8 asked for, the file itself must then be int8: the engine checks
    if precision == "int8":
        problem = int8_twin_problem(path, allow_forced=True)
        if problem is not None:
            raise ModelError(f"{path}: cannot run it in int8: {problem}")
        return int8_twin(path)
    if engine == "onnxruntime":
        return path
    problem = int8_twin_problem(path)
    if problem is not None:
        log.info("not running the int8 model beside %s: %s", path, problem)
        return path
    log.info("running %s, the verified int8 model of %s", int8_twin(path), path)
    return int8_twin(path)


def _file_precision(path: Path, metadata: dict[str, str], asked: str, auto: str) -> str:
    """The precision a file runs in: int8 for a quantized file (asked for, or ``auto``), else what was
    asked, with ``auto`` standing for the engine's best."""
    quantized = metadata.get(QUANTIZATION_KEY) == "int8"
    if quantized and asked in ("fp32", "bf16"):
        raise ModelError(f"{path}: an int8 model runs in precision int8 only; for {asked}, give its fp32 model")
    if not quantized and asked == "int8":
        raise ModelError(f"{path}: not an int8 model, and {int8_twin_problem(path)}")
    if quantized:
        return "int8"
    return auto if asked == "auto" else asked


def open_engine(path: Path, engine: str = "auto", precision: str = "auto", threads: int | None = None,
                parallel_calls: int = 1) -> OnnxRuntimeEngine | OpenVinoEngine:
    """The inference engine for ``path``; see the module docstring for ``engine`` and ``precision``."""
    problems = engine_choice_problems(engine, precision)
    if problems:
        raise ModelError("; ".join(problems))
    _check_onnx_file(path)
    path = _model_file(path, engine, precision)
    if engine == "onnxruntime":
        return OnnxRuntimeEngine(path, threads, precision)
    try:
        return OpenVinoEngine(path, threads, precision, parallel_calls)
    except ModelError as exc:
        if engine == "openvino" or precision == "bf16":
            raise
        log.info("%s; running it in onnxruntime instead", exc)
        return OnnxRuntimeEngine(path, threads, precision)


class OnnxEmbedder(SpeakerEmbedder):
    """Speaker embeddings from an ONNX export of ERes2NetV2, on the CPU."""

    def __init__(
        self,
        engine: OnnxRuntimeEngine | OpenVinoEngine,
        path: str | Path = "<memory>",
        max_whole_seconds: float = 30.0,
        chunk_seconds: float = 10.0,
    ) -> None:
        super().__init__(max_whole_seconds, chunk_seconds)
        self.engine = engine
        self.path = Path(path)
        self.metadata: dict[str, str] = engine.metadata
        self._embedding_dim = _check_signature(engine.inputs, engine.outputs, self.metadata, self.path)

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None, engine: str = "auto", precision: str = "auto",
                  parallel_calls: int = 1, **kwargs) -> OnnxEmbedder:
        """Open a model file.

        ``threads`` caps the threads of one inference call (default: all cores); ``parallel_calls``
        is how many calls OpenVINO runs side by side, each on its own threads (onnxruntime runs
        concurrent calls on one shared thread pool).
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        opened = open_engine(path, engine, precision, threads, parallel_calls)
        return cls(opened, opened.path, **kwargs)

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def variant(self) -> str | None:
        return self.metadata.get(VARIANT_KEY)

    @property
    def default_threshold(self) -> float | None:
        """The calibrated decision threshold stored at export, if any."""
        value = self.metadata.get(THRESHOLD_KEY)
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            raise ModelError(f"{self.path}: metadata {THRESHOLD_KEY}={value!r} is not a number") from None

    @functools.cached_property
    def plda(self) -> Plda | None:
        """The PLDA scorer stored at export, if any: trials are then scored by its LLR."""
        text = self.metadata.get(PLDA_KEY)
        if text is None:
            return None
        try:
            plda = plda_from_json(text)
        except CheckpointError as exc:
            raise ModelError(f"{self.path}: metadata {PLDA_KEY}: {exc}") from None
        if plda.input_dim != self.embedding_dim:
            raise ModelError(f"{self.path}: its PLDA is for {plda.input_dim}-dim embeddings; the model makes "
                             f"{self.embedding_dim}-dim ones")
        return plda

    @functools.cached_property
    def calibration(self) -> Calibration | None:
        """The map from scores to calibrated LLRs stored at export, if any."""
        text = self.metadata.get(CALIBRATION_KEY)
        if text is None:
            return None
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise CheckpointError("malformed calibration record (not a JSON object)")
            calibration = Calibration.from_dict(record)
        except (ValueError, CheckpointError) as exc:
            raise ModelError(f"{self.path}: metadata {CALIBRATION_KEY}: {first_line(str(exc))}") from None
        if calibration.scores != score_kind(self.plda):
            raise ModelError(f"{self.path}: its calibration maps {calibration.scores} scores, which the model "
                             "does not give")
        return calibration

    def _forward(self, features: torch.Tensor) -> np.ndarray:
        batch = np.ascontiguousarray(features.numpy(), dtype=np.float32)
        return self.engine.run(batch).astype(np.float32, copy=False)


def _read_onnx(path: Path) -> ov.Model:
    """The graph through OpenVINO's ONNX front end only: ``Core.read_model`` would try every front end
    on a file that is not ONNX, and some print parse errors of their own to stderr."""
    frontend = FrontEndManager().load_by_framework("onnx")
    return frontend.convert(frontend.load(str(path)))


def _check_onnx_file(path: Path) -> None:
    if not FrontEndManager().load_by_framework("onnx").supported(str(path)):
        raise ModelError(f"{path}: not a readable ONNX model (spkft export writes one)")


def _ort_port(node: ort.NodeArg) -> _Port:
    return _Port(node.name, tuple(d if isinstance(d, int) else None for d in node.shape), _ORT_TYPES.get(node.type, node.type))


def _ov_port(output: ov.Output) -> _Port:
    shape = tuple(d.get_length() if d.is_static else None for d in output.get_partial_shape())
    return _Port(output.get_any_name(), shape, output.get_element_type().get_type_name())


def _openvino_metadata(model: ov.Model) -> dict[str, str]:
    """The ONNX file's custom metadata, which OpenVINO keeps under ``framework`` in the model's rt_info."""
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    return {key: model.get_rt_info(["framework", key]).astype(str) for key in info["framework"]}


def _check_signature(inputs: list[_Port], outputs: list[_Port], metadata: dict[str, str], path: Path) -> int:
    """Check the model's input and output; return the embedding dimension."""
    found = f"inputs {[(i.name, i.shape) for i in inputs]}, outputs {[(o.name, o.shape) for o in outputs]}"
    expected = f"expected input '{INPUT_NAME}' float [batch, frames, {FEATURE_DIM}] and output '{OUTPUT_NAME}' [batch, dim]"
    feature = next((i for i in inputs if i.name == INPUT_NAME), None)
    embedding = next((o for o in outputs if o.name == OUTPUT_NAME), None)
    if (
        len(inputs) != 1 or feature is None or embedding is None
        or feature.dtype != "f32" or len(feature.shape) != 3
        or feature.shape[2] != FEATURE_DIM
        or len(embedding.shape) != 2
    ):
        raise ModelError(f"{path}: not a speaker-embedding model: {expected}, found {found}")
    dim = embedding.shape[1]
    if dim is not None:
        return dim
    try:
        return int(metadata[OUTPUT_DIM_KEY])
    except (KeyError, ValueError):
        raise ModelError(f"{path}: the embedding size is neither fixed in the graph nor in metadata "
                         f"'{OUTPUT_DIM_KEY}'") from None
