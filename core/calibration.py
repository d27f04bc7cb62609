"""Calibration: verification scores turned into log-likelihood ratios, and what miscalibration costs.

A raw score (a cosine, or a PLDA LLR fitted on another domain) ranks trials, but its value says
nothing by itself: 0.42 may be strong evidence on one data set and none on another. Calibration
maps it to a log-likelihood ratio ``llr = log p(score | same) / p(score | different)``, which
means the same everywhere: at a prior ``P`` of a same-speaker trial the posterior log-odds are
``llr + logit(P)``, and the Bayes decision for costs ``C_miss`` and ``C_fa`` accepts when
``llr >= log(C_fa (1 - P) / (C_miss P))``.

The map is linear-logistic (Brümmer's FoCal): ``llr = a * score + b``, optionally plus a term in
the log-duration of the shorter side of the trial (quality-aware calibration: a short recording
gives a less reliable score, so a good map trusts it less; the shorter side limits the trial, and
an enrolled speaker, heard at length, counts as the longer side when its length is not known). It is fitted by minimising the
prior-weighted cross-entropy on trials of held-out speakers, the objective whose value at the
fitted map is Cllr.

Measures (Brümmer and du Preez, 2006):
- ``cllr``: the cost of the LLRs as given, in bits; 0 is perfect, 1 is a system that always says
  "no idea" (llr 0); above 1 the LLRs mislead.
- ``min_cllr``: the Cllr after the best monotonic recalibration of the same scores (pool adjacent
  violators): what discrimination alone allows. ``cllr - min_cllr`` is the calibration loss.
- ``act_dcf``: the normalised detection cost of the Bayes decisions the LLRs make at a prior and
  costs, next to the ``min_dcf`` of the best threshold chosen in hindsight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from spkft.core.errors import CheckpointError, EvaluationError

# Quality features are log-durations in seconds, floored here: a silent or empty side is not
# evidence of anything, and log(0) is not a number.
MIN_DURATION_SECONDS = 0.1
# The prior at which the map is trained: 0.5 weighs same- and different-speaker trials equally,
# whatever their counts (every application prior is then reached by adding its logit).
TRAINING_PRIOR = 0.5
MIN_TRIALS_PER_CLASS = 10


def log_expit(x: np.ndarray) -> np.ndarray:
    """``log(1 / (1 + exp(-x)))``, without overflow."""
    return -np.logaddexp(0.0, -x)


def expit(x: np.ndarray) -> np.ndarray:
    return np.exp(log_expit(x))


def logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def bayes_threshold(p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The LLR at and above which the Bayes decision at this prior and these costs accepts."""
    _check_operating_point(p_target, c_miss, c_fa)
    return float(np.log(c_fa) - np.log(c_miss) - logit(p_target))


def odds(llr: float) -> str:
    """The odds of the same speaker an LLR stands for: ``99:1`` for log(99), ``1:3`` below zero."""
    ratio = float(np.exp(llr))
    return f"{ratio:.3g}:1" if ratio >= 1 else f"1:{1 / ratio:.3g}"


def probability(llr: np.ndarray | float, p_target: float) -> np.ndarray | float:
    """The posterior probability of the same speaker, at prior ``p_target``."""
    return expit(np.asarray(llr, dtype=np.float64) + logit(p_target))


