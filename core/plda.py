"""PLDA scoring: a log-likelihood ratio between "same speaker" and "different speakers" for two embeddings.

The backend classic speaker-verification toolkits (Kaldi, WeSpeaker) put behind x-vectors, in
their order:

1. the embeddings are L2-normalised and centred on the training data's mean;
2. LDA projects them onto the ``dim`` directions that best separate the training speakers
   (their within-speaker covariance made the identity);
3. each is length-normalised to norm ``sqrt(dim)`` (Garcia-Romero and Espy-Wilson, 2011), which
   makes heavy-tailed embeddings behave like the Gaussians PLDA assumes;
4. a two-covariance PLDA (Brümmer and de Villiers, 2010; the model of Kaldi's ``ivector-compute-plda``)
   models a recording as ``x = y + e``: a speaker variable ``y ~ N(mean, B)`` shared by all of a
   speaker's recordings, plus ``e ~ N(0, W)`` drawn anew for each. It is fitted by EM.

Scoring happens in the space where ``W`` is the identity and ``B`` is diagonal (``psi``): one
transform diagonalises both. There the log-likelihood ratio of two recordings ``u`` and ``v``
separates, dimension by dimension, into a bilinear term and a term for each side::

    llr(u, v) = sum_i  cross_i * u_i * v_i + self_i * (u_i^2 + v_i^2)  + offset

with ``cross = psi / (1 + 2 psi)``, ``self = -psi^2 / (2 (1 + psi)(1 + 2 psi))`` and
``offset = sum 0.5 log((1 + psi)^2 / (1 + 2 psi))``. So scoring a query against a million
enrolled speakers stays one matrix product: each speaker's ``cross * v`` and ``self * v.v`` are
computed once, when it enrols (:meth:`Plda.enrolled_terms`).

**Unlabelled adaptation** (Kaldi's ``ivector-adapt-plda``): a PLDA trained on one domain is moved
toward another with recordings of it whose speakers are unknown. The model's mean becomes the
in-domain mean; in the space where the model's total covariance ``W + B`` is the identity, every
direction in which the in-domain recordings vary more than the model expects has its excess
variance added to the within-speaker (a ``within_scale`` share) and the between-speaker
(``between_scale``) covariances. Directions that vary less are left alone.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch

from spkft.core.errors import AdaptationError, CheckpointError
from spkft.core.scoring import l2_normalise

# LDA output dimensions at most (Kaldi's x-vector recipes use 150-200 of 512; here of 192).
DEFAULT_LDA_DIM = 128
# EM iterations of the two-covariance model; it has converged well before (Kaldi runs 10).
EM_ITERATIONS = 10
# Kaldi's defaults for unlabelled adaptation: excess variance goes 30 % to within-, 70 % to
# between-speaker covariance, and the in-domain mean's offset counts in full as variance.
WITHIN_SCALE = 0.3
BETWEEN_SCALE = 0.7
MEAN_DIFF_SCALE = 1.0
# Ridge added to the within-speaker scatter, as a fraction of its mean eigenvalue, before LDA
# inverts it: a few hundred recordings in 192 dimensions leave it nearly singular.
LDA_RIDGE = 1e-3
# PLDA needs speakers heard twice for its within-speaker covariance, and enough of them.
MIN_REPEATED_SPEAKERS = 2
MIN_SPEAKERS = 3
MIN_ADAPT_RECORDINGS = 10


@dataclass(frozen=True, eq=False)
class Plda:
    """A fitted PLDA backend: preprocessing (centre, LDA, length normalisation) and the model.

    ``centre`` ``[dim]`` and ``lda`` ``[dim, k]`` take an L2-normalised embedding to the model's
    space; ``mean`` ``[k]`` and ``transform`` ``[k, k]`` take that to the scoring space, where the
    within-speaker covariance is the identity and the between-speaker one is ``diag(psi)``.
    """

    centre: np.ndarray
    lda: np.ndarray
    mean: np.ndarray
    transform: np.ndarray
    psi: np.ndarray
    recordings: int
    speakers: int
    source: str = ""
    adapted_recordings: int = 0  # unlabelled in-domain recordings it was adapted with (0: not adapted)
    adapted_source: str = ""

    def __post_init__(self) -> None:
        dim, k = self.lda.shape
        if self.centre.shape != (dim,) or self.mean.shape != (k,) or self.transform.shape != (k, k) \
                or self.psi.shape != (k,):
            raise ValueError(f"PLDA parts of shapes {self.centre.shape}, {self.lda.shape}, {self.mean.shape}, "
                             f"{self.transform.shape}, {self.psi.shape} do not fit together")
        if (self.psi < 0).any():
            raise ValueError("PLDA between-speaker variances must be non-negative")

    @property
    def input_dim(self) -> int:
        return self.lda.shape[0]

    @property
    def dim(self) -> int:
        return self.lda.shape[1]

    def describe(self) -> str:
        """``plda (128 dims) on 1171 recordings of 289 speakers, adapted on 317 unlabelled recordings``."""
        adapted = f", adapted on {self.adapted_recordings} unlabelled recordings" if self.adapted_recordings else ""
        return f"plda ({self.dim} dims) on {self.recordings} recordings of {self.speakers} speakers{adapted}"

    # ------------------------------------------------------------------------------- scoring
    def preprocess(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings ``[..., input_dim]`` in the model's space: centred, LDA-projected, length-normalised."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"embeddings of dimension {x.shape[-1]}; this PLDA is for {self.input_dim}")
        return length_normalise((l2_normalise(x) - self.centre) @ self.lda)

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Embeddings ``[..., input_dim]`` in the scoring space ``[..., dim]``."""
        return (self.preprocess(embeddings) - self.mean) @ self.transform.T

    @property
    def cross(self) -> np.ndarray:
        return self.psi / (1.0 + 2.0 * self.psi)

    @property
    def self_weight(self) -> np.ndarray:
        return -self.psi ** 2 / (2.0 * (1.0 + self.psi) * (1.0 + 2.0 * self.psi))

    @property
    def offset(self) -> float:
        return float(np.sum(0.5 * np.log((1.0 + self.psi) ** 2 / (1.0 + 2.0 * self.psi))))

    def side_terms(self, projected: np.ndarray) -> np.ndarray:
        """Each projected vector's own term, ``sum self_i * u_i^2``."""
        return (projected ** 2) @ self.self_weight

    def llr(self, enrol: np.ndarray, test: np.ndarray) -> np.ndarray:
        """The log-likelihood ratio of each row pair of embeddings ``[n, input_dim]`` (same shape)."""
        u, v = self.project(enrol), self.project(test)
        return np.einsum("ij,ij->i", u * self.cross, v) + self.side_terms(u) + self.side_terms(v) + self.offset

    def llr_matrix(self, enrol: np.ndarray, test: np.ndarray) -> np.ndarray:
        """The log-likelihood ratio of every pair: ``[n_enrol, n_test]``."""
        weights, terms = self.enrolled_terms(enrol)
        u = self.project(test)
        return weights @ u.T + terms[:, None] + self.side_terms(u)[None, :]

    def enrolled_terms(self, enrolled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What scoring against ``enrolled`` ``[speakers, input_dim]`` needs of them, computed once:
        ``(weights [speakers, dim], terms [speakers])``; a query's LLRs are then
        ``weights @ query_terms(q)[0] + terms + query_terms(q)[1]``.

        Computed in float32, as the search index keeps them: building the index of a million
        speakers takes half the time it would in float64.
        """
        centre, lda, mean, transform, cross, self_weight = self._float32
        x = l2_normalise(np.asarray(enrolled, dtype=np.float32))
        v = (length_normalise((x - centre) @ lda) - mean) @ transform.T
        terms = (v * v) @ self_weight + np.float32(self.offset)
        return v * cross, terms

    @functools.cached_property
    def _float32(self) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(a, dtype=np.float32) for a in
                     (self.centre, self.lda, self.mean, self.transform, self.cross, self.self_weight))

    def query_terms(self, query: np.ndarray) -> tuple[np.ndarray, float]:
        """A query embedding ``[input_dim]`` as scoring needs it: ``(projected [dim], its own term)``."""
        u = self.project(query[None, :])[0]
        return u.astype(np.float32), float(self.side_terms(u[None, :])[0])

    # ------------------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """A checkpoint entry of tensors and plain values (``torch.load(weights_only=True)`` reads it)."""
        tensors = {name: torch.from_numpy(np.ascontiguousarray(getattr(self, name), dtype=np.float64))
                   for name in _ARRAYS}
        return tensors | {"method": "plda", "recordings": self.recordings, "speakers": self.speakers,
                          "source": self.source, "adapted_recordings": self.adapted_recordings,
                          "adapted_source": self.adapted_source}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Plda:
        try:
            arrays = {}
            for name in _ARRAYS:
                value = record[name]
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{name} must be a tensor")
                arrays[name] = value.detach().cpu().numpy().astype(np.float64)
                if not np.isfinite(arrays[name]).all():
                    raise ValueError(f"{name} holds NaN or infinite values")
            return cls(**arrays, recordings=int(record["recordings"]), speakers=int(record["speakers"]),
                       source=str(record.get("source", "")),
                       adapted_recordings=int(record.get("adapted_recordings", 0)),
                       adapted_source=str(record.get("adapted_source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed PLDA record ({exc})") from None


def score_kind(plda: Plda | None) -> str:
    """What a model's scores are: ``cosine`` similarities, or ``plda`` log-likelihood ratios when it carries one."""
    return "cosine" if plda is None else "plda"


def plda_to_json(plda: Plda) -> str:
    """The PLDA as one JSON string (arrays as base64 of little-endian float64): ONNX metadata holds only strings."""
    record = {name: value for name, value in plda.to_dict().items() if not isinstance(value, torch.Tensor)}
    for name in _ARRAYS:
        array = np.ascontiguousarray(getattr(plda, name), dtype="<f8")
        record[name] = {"shape": list(array.shape), "float64": base64.b64encode(array.tobytes()).decode("ascii")}
    return json.dumps(record, sort_keys=True)


def plda_from_json(text: str) -> Plda:
    """The PLDA :func:`plda_to_json` wrote; :class:`CheckpointError` when it is malformed."""
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise TypeError("not a JSON object")
        for name in _ARRAYS:
            entry = record[name]
            shape = tuple(int(n) for n in entry["shape"])
            raw = base64.b64decode(entry["float64"], validate=True)
            if len(shape) > 2 or any(n < 1 or n > 65536 for n in shape) or len(raw) != 8 * int(np.prod(shape)):
                raise ValueError(f"{name}: {len(raw)} bytes do not make an array of shape {shape}")
            record[name] = torch.from_numpy(np.frombuffer(raw, dtype="<f8").reshape(shape).copy())
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"malformed PLDA record ({exc})") from None
    return Plda.from_dict(record)


