"""Cosine scoring of verification trials, and adaptive symmetric score normalisation (AS-norm).

Embeddings come in L2-normalised (as :class:`spkft.core.embedding.Embedder` returns them), so a
dot product is the cosine score; vectors far from unit length are refused rather than
silently mis-scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from spkft.core.errors import EvaluationError
from spkft.core.records import Trial

# Rows of a score matrix computed at once: bounds the temporary memory to about
# _CHUNK_ELEMENTS floats, whatever the number of trials or the size of the cohort.
_CHUNK_ELEMENTS = 1 << 22
_UNIT_NORM_TOLERANCE = 1e-3


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit length along its last axis (a zero vector stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _check_unit_norm(vectors: np.ndarray, what: str) -> None:
    norms = np.linalg.norm(vectors, axis=1)
    off = np.flatnonzero(np.abs(norms - 1.0) > _UNIT_NORM_TOLERANCE)
    if len(off):
        raise EvaluationError(
            f"{len(off)} {what} are not L2-normalised (e.g. norm {norms[off[0]]:.4g}); "
            "normalise embeddings before scoring"
        )


def _index_trials(
    embeddings: Mapping[str, np.ndarray], trials: Sequence[Trial]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vectors, enrol_rows, test_rows)``: each utterance the trials use, stacked once."""
    if not trials:
        raise EvaluationError("no trials to score")
    rows: dict[str, int] = {}
    enrol_rows = np.fromiter((rows.setdefault(t.enrol, len(rows)) for t in trials), np.int64, len(trials))
    test_rows = np.fromiter((rows.setdefault(t.test, len(rows)) for t in trials), np.int64, len(trials))
    missing = [utt for utt in rows if utt not in embeddings]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise EvaluationError(f"{len(missing)} utterances in the trials have no embedding: {shown}")
    vectors = np.stack([np.asarray(embeddings[utt], dtype=np.float32) for utt in rows])
    if vectors.ndim != 2:
        raise EvaluationError(f"embeddings must be 1-D vectors of one size, got shape {vectors.shape[1:]}")
    _check_unit_norm(vectors, "embeddings")
    return vectors, enrol_rows, test_rows


def _rowwise_dot(vectors: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    step = max(1, _CHUNK_ELEMENTS // vectors.shape[1])
    out = np.empty(len(left), dtype=np.float64)
    for i in range(0, len(left), step):
        out[i : i + step] = np.einsum("ij,ij->i", vectors[left[i : i + step]], vectors[right[i : i + step]])
    return out


def trial_labels(trials: Sequence[Trial]) -> np.ndarray:
    """The trials' labels as a boolean array, True for target trials."""
    return np.fromiter((t.target for t in trials), bool, len(trials))


def score_trials(embeddings: Mapping[str, np.ndarray], trials: Sequence[Trial]) -> np.ndarray:
    """The cosine score of each trial, in trial order, from L2-normalised embeddings by utt_id."""
    vectors, enrol_rows, test_rows = _index_trials(embeddings, trials)
    # Rounding can carry a dot product of unit vectors just past +-1.
    return np.clip(_rowwise_dot(vectors, enrol_rows, test_rows), -1.0, 1.0)


def cohort_statistics(vectors: np.ndarray, cohort: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` of each vector's ``top_k`` highest cosine scores against the cohort.

    ``vectors`` is ``[n, dim]`` and ``cohort`` ``[speakers, dim]``, both L2-normalised; ``std`` is
    the population standard deviation (``ddof=0``); ``top_k`` beyond the cohort's size uses all of it.
    """
    cohort = np.asarray(cohort, dtype=np.float32)
    if top_k < 2:
        raise EvaluationError(f"AS-norm needs top_k >= 2 to estimate a standard deviation, got {top_k}")
    if cohort.ndim != 2 or len(cohort) < 2:
        raise EvaluationError(f"the cohort must be a [speakers >= 2, dim] matrix, got shape {cohort.shape}")
    if cohort.shape[1] != vectors.shape[1]:
        raise EvaluationError(f"cohort vectors have {cohort.shape[1]} dimensions, embeddings {vectors.shape[1]}")
    _check_unit_norm(cohort, "cohort vectors")
    top_k = min(top_k, len(cohort))
    mean = np.empty(len(vectors), dtype=np.float64)
    std = np.empty(len(vectors), dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // len(cohort))
    for i in range(0, len(vectors), step):
        cohort_scores = vectors[i : i + step] @ cohort.T
        # Only the k best matter, and their order does not: partition instead of sorting.
        top = np.partition(cohort_scores, len(cohort) - top_k, axis=1)[:, len(cohort) - top_k :]
        mean[i : i + step] = top.mean(axis=1)
        std[i : i + step] = top.std(axis=1)
    return mean, std


def as_norm(
    scores: np.ndarray,
    embeddings: Mapping[str, np.ndarray],
    trials: Sequence[Trial],
    cohort: np.ndarray,
    top_k: int = 300,
) -> np.ndarray:
    """Adaptive symmetric normalisation (AS-norm, Matějka et al., Interspeech 2017) of ``scores``.

    For each trial, the enrolment and the test embedding are scored against ``cohort``
    (``[speakers, dim]``, L2-normalised, typically one mean embedding per training speaker that
    appears in no trial) and the ``top_k`` highest of those scores give a mean and standard
    deviation; then ``s' = ((s - mean_e) / std_e + (s - mean_t) / std_t) / 2``. ``top_k`` larger
    than the cohort uses the whole cohort; ``scores`` are the trials' cosine scores
    (:func:`score_trials`), in trial order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(trials),):
        raise EvaluationError(f"{len(trials)} trials but scores of shape {scores.shape}")
    vectors, enrol_rows, test_rows = _index_trials(embeddings, trials)
    mean, std = cohort_statistics(vectors, cohort, top_k)
    # A cohort whose top scores are all equal has no spread to divide by; keep it finite.
    std = np.maximum(std, np.finfo(np.float32).eps)
    return 0.5 * ((scores - mean[enrol_rows]) / std[enrol_rows] + (scores - mean[test_rows]) / std[test_rows])
