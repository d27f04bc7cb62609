"""Backend adaptation: a transform of the embedding space fitted on in-domain embeddings, no retraining.

A network trained on one domain (read audiobooks, say) places another domain's recordings
(telephone calls, another language) off-centre and stretched along directions that carry the
domain rather than the speaker. The speaker-verification back end has three cheap remedies,
each fitted on the L2-normalised embeddings of in-domain recordings:

- ``center``: subtract the domain's mean embedding;
- ``whiten`` (no labels needed): centre, then multiply by the inverse square root of the total
  covariance, so that the domain varies alike in every direction;
- ``wccn`` (speaker labels needed): centre, then multiply by the inverse square root of the
  within-speaker covariance (within-class covariance normalisation, Hatch et al., 2006), so that
  directions in which one speaker's recordings differ from each other count less. This is the
  whitening step of LDA without LDA's projection onto fewer dimensions: the ONNX model and the
  gRPC API promise a 192-dim embedding, so every method keeps every dimension.

Each ends by L2-normalising, and the output has the input's dimension. A fitted transform is
applied as ``l2norm((l2norm(embedding) - mean) @ transform)``. :class:`AdaptedModel` puts all
but the final normalisation (which every embedder already does) behind the network, so PyTorch,
the ONNX export and the server compute the same thing. A recording long enough to be embedded in
windows is adapted window by window, before the windows are averaged, wherever it is embedded.

Covariances are shrunk toward a scaled identity, ``(1 - s) C + s (trace(C) / dim) I``: an
in-domain set may be a few hundred recordings of 192 dimensions, whose sample covariance has
near-zero eigenvalues that an inverse square root would blow up into noise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spkft.core.errors import AdaptationError, CheckpointError
from spkft.core.scoring import l2_normalise

METHODS = ("center", "whiten", "wccn")
AUTO = "auto"
# A fifth of the mean eigenvalue: with a few hundred recordings in 192 dimensions the smallest
# sample eigenvalues are many times too small (Marchenko-Pastur), and without shrinkage the
# inverse square root stretches those noise directions the most. A floor of 0.2 of the mean
# stretches no direction more than sqrt(5) ~ 2.2 times an average one, while the dominant
# directions the domain adds, often ten or more times the mean, are still pulled in.
DEFAULT_SHRINKAGE = 0.2
# Below ten recordings a "domain mean" is mostly the few speakers in them.
MIN_MEAN_RECORDINGS = 10
# A covariance's leading directions need a few dozen samples before they are the domain's and
# not sampling noise: whiten needs this many recordings, wccn this many within-speaker degrees
# of freedom (recordings of speakers heard at least twice, minus the number of those speakers).
MIN_COVARIANCE_SAMPLES = 50
# Eigenvalues below this fraction of the largest make a covariance singular for our purpose.
_SINGULAR_RATIO = 1e-9

EFFECTS = {
    "center": "center removes the domain's mean embedding",
    "whiten": "whiten evens out the domain's variation across directions",
    "wccn": "wccn suppresses within-speaker variation",
}


@dataclass(frozen=True, eq=False)
class Adaptation:
    """A fitted backend adaptation: ``l2norm((l2norm(x) - mean) @ transform)``.

    ``transform`` is symmetric (the identity for ``center``); ``speakers`` is None when the
    recordings it was fitted on had no labels (or they were ignored).
    """

    method: str
    mean: np.ndarray  # [dim] float32
    transform: np.ndarray  # [dim, dim] float32
    recordings: int
    speakers: int | None
    shrinkage: float
    source: str = ""  # a short description of the data it was fitted on

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown adaptation method {self.method!r}; one of {', '.join(METHODS)}")
        if self.mean.ndim != 1 or self.transform.shape != (self.dim, self.dim):
            raise ValueError(f"mean {self.mean.shape} and transform {self.transform.shape} do not fit together")
        if self.mean.dtype != np.float32 or self.transform.dtype != np.float32:
            raise ValueError("an adaptation's mean and transform are float32")

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def describe(self) -> str:
        """``wccn on 318 recordings of 6 speakers``."""
        of = "" if self.speakers is None else f" of {self.speakers} speakers"
        return f"{self.method} on {self.recordings} recordings{of}"

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """The adapted, L2-normalised embeddings ``[..., dim]`` (float32) of embeddings ``[..., dim]``."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.shape[-1] != self.dim:
            raise ValueError(f"embeddings of dimension {x.shape[-1]}; this adaptation is for {self.dim}")
        return l2_normalise((l2_normalise(x) - self.mean) @ self.transform).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """A checkpoint entry: tensors and plain values only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "method": self.method,
            "mean": torch.from_numpy(self.mean.copy()),
            "transform": torch.from_numpy(self.transform.copy()),
            "recordings": self.recordings,
            "speakers": self.speakers,
            "shrinkage": self.shrinkage,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Adaptation:
        """The adaptation a checkpoint entry written by :meth:`to_dict` holds."""
        try:
            mean, transform = record["mean"], record["transform"]
            if not isinstance(mean, torch.Tensor) or not isinstance(transform, torch.Tensor):
                raise TypeError("mean and transform must be tensors")
            speakers = record["speakers"]
            return cls(
                method=str(record["method"]),
                mean=mean.detach().cpu().numpy().astype(np.float32),
                transform=transform.detach().cpu().numpy().astype(np.float32),
                recordings=int(record["recordings"]),
                speakers=None if speakers is None else int(speakers),
                shrinkage=float(record["shrinkage"]),
                source=str(record.get("source", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed adaptation record ({exc})") from None


def _within_counts(speakers: Sequence[str]) -> tuple[int, int]:
    """Speakers with at least two recordings, and their recordings minus their number."""
    repeated = [n for n in Counter(speakers).values() if n >= 2]
    return len(repeated), sum(repeated) - len(repeated)


def shortfall(method: str, recordings: int, speakers: Sequence[str] | None) -> str | None:
    """Why ``method`` cannot be fitted on this many recordings with these labels, or None if it can."""
    if recordings < MIN_MEAN_RECORDINGS:
        return f"{recordings} recording(s), at least {MIN_MEAN_RECORDINGS} needed"
    if method == "whiten" and recordings < MIN_COVARIANCE_SAMPLES:
        return f"{recordings} recordings, at least {MIN_COVARIANCE_SAMPLES} needed to estimate a covariance"
    if method == "wccn":
        if speakers is None:
            return "no speaker labels"
        repeated, within = _within_counts(speakers)
        if repeated < 2:
            return f"{repeated} speaker(s) with 2 or more recordings, at least 2 needed"
        if within < MIN_COVARIANCE_SAMPLES:
            return (f"{within} within-speaker degrees of freedom (recordings of speakers heard twice or more, "
                    f"minus those speakers), at least {MIN_COVARIANCE_SAMPLES} needed")
    return None


def choose_method(recordings: int, speakers: Sequence[str] | None) -> tuple[str, str]:
    """``auto``: the strongest method the data supports, and a one-line reason.

    wccn when labels give enough within-speaker variation, else whiten when there are enough
    recordings for a covariance, else center.
    """
    no_wccn = shortfall("wccn", recordings, speakers)
    if no_wccn is None:
        return "wccn", f"labels: {EFFECTS['wccn']}"
    if shortfall("whiten", recordings, speakers) is None:
        why = "no labels" if speakers is None else f"labels too few for wccn ({no_wccn})"
        return "whiten", f"{why}: {EFFECTS['whiten']}"
    too_few = shortfall("center", recordings, speakers)
    if too_few is not None:
        raise AdaptationError(f"cannot fit an adaptation: {too_few}")
    why = f"too few recordings for a covariance ({recordings}, {MIN_COVARIANCE_SAMPLES} needed)"
    return "center", f"{why}: {EFFECTS['center']}"


def resolve_method(method: str, recordings: int, speakers: Sequence[str] | None) -> tuple[str, str]:
    """The method to fit and a one-line reason; an error when an explicit method cannot be fitted.

    Needs only counts and labels, so callers can check before embedding anything.
    """
    if method == AUTO:
        return choose_method(recordings, speakers)
    if method not in METHODS:
        raise AdaptationError(f"unknown adaptation method {method!r}; choose {AUTO} or one of {', '.join(METHODS)}")
    problem = shortfall(method, recordings, speakers)
    if problem is not None:
        raise AdaptationError(f"cannot fit {method}: {problem} (method auto picks what the data supports)")
    return method, f"asked for: {EFFECTS[method]}"


def check_shrinkage(shrinkage: float) -> None:
    """An error unless ``shrinkage`` lies in [0, 1]."""
    if not 0.0 <= shrinkage <= 1.0:
        raise AdaptationError(f"shrinkage must lie in [0, 1], got {shrinkage:g}")


def fit_adaptation(
    embeddings: np.ndarray,
    speakers: Sequence[str] | None = None,
    method: str = AUTO,
    shrinkage: float = DEFAULT_SHRINKAGE,
    source: str = "",
) -> tuple[Adaptation, str]:
    """Fit ``method`` (or, for ``auto``, the one :func:`choose_method` picks) on embeddings ``[n, dim]``.

    ``speakers`` labels each row (None when unknown); ``shrinkage`` in [0, 1] is the weight of
    the scaled identity in the shrunk covariance (0: none; 1: whiten and wccn become center).
    Returns the adaptation and a one-line reason for the method.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected embeddings [n, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AdaptationError("the embeddings hold NaN or infinite values")
    if speakers is not None and len(speakers) != len(x):
        raise ValueError(f"{len(speakers)} speaker labels for {len(x)} embeddings")
    check_shrinkage(shrinkage)
    method, reason = resolve_method(method, len(x), speakers)

    x = l2_normalise(x)
    mean = x.mean(axis=0)
    if method == "center":
        transform = np.eye(x.shape[1])
    elif method == "whiten":
        centred = x - mean
        transform = _inverse_sqrt(centred.T @ centred / (len(x) - 1), shrinkage, "total")
    else:
        transform = _inverse_sqrt(_within_covariance(x, speakers), shrinkage, "within-speaker")
    adaptation = Adaptation(
        method=method,
        mean=mean.astype(np.float32),
        transform=transform.astype(np.float32),
        recordings=len(x),
        speakers=None if speakers is None else len(set(speakers)),
        shrinkage=float(shrinkage),
        source=source,
    )
    return adaptation, reason


def _within_covariance(x: np.ndarray, speakers: Sequence[str]) -> np.ndarray:
    """The pooled within-speaker covariance of the speakers heard at least twice.

    Pooled over recordings (each speaker weighs by its recordings, as Kaldi's LDA estimates it),
    rather than Hatch et al.'s mean of per-speaker covariances: with uneven speakers, a speaker's
    few recordings would otherwise weigh as much as another's hundred.
    """
    rows: dict[str, list[int]] = {}
    for row, speaker in enumerate(speakers):
        rows.setdefault(speaker, []).append(row)
    scatter = np.zeros((x.shape[1], x.shape[1]))
    degrees = 0
    for members in rows.values():
        if len(members) < 2:
            continue
        deviations = x[members] - x[members].mean(axis=0)
        scatter += deviations.T @ deviations
        degrees += len(members) - 1
    return scatter / degrees


def _inverse_sqrt(covariance: np.ndarray, shrinkage: float, what: str) -> np.ndarray:
    """The symmetric inverse square root of the shrunk covariance, scaled by the root of its mean eigenvalue.

    The scale leaves cosine scores unchanged; it keeps adapted vectors at the input's scale and
    makes the transform exactly the identity at shrinkage 1.
    """
    dim = covariance.shape[0]
    mean_eigenvalue = np.trace(covariance) / dim
    if mean_eigenvalue <= 0:
        raise AdaptationError(f"the embeddings do not vary: their {what} covariance is zero")
    shrunk = (1.0 - shrinkage) * covariance + shrinkage * mean_eigenvalue * np.eye(dim)
    eigenvalues, eigenvectors = np.linalg.eigh(shrunk)
    if eigenvalues[0] <= _SINGULAR_RATIO * eigenvalues[-1]:
        rank = int(np.sum(eigenvalues > _SINGULAR_RATIO * eigenvalues[-1]))
        raise AdaptationError(f"the {what} covariance is singular (rank {rank} of {dim}); "
                              "use a shrinkage above 0")
    return (eigenvectors * np.sqrt(mean_eigenvalue / eigenvalues)) @ eigenvectors.T


class AdaptedModel(nn.Module):
    """An embedding model followed by its adaptation: ``(l2norm(model(x)) - mean) @ transform``.

    Traced into the ONNX graph as is; exposes the inner model's ``config`` so it stands in for
    the bare model wherever embeddings are made.
    """

    def __init__(self, model: nn.Module, adaptation: Adaptation) -> None:
        super().__init__()
        if adaptation.dim != model.config.embedding_size:
            raise CheckpointError(f"the adaptation is for {adaptation.dim}-dim embeddings; "
                                  f"the model makes {model.config.embedding_size}-dim ones")
        self.model = model
        self.adaptation = adaptation
        self.register_buffer("mean", torch.from_numpy(adaptation.mean.copy()))
        self.register_buffer("transform", torch.from_numpy(adaptation.transform.copy()))

    @property
    def config(self):
        return self.model.config

    @property
    def embedding_size(self) -> int:
        return self.model.config.embedding_size

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        embedding = F.normalize(self.model(feature), dim=-1)
        return (embedding - self.mean) @ self.transform
