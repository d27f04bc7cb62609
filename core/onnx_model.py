"""Speaker embeddings from an exported ONNX model, through onnxruntime on the CPU.

:class:`OnnxEmbedder` embeds recordings exactly as :class:`~spkft.core.embedding.Embedder` does
(same fbank, same windowing of long recordings, L2-normalised output); only the network runs in
onnxruntime. A model file must have one input ``feature`` float32 ``[batch, frames, 80]`` and one
output ``embedding`` ``[batch, dim]``, as :func:`spkft.core.export.export_onnx` writes it; the
custom metadata (see :mod:`spkft.core.export` for the keys) says what it is. An onnxruntime
session may be run from several threads at once, so one embedder serves concurrent requests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from spkft.core.embedding import SpeakerEmbedder
from spkft.core.errors import ModelError, first_line
from spkft.core.features import FEATURE_DIM

INPUT_NAME = "feature"
OUTPUT_NAME = "embedding"
# Metadata keys this module reads; spkft.core.export writes them (and documents the rest).
VARIANT_KEY = "spkft_variant"
THRESHOLD_KEY = "spkft_threshold"
OUTPUT_DIM_KEY = "output_dim"


class OnnxEmbedder(SpeakerEmbedder):
    """Speaker embeddings from an ONNX export of ERes2NetV2 (onnxruntime, CPU)."""

    def __init__(
        self,
        session: ort.InferenceSession,
        path: str | Path = "<memory>",
        max_whole_seconds: float = 30.0,
        chunk_seconds: float = 10.0,
    ) -> None:
        super().__init__(max_whole_seconds, chunk_seconds)
        self.session = session
        self.path = Path(path)
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        self._embedding_dim = _check_signature(session, self.metadata, self.path)

    @classmethod
    def from_file(cls, path: str | Path, threads: int | None = None, **kwargs) -> OnnxEmbedder:
        """Open a model file; ``threads`` caps onnxruntime's intra-op threads (default: all cores)."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such model file")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: optimiser notes are not the user's concern
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
        return cls(session, path, **kwargs)

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

    def _forward(self, features: torch.Tensor) -> np.ndarray:
        batch = np.ascontiguousarray(features.numpy(), dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].astype(np.float32, copy=False)


def _check_signature(session: ort.InferenceSession, metadata: dict[str, str], path: Path) -> int:
    """Check the model's input and output; return the embedding dimension."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    found = (f"inputs {[(i.name, i.shape) for i in inputs]}, outputs {[(o.name, o.shape) for o in outputs]}")
    expected = f"expected input '{INPUT_NAME}' float [batch, frames, {FEATURE_DIM}] and output '{OUTPUT_NAME}' [batch, dim]"
    feature = next((i for i in inputs if i.name == INPUT_NAME), None)
    embedding = next((o for o in outputs if o.name == OUTPUT_NAME), None)
    if (
        len(inputs) != 1 or feature is None or embedding is None
        or feature.type != "tensor(float)" or len(feature.shape) != 3
        or feature.shape[2] != FEATURE_DIM
        or len(embedding.shape) != 2
    ):
        raise ModelError(f"{path}: not a speaker-embedding model: {expected}, found {found}")
    dim = embedding.shape[1]
    if isinstance(dim, int):
        return dim
    try:
        return int(metadata[OUTPUT_DIM_KEY])
    except (KeyError, ValueError):
        raise ModelError(f"{path}: the embedding size is neither fixed in the graph nor in metadata "
                         f"'{OUTPUT_DIM_KEY}'") from None