def _check_operating_point(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0.0 < p_target < 1.0:
        raise EvaluationError(f"the prior of a same-speaker trial must lie strictly between 0 and 1, got {p_target:g}")
    if not (c_miss > 0 and c_fa > 0) or not np.isfinite([c_miss, c_fa]).all():
        raise EvaluationError(f"the costs of a miss and a false alarm must be positive, got {c_miss:g} and {c_fa:g}")


def _check(llr: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    llr = np.asarray(llr, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if llr.shape != labels.shape or llr.ndim != 1:
        raise EvaluationError(f"{llr.shape} scores for {labels.shape} labels")
    if labels.all() or not labels.any():
        raise EvaluationError("calibration measures need both same- and different-speaker trials")
    if not np.isfinite(llr).all():
        raise EvaluationError("the scores hold NaN or infinite values")
    return llr, labels


def cllr(llr: np.ndarray, labels: np.ndarray) -> float:
    """The log-likelihood-ratio cost, in bits, of LLRs for trials with these labels."""
    llr, labels = _check(llr, labels)
    miss = -log_expit(llr[labels]).mean()
    false_alarm = -log_expit(-llr[~labels]).mean()
    return float((miss + false_alarm) / (2 * np.log(2)))


def min_cllr(scores: np.ndarray, labels: np.ndarray) -> float:
    """The Cllr of the best monotonic map of ``scores`` to LLRs (pool adjacent violators)."""
    from scipy.optimize import isotonic_regression

    scores, labels = _check(scores, labels)
    order = np.lexsort((~labels, scores))  # ties: different-speaker trials first, as the optimum sorts them
    posterior = np.clip(isotonic_regression(labels[order].astype(np.float64)).x, 1e-12, 1 - 1e-12)
    prior_log_odds = np.log(labels.mean()) - np.log1p(-labels.mean())
    optimal = np.empty_like(scores)
    optimal[order] = np.log(posterior) - np.log1p(-posterior) - prior_log_odds
    return cllr(optimal, labels)


def act_dcf(llr: np.ndarray, labels: np.ndarray, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The normalised detection cost of accepting where ``llr`` reaches the Bayes threshold."""
    llr, labels = _check(llr, labels)
    threshold = bayes_threshold(p_target, c_miss, c_fa)
    miss = float(np.mean(llr[labels] < threshold))
    false_alarm = float(np.mean(llr[~labels] >= threshold))
    cost = c_miss * p_target * miss + c_fa * (1 - p_target) * false_alarm
    return cost / min(c_miss * p_target, c_fa * (1 - p_target))


def quality_feature(enrol_seconds: np.ndarray | float | None, test_seconds: np.ndarray | float) -> np.ndarray:
    """The log-duration of each trial's shorter side; ``enrol_seconds`` None: an enrolled speaker of
    unknown length, taken as the longer side."""
    test = np.asarray(test_seconds, dtype=np.float64)
    shorter = test if enrol_seconds is None else np.minimum(np.asarray(enrol_seconds, dtype=np.float64), test)
    return np.log(np.maximum(shorter, MIN_DURATION_SECONDS))


@dataclass(frozen=True)
class Calibration:
    """``llr = scale * score + offset (+ quality * log seconds of the shorter side)``."""

    scale: float
    offset: float
    quality: float | None  # the weight of the shorter side's log-duration, when fitted with it
    scores: str  # what it maps: "cosine" or "plda"
    trials: int
    source: str = ""

    def llr(self, scores: np.ndarray | float, enrol_seconds: np.ndarray | float | None = None,
            test_seconds: np.ndarray | float | None = None) -> np.ndarray:
        """The LLRs of ``scores``; a calibration with a quality term needs the test side's duration
        (and the enrolment side's, unless it is an enrolled speaker of unknown length)."""
        out = self.scale * np.asarray(scores, dtype=np.float64) + self.offset
        if self.quality is not None:
            if test_seconds is None:
                raise EvaluationError("this calibration weighs speech durations: give the recordings' durations")
            out = out + self.quality * quality_feature(enrol_seconds, test_seconds)
        return out

    def describe(self) -> str:
        quality = " and the shorter side's duration" if self.quality is not None else ""
        return f"{self.scores} scores{quality} to LLRs, from {self.trials:,} trials"

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "offset": self.offset, "quality": self.quality,
                "scores": self.scores, "trials": self.trials, "source": self.source}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Calibration:
        try:
            quality = record.get("quality")
            calibration = cls(scale=float(record["scale"]), offset=float(record["offset"]),
                              quality=None if quality is None else float(quality),
                              scores=str(record["scores"]), trials=int(record["trials"]),
                              source=str(record.get("source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed calibration record ({exc})") from None
        values = [calibration.scale, calibration.offset, calibration.quality or 0.0]
        if not np.isfinite(values).all() or calibration.scale <= 0 or calibration.scores not in ("cosine", "plda"):
            raise CheckpointError("malformed calibration record (a non-finite or non-increasing map, "
                                  "or an unknown score kind)")
        return calibration


def fit_calibration(scores: np.ndarray, labels: np.ndarray, kind: str, enrol_seconds: np.ndarray | None = None,
                    test_seconds: np.ndarray | None = None, source: str = "") -> Calibration:
    """The linear-logistic map from ``scores`` (and, given both sides' durations, the shorter one's)
    to LLRs that minimises the cross-entropy at prior 0.5 on these trials."""
    from scipy.optimize import minimize

    scores, labels = _check(scores, labels)
    if min(labels.sum(), (~labels).sum()) < MIN_TRIALS_PER_CLASS:
        raise EvaluationError(f"calibration needs at least {MIN_TRIALS_PER_CLASS} same- and "
                              f"{MIN_TRIALS_PER_CLASS} different-speaker trials; got {int(labels.sum())} "
                              f"and {int((~labels).sum())}")
    with_quality = enrol_seconds is not None and test_seconds is not None
    columns = [scores, np.ones_like(scores)]
    if with_quality:
        columns.append(quality_feature(enrol_seconds, test_seconds))
    features = np.stack(columns, axis=1)
    # Standardise for the optimiser; the weights are mapped back after.
    spread = features.std(axis=0)
    spread[1] = 1.0
    spread[spread == 0] = 1.0
    shift = np.where(np.arange(features.shape[1]) == 1, 0.0, features.mean(axis=0))
    z = (features - shift) / spread
    z[:, 1] = 1.0
    sign = np.where(labels, 1.0, -1.0)
    weight = np.where(labels, TRAINING_PRIOR / labels.sum(), (1 - TRAINING_PRIOR) / (~labels).sum())
    prior_offset = logit(TRAINING_PRIOR)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        margin = sign * (z @ w + prior_offset)
        loss = -(weight * log_expit(margin)).sum()
        gradient = -(z.T @ (weight * sign * expit(-margin)))
        return float(loss), gradient

    result = minimize(objective, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B")
    w = result.x / spread
    offset = float(w[1] - (w * shift).sum())
    scale = float(w[0])
    if not np.isfinite(result.x).all() or scale <= 0:
        raise EvaluationError("the scores do not separate same- from different-speaker trials: no increasing "
                              "map to LLRs fits them")
    quality = float(w[2]) if with_quality else None
    return Calibration(scale=scale, offset=offset, quality=quality, scores=kind, trials=len(scores), source=source)
