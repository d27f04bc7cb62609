"""Speaker-verification metrics: EER, minimum DCF, thresholds at a false-accept rate, accuracy.

Conventions used throughout:
- a trial is accepted when its score is ``>= threshold``;
- FAR (false accept rate) is the fraction of non-target trials accepted, FRR (false reject
  rate, the NIST "miss" rate) the fraction of target trials rejected;
- the operating points are every distinct score used as the threshold, in ascending order, plus
  one past the highest score that rejects everything. Its threshold is the next float above the
  highest score, so every threshold stays finite (and JSON-writable). Tied scores are always
  accepted or rejected together, whatever their labels.

EER: FRR rises and FAR falls along the operating points. Between the last point where
FRR < FAR and the first where FRR >= FAR, both rates are joined by straight lines (the ROC
segment between the two points, which a decision randomised between the two thresholds
achieves) and the EER is where those lines cross; its threshold is interpolated between the
two thresholds by the same fraction. This is 3D-Speaker's convention; unlike BOSARIS's
ROCCH-EER it takes no convex hull.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from spkft.core.errors import EvaluationError


@dataclass(frozen=True)
class _OperatingPoints:
    thresholds: np.ndarray  # ascending
    far: np.ndarray  # non-increasing
    frr: np.ndarray  # non-decreasing
    target_trials: int
    nontarget_trials: int


def _check_trials(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1 or len(scores) != len(labels):
        raise EvaluationError(
            f"scores and labels must be 1-D and equally long, got shapes {scores.shape} and {labels.shape}"
        )
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise EvaluationError("labels must be booleans or 0/1 (1 = target trial)")
        labels = labels.astype(bool)
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise EvaluationError(f"{bad} of {len(scores)} scores are NaN or infinite")
    targets = int(labels.sum())
    if targets == 0 or targets == len(labels):
        missing = "target" if targets == 0 else "non-target"
        raise EvaluationError(f"no {missing} trials among {len(labels)}: cannot measure verification errors")
    return scores, labels


def _operating_points(scores: np.ndarray, labels: np.ndarray) -> _OperatingPoints:
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # Each distinct score's first position says how many trials fall below it as a threshold.
    first = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    below = np.r_[first, len(scores)]
    targets_below = np.r_[0, np.cumsum(sorted_labels)][below]
    nontargets_below = below - targets_below
    n_target = int(targets_below[-1])
    n_nontarget = len(scores) - n_target
    thresholds = np.r_[sorted_scores[first], np.nextafter(sorted_scores[-1], np.inf)]
    return _OperatingPoints(
        thresholds=thresholds,
        far=(n_nontarget - nontargets_below) / n_nontarget,
        frr=targets_below / n_target,
        target_trials=n_target,
        nontarget_trials=n_nontarget,
    )


def _eer(points: _OperatingPoints) -> tuple[float, float]:
    # The last point (reject all: FRR 1, FAR 0) always qualifies, and the first (accept all:
    # FRR 0, FAR 1) never does, so the crossing has a point on each side.
    b = int(np.argmax(points.frr >= points.far))
    a = b - 1
    d_frr = points.frr[b] - points.frr[a]
    d_far = points.far[b] - points.far[a]
    alpha = (points.far[a] - points.frr[a]) / (d_frr - d_far)
    eer = points.frr[a] + alpha * d_frr
    threshold = points.thresholds[a] + alpha * (points.thresholds[b] - points.thresholds[a])
    return float(eer), float(threshold)


def _check_costs(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0 < p_target < 1:
        raise EvaluationError(f"p_target must lie strictly between 0 and 1, got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise EvaluationError(f"c_miss and c_fa must be positive, got {c_miss} and {c_fa}")


def _min_dcf(points: _OperatingPoints, p_target: float, c_miss: float, c_fa: float) -> tuple[float, float]:
    _check_costs(p_target, c_miss, c_fa)
    dcf = c_miss * p_target * points.frr + c_fa * (1 - p_target) * points.far
    # The cost of the better trivial system (accept all or reject all), so 1.0 means useless.
    default_cost = min(c_miss * p_target, c_fa * (1 - p_target))
    best = int(np.argmin(dcf))  # the lowest threshold among equally cheap ones
    return float(dcf[best] / default_cost), float(points.thresholds[best])


def _at_far(points: _OperatingPoints, far: float) -> tuple[float, float, float]:
    if not 0 <= far <= 1:
        raise EvaluationError(f"a target false accept rate must lie in [0, 1], got {far}")
    i = int(np.argmax(points.far <= far))  # the reject-all point has FAR 0, so one always qualifies
    return float(points.thresholds[i]), float(points.far[i]), float(points.frr[i])


def _error_rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    accepted = scores >= threshold
    return float(accepted[~labels].mean()), float((~accepted[labels]).mean())


def _accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(((scores >= threshold) == labels).mean())


def det_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(far, frr, thresholds)`` at every operating point, thresholds ascending.

    The first point accepts every trial (FAR 1, FRR 0), the last rejects every trial (FAR 0,
    FRR 1); ``labels`` are True (or 1) for target trials.
    """
    points = _operating_points(*_check_trials(scores, labels))
    return points.far, points.frr, points.thresholds


def eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``(eer, threshold)``: the equal error rate and the threshold where FAR and FRR cross."""
    return _eer(_operating_points(*_check_trials(scores, labels)))


def min_dcf(
    scores: np.ndarray, labels: np.ndarray, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> tuple[float, float]:
    """``(min_dcf, threshold)``: the normalised minimum detection cost of NIST SRE and 3D-Speaker.

    ``DCF = c_miss * p_target * FRR + c_fa * (1 - p_target) * FAR``, minimised over the operating
    points and divided by ``min(c_miss * p_target, c_fa * (1 - p_target))``, the cost of the
    better of accepting or rejecting everything; ties go to the lowest threshold.
    """
    return _min_dcf(_operating_points(*_check_trials(scores, labels)), p_target, c_miss, c_fa)


def threshold_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> tuple[float, float, float]:
    """``(threshold, achieved_far, frr)`` at the lowest operating threshold whose FAR is <= ``far``."""
    return _at_far(_operating_points(*_check_trials(scores, labels)), far)


def error_rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """``(far, frr)`` when trials scoring ``>= threshold`` are accepted."""
    return _error_rates(*_check_trials(scores, labels), threshold)


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """The fraction of all trials decided correctly when scores ``>= threshold`` are accepted.

    Every trial weighs the same, so with many more non-target than target trials the figure
    mostly reflects FAR; report FAR and FRR (:func:`error_rates`) beside it.
    """
    return _accuracy(*_check_trials(scores, labels), threshold)


@dataclass(frozen=True)
class FarOperatingPoint:
    """The operating point chosen for a target false accept rate."""

    threshold: float
    far: float  # achieved, <= the target
    frr: float


@dataclass(frozen=True)
class VerificationMetrics:
    """Everything measured on one set of scored trials."""

    eer: float
    eer_threshold: float
    min_dcf: float
    min_dcf_threshold: float
    p_target: float
    c_miss: float
    c_fa: float
    at_far: dict[float, FarOperatingPoint]  # target FAR -> operating point
    threshold: float  # the decision threshold accuracy, far and frr are measured at
    accuracy: float
    far: float
    frr: float
    target_trials: int
    nontarget_trials: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; ``at_far`` keys become strings such as ``"0.01"``."""
        return {
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "min_dcf": self.min_dcf,
            "min_dcf_threshold": self.min_dcf_threshold,
            "p_target": self.p_target,
            "c_miss": self.c_miss,
            "c_fa": self.c_fa,
            "at_far": {
                str(target): {"threshold": p.threshold, "far": p.far, "frr": p.frr}
                for target, p in self.at_far.items()
            },
            "threshold": self.threshold,
            "accuracy": self.accuracy,
            "far": self.far,
            "frr": self.frr,
            "target_trials": self.target_trials,
            "nontarget_trials": self.nontarget_trials,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerificationMetrics:
        """The inverse of :meth:`to_dict`, e.g. to compare against a stored ``metrics.json``."""
        try:
            at_far = {float(k): FarOperatingPoint(**v) for k, v in data["at_far"].items()}
            values = {f.name: data[f.name] for f in fields(cls) if f.name != "at_far"}
        except (KeyError, TypeError, ValueError) as error:
            raise EvaluationError(f"not a spkft metrics record: {error}") from None
        return cls(at_far=at_far, **values)


def compute_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    fars: tuple[float, ...] = (0.01, 0.001),
    threshold: float | None = None,
) -> VerificationMetrics:
    """All metrics from one sort of the scores; accuracy is at ``threshold`` (default: the EER's)."""
    scores, labels = _check_trials(scores, labels)
    points = _operating_points(scores, labels)
    eer_value, eer_threshold = _eer(points)
    dcf, dcf_threshold = _min_dcf(points, p_target, c_miss, c_fa)
    decision = eer_threshold if threshold is None else float(threshold)
    far, frr = _error_rates(scores, labels, decision)
    return VerificationMetrics(
        eer=eer_value,
        eer_threshold=eer_threshold,
        min_dcf=dcf,
        min_dcf_threshold=dcf_threshold,
        p_target=p_target,
        c_miss=c_miss,
        c_fa=c_fa,
        at_far={float(target): FarOperatingPoint(*_at_far(points, target)) for target in fars},
        threshold=decision,
        accuracy=_accuracy(scores, labels, decision),
        far=far,
        frr=frr,
        target_trials=points.target_trials,
        nontarget_trials=points.nontarget_trials,
    )