_ARRAYS = ("centre", "lda", "mean", "transform", "psi")


def length_normalise(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to norm ``sqrt(dim)`` along its last axis: unit variance per dimension on average."""
    return l2_normalise(x) * math.sqrt(x.shape[-1])  # a Python float keeps float32 input in float32


# ------------------------------------------------------------------------------------ fitting
def _groups(speakers: Sequence[str]) -> list[np.ndarray]:
    rows: dict[str, list[int]] = {}
    for row, speaker in enumerate(speakers):
        rows.setdefault(speaker, []).append(row)
    return [np.asarray(members) for members in rows.values()]


def plda_shortfall(recordings: int, speakers: Sequence[str] | None) -> str | None:
    """Why PLDA cannot be fitted on these recordings and labels, or None if it can."""
    if speakers is None:
        return "no speaker labels (PLDA learns from recordings of known speakers; --adapt-data takes unlabelled ones)"
    counts = [len(g) for g in _groups(speakers)]
    if len(counts) < MIN_SPEAKERS:
        return f"{len(counts)} speaker(s), at least {MIN_SPEAKERS} needed"
    repeated = sum(1 for n in counts if n >= 2)
    if repeated < MIN_REPEATED_SPEAKERS:
        return f"{repeated} speaker(s) with 2 or more recordings, at least {MIN_REPEATED_SPEAKERS} needed"
    return None


def fit_lda(x: np.ndarray, speakers: Sequence[str], dim: int) -> np.ndarray:
    """The ``[input_dim, dim]`` LDA projection of centred rows ``x``: the directions of the largest
    between- to within-speaker variance ratio, scaled so the within-speaker covariance is the identity."""
    groups = _groups(speakers)
    within = np.zeros((x.shape[1], x.shape[1]))
    between = np.zeros_like(within)
    degrees = 0
    for members in groups:
        mean = x[members].mean(axis=0)
        deviations = x[members] - mean
        within += deviations.T @ deviations
        between += len(members) * np.outer(mean, mean)
        degrees += len(members) - 1
    within /= max(degrees, 1)
    between /= len(x)
    within += LDA_RIDGE * np.trace(within) / len(within) * np.eye(len(within))
    # Generalised eigenproblem between v = lambda within v, through within's inverse square root.
    values, vectors = np.linalg.eigh(within)
    inv_sqrt = (vectors / np.sqrt(values)) @ vectors.T
    ratios, directions = np.linalg.eigh(inv_sqrt @ between @ inv_sqrt)
    order = np.argsort(ratios)[::-1][:dim]
    return inv_sqrt @ directions[:, order]


def fit_two_covariance(x: np.ndarray, speakers: Sequence[str], iterations: int = EM_ITERATIONS
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, between, within)`` of the two-covariance model fitted by EM to rows ``x`` ``[n, k]``.

    Starts from the moment estimates (covariance of the speakers' means, pooled within-speaker
    covariance); each iteration infers every speaker's variable given its recordings and
    re-estimates the three parameters (speakers with one recording inform the mean and ``between``).
    """
    groups = _groups(speakers)
    n, k = x.shape
    sums = np.stack([x[g].sum(axis=0) for g in groups])
    counts = np.array([len(g) for g in groups])
    scatter = x.T @ x
    means = sums / counts[:, None]
    mean = means.mean(axis=0)
    between = np.cov(means, rowvar=False, bias=True) + 1e-6 * np.eye(k)
    within = sum(((x[g] - x[g].mean(axis=0)).T @ (x[g] - x[g].mean(axis=0)) for g in groups), np.zeros((k, k)))
    within = within / max(n - len(groups), 1) + 1e-6 * np.eye(k)
    for _ in range(iterations):
        between_inv, within_inv = np.linalg.inv(between), np.linalg.inv(within)
        posterior_mean = np.empty_like(sums)
        posterior_second = np.zeros((k, k))  # sum over speakers of E[y y^T]
        weighted_second = np.zeros((k, k))  # the same, each speaker weighted by its recordings
        for count in np.unique(counts):
            rows = np.flatnonzero(counts == count)
            covariance = np.linalg.inv(between_inv + count * within_inv)
            posterior_mean[rows] = (between_inv @ mean + sums[rows] @ within_inv) @ covariance
            outer = posterior_mean[rows].T @ posterior_mean[rows]
            posterior_second += outer + len(rows) * covariance
            weighted_second += count * (outer + len(rows) * covariance)
        mean = posterior_mean.mean(axis=0)
        between = posterior_second / len(groups) - np.outer(mean, mean)
        cross = sums.T @ posterior_mean
        within = (scatter - cross - cross.T + weighted_second) / n
        between, within = (between + between.T) / 2, (within + within.T) / 2
    return mean, between, within


def _diagonalise(between: np.ndarray, within: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(transform, psi)``: ``transform @ within @ transform.T = I`` and ``transform @ between @ transform.T = diag(psi)``."""
    values, vectors = np.linalg.eigh(within)
    if values[0] <= 1e-12 * values[-1]:
        raise AdaptationError("the within-speaker covariance is singular: the recordings of each speaker do not vary")
    inv_sqrt = (vectors / np.sqrt(values)) @ vectors.T
    psi, rotation = np.linalg.eigh(inv_sqrt @ between @ inv_sqrt)
    order = np.argsort(psi)[::-1]
    return rotation[:, order].T @ inv_sqrt, np.maximum(psi[order], 0.0)


def fit_plda(embeddings: np.ndarray, speakers: Sequence[str] | None, lda_dim: int = DEFAULT_LDA_DIM,
             source: str = "") -> Plda:
    """A PLDA backend fitted on labelled embeddings ``[n, input_dim]``.

    The LDA keeps ``min(lda_dim, speakers - 1, input_dim)`` dimensions: LDA finds at most one
    direction fewer than there are speakers.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected embeddings [n, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AdaptationError("the embeddings hold NaN or infinite values")
    problem = plda_shortfall(len(x), speakers)
    if problem is not None:
        raise AdaptationError(f"cannot fit plda: {problem}")
    if len(speakers) != len(x):
        raise ValueError(f"{len(speakers)} speaker labels for {len(x)} embeddings")
    if lda_dim < 1:
        raise AdaptationError(f"the LDA dimension must be at least 1, got {lda_dim}")
    x = l2_normalise(x)
    centre = x.mean(axis=0)
    dim = min(lda_dim, len(set(speakers)) - 1, x.shape[1])
    lda = fit_lda(x - centre, speakers, dim)
    y = length_normalise((x - centre) @ lda)
    mean, between, within = fit_two_covariance(y, speakers)
    transform, psi = _diagonalise(between, within)
    return Plda(centre=centre, lda=lda, mean=mean, transform=transform, psi=psi, recordings=len(x),
                speakers=len(set(speakers)), source=source)


def adapt_plda(plda: Plda, embeddings: np.ndarray, source: str = "", within_scale: float = WITHIN_SCALE,
               between_scale: float = BETWEEN_SCALE, mean_diff_scale: float = MEAN_DIFF_SCALE) -> Plda:
    """``plda`` adapted toward the domain of unlabelled embeddings ``[n, input_dim]`` (see the module)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != plda.input_dim:
        raise ValueError(f"expected embeddings [n, {plda.input_dim}], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AdaptationError("the in-domain embeddings hold NaN or infinite values")
    if len(x) < MIN_ADAPT_RECORDINGS:
        raise AdaptationError(f"cannot adapt plda: {len(x)} in-domain recording(s), at least "
                              f"{MIN_ADAPT_RECORDINGS} needed")
    y = plda.preprocess(x)
    mean = y.mean(axis=0)
    offset = mean - plda.mean
    variance = np.cov(y, rowvar=False, bias=True) + mean_diff_scale * np.outer(offset, offset)
    # The space where the model's total covariance (I + diag(psi) in scoring space) is the identity.
    total_inv_sqrt = plda.transform / np.sqrt(1.0 + plda.psi)[:, None]
    values, directions = np.linalg.eigh(total_inv_sqrt @ variance @ total_inv_sqrt.T)
    # The model's covariances in that space, turned to the in-domain variance's eigenbasis.
    within = directions.T @ np.diag(1.0 / (1.0 + plda.psi)) @ directions
    between = directions.T @ np.diag(plda.psi / (1.0 + plda.psi)) @ directions
    excess = np.maximum(values - 1.0, 0.0)
    within += np.diag(within_scale * excess)
    between += np.diag(between_scale * excess)
    # Back to the model's space, then diagonalised afresh.
    back = np.linalg.inv(directions.T @ total_inv_sqrt)
    transform, psi = _diagonalise(back @ between @ back.T, back @ within @ back.T)
    return replace(plda, mean=mean, transform=transform, psi=psi, adapted_recordings=len(x), adapted_source=source)
