"""Speaker embeddings of whole recordings, and cosine scoring.

How a recording is embedded:
- up to ``max_whole_seconds`` (default 30 s) it goes through the model in one piece, exactly as
  3D-Speaker embeds an utterance;
- longer recordings are cut into ``n = ceil(duration / chunk_seconds)`` equally long windows
  (at most ``chunk_seconds``, default 10 s) spread evenly from start to end, embedded a few at a
  time, and the mean of their L2-normalised embeddings is the recording's embedding. Memory
  therefore stays bounded by about ``max_whole_seconds`` of audio in flight, whatever the length:
  a 10-minute file needs no more than a 30-second one.
Features are always mean-normalised over the whole recording first, as for a short one.
Returned embeddings are L2-normalised, so a dot product is the cosine score.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spkft.core.adaptation import Adaptation, AdaptedModel
from spkft.core.audio import AudioSource, Waveform, load_audio
from spkft.core.checkpoint import load_model
from spkft.core.errors import DeviceError, NonFiniteEmbeddingError
from spkft.core.features import FEATURE_DIM, FRAME_SHIFT_MS, fbank
from spkft.core.model import ERes2NetV2, check_frames
from spkft.core.scoring import l2_normalise

FRAMES_PER_SECOND = int(1000 / FRAME_SHIFT_MS)


@dataclass(frozen=True)
class Embedding:
    """An L2-normalised embedding and the length of the audio it came from."""

    vector: np.ndarray
    duration_seconds: float


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device, or a clear error when the asked-for accelerator is not there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {str(name)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {str(name)!r} is not supported; use cpu or cuda")
    return device


def window_starts(frames: int, window: int) -> list[int]:
    """Evenly spread start frames of ``ceil(frames / window)`` equal windows covering ``frames``."""
    count = math.ceil(frames / window)
    length = math.ceil(frames / count)
    if count == 1:
        return [0]
    return [round(i * (frames - length) / (count - 1)) for i in range(count)]


def cosine_score(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings, in [-1, 1]."""
    return float(np.clip(np.dot(l2_normalise(a), l2_normalise(b)), -1.0, 1.0))


class SpeakerEmbedder(ABC):
    """Turns recordings into L2-normalised speaker embeddings; subclasses run the network.

    The recording-level rules (whole up to ``max_whole_seconds``, else equal windows) live here
    once, so the PyTorch model and its ONNX export embed a recording exactly alike.
    """

    def __init__(self, max_whole_seconds: float = 30.0, chunk_seconds: float = 10.0) -> None:
        if chunk_seconds <= 0 or max_whole_seconds < chunk_seconds:
            raise ValueError("need 0 < chunk_seconds <= max_whole_seconds")
        self.max_whole_frames = int(max_whole_seconds * FRAMES_PER_SECOND)
        self.chunk_frames = int(chunk_seconds * FRAMES_PER_SECOND)
        self.chunks_per_batch = max(1, self.max_whole_frames // self.chunk_frames)

    @property
    @abstractmethod
    def embedding_dim(self) -> int: ...

    @abstractmethod
    def _forward(self, features: torch.Tensor) -> np.ndarray:
        """Raw float32 embeddings ``[batch, dim]`` of a CPU batch ``[batch, frames, 80]``."""

    def raw_embeddings(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """The network's own (un-normalised) output ``[batch, dim]`` for fbank ``[batch, frames, 80]``."""
        features = torch.as_tensor(features, dtype=torch.float32).cpu()
        if features.dim() != 3 or features.shape[-1] != FEATURE_DIM:
            raise ValueError(f"expected features [batch, frames, {FEATURE_DIM}], got {list(features.shape)}")
        check_frames(features.shape[1])
        out = self._forward(features)
        if not np.isfinite(out).all():  # the input is finite fbank, so the model itself is broken
            raise NonFiniteEmbeddingError("the model produced NaN or infinite embeddings: its weights are broken "
                                          "(a diverged run or a damaged file)")
        return out

    def embed_batch(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """L2-normalised embeddings ``[batch, dim]`` of equally long mean-normalised fbank ``[batch, frames, 80]``."""
        return l2_normalise(self.raw_embeddings(features))

    def embed_features(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """The normalised embedding of one recording's mean-normalised fbank ``[frames, 80]``."""
        features = torch.as_tensor(features, dtype=torch.float32)
        frames = features.shape[0]
        if frames <= self.max_whole_frames:
            return self.embed_batch(features.unsqueeze(0))[0]
        starts = window_starts(frames, self.chunk_frames)
        length = math.ceil(frames / len(starts))
        windows = torch.stack([features[s : s + length] for s in starts])
        parts = [
            self.embed_batch(windows[i : i + self.chunks_per_batch])
            for i in range(0, len(windows), self.chunks_per_batch)
        ]
        return l2_normalise(np.concatenate(parts).mean(axis=0))

    def embed_waveform(self, waveform: Waveform) -> Embedding:
        vector = self.embed_features(fbank(waveform.tensor()))
        return Embedding(vector.astype(np.float32), waveform.duration_seconds)

    def embed(self, source: AudioSource, name: str | None = None) -> Embedding:
        """Decode, check and embed a file path or encoded audio bytes."""
        return self.embed_waveform(load_audio(source, name=name))


class Embedder(SpeakerEmbedder):
    """Speaker embeddings from an ERes2NetV2 PyTorch model, bare or behind its adaptation."""

    def __init__(
        self,
        model: ERes2NetV2 | AdaptedModel,
        device: str | torch.device = "cpu",
        max_whole_seconds: float = 30.0,
        chunk_seconds: float = 10.0,
    ) -> None:
        super().__init__(max_whole_seconds, chunk_seconds)
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, variant: str | None = None, device: str | torch.device = "cpu",
        adapted: bool = True, **kwargs
    ) -> Embedder:
        """The checkpoint's model, behind the adaptation it carries unless ``adapted`` is False."""
        resolved = resolve_device(device)
        loaded = load_model(path, variant=variant, device=resolved)
        return cls(loaded.inference_model if adapted else loaded.model, resolved, **kwargs)

    @property
    def embedding_dim(self) -> int:
        return self.model.config.embedding_size

    @property
    def adaptation(self) -> Adaptation | None:
        """The backend adaptation the model applies, if any."""
        return self.model.adaptation if isinstance(self.model, AdaptedModel) else None

    @torch.inference_mode()
    def _forward(self, features: torch.Tensor) -> np.ndarray:
        return self.model(features.to(self.device)).float().cpu().numpy()