def bootstrap_differences(
    baseline_scores: np.ndarray,
    candidate_scores: np.ndarray,
    labels: np.ndarray,
    baseline: VerificationMetrics,
    candidate: VerificationMetrics,
    resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Intervals of ``candidate - baseline`` for each figure :func:`~spkft.core.report.compare_metrics`
    compares, from a paired bootstrap over the trials both systems scored.

    Target and non-target trials are resampled separately, so every resample has both; accuracy
    stays at each system's own decision threshold. The interval is the central ``level`` of the
    resampled differences: one that holds 0 means the two systems differ by no more than the
    noise of this trial list.
    """
    baseline_scores, labels = _check_trials(baseline_scores, labels)
    candidate_scores, _ = _check_trials(candidate_scores, labels)
    if len(baseline_scores) != len(candidate_scores):
        raise EvaluationError(f"{len(baseline_scores)} baseline scores but {len(candidate_scores)} candidate "
                              "scores: the two systems must score the same trials")
    fars = sorted(set(baseline.at_far) & set(candidate.at_far), reverse=True)
    targets, nontargets = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.default_rng(seed)
    differences: dict[str, list[float]] = {}

    def figures(scores: np.ndarray, picked_labels: np.ndarray, metrics: VerificationMetrics) -> dict[str, float]:
        points = _operating_points(scores, picked_labels)
        found = {"eer": _eer(points)[0],
                 "min_dcf": _min_dcf(points, metrics.p_target, metrics.c_miss, metrics.c_fa)[0]}
        found |= {f"frr@far={far:g}": _at_far(points, far)[2] for far in fars}
        found["accuracy"] = _accuracy(scores, picked_labels, metrics.threshold)
        return found

    for _ in range(resamples):
        picked = np.concatenate([rng.choice(targets, len(targets)), rng.choice(nontargets, len(nontargets))])
        before = figures(baseline_scores[picked], labels[picked], baseline)
        after = figures(candidate_scores[picked], labels[picked], candidate)
        for name in before:
            differences.setdefault(name, []).append(after[name] - before[name])
    tail = 100 * (1 - level) / 2
    return {name: (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
            for name, values in differences.items()}
