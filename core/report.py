"""The evaluation report: metrics, per-trial scores and plots in one folder, and before/after figures.

A report folder holds ``metrics.json`` (:meth:`VerificationMetrics.to_dict`, plus ``baseline``
and ``comparison`` when a baseline is given), ``scores.tsv`` (``enrol test target|nontarget
score``, the Kaldi trial-list order with a header row), ``det.png`` (a DET curve on normal
deviate axes, as NIST draws them) and ``scores.png`` (target and non-target score
histograms). Plots are drawn with matplotlib's Agg canvas directly, without pyplot, so no
display and no global backend state are involved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spkft.core.errors import EvaluationError
from spkft.core.metrics import VerificationMetrics, det_curve
from spkft.core.records import Trial
from spkft.core.scoring import trial_labels


@dataclass(frozen=True)
class Baseline:
    """The system a report compares against (usually the pretrained model on the same trials)."""

    metrics: VerificationMetrics
    scores: np.ndarray
    labels: np.ndarray
    label: str = "baseline"
    # Bootstrap intervals of each change (:func:`~spkft.core.metrics.bootstrap_differences`), which
    # let the comparison tell a change from noise.
    intervals: dict[str, tuple[float, float]] | None = None


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` put each part of the report."""

    directory: Path
    metrics: Path
    scores: Path
    det_plot: Path
    score_plot: Path


def compare_metrics(
    baseline: VerificationMetrics,
    candidate: VerificationMetrics,
    intervals: dict[str, tuple[float, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Before/after figures for printing: per metric the two values, the change and its verdict.

    Covers EER, minDCF, FRR at each target FAR both were measured at (``"frr@far=0.01"``) and
    accuracy. ``relative_delta`` is the change as a fraction of the baseline, None when the
    baseline is 0. With ``intervals`` (:func:`~spkft.core.metrics.bootstrap_differences`), a
    change whose interval holds 0 is ``"within noise"``, and only a change beyond the noise is
    ``"better"`` (``improved``) or ``"worse"``; without them, any change counts.
    """
    rows: list[tuple[str, float, float, bool]] = [
        ("eer", baseline.eer, candidate.eer, True),
        ("min_dcf", baseline.min_dcf, candidate.min_dcf, True),
    ]
    for far in sorted(set(baseline.at_far) & set(candidate.at_far), reverse=True):
        rows.append((f"frr@far={far:g}", baseline.at_far[far].frr, candidate.at_far[far].frr, True))
    rows.append(("accuracy", baseline.accuracy, candidate.accuracy, False))
    comparison = {}
    for name, before, after, lower_is_better in rows:
        low, high = (intervals or {}).get(name, (after - before, after - before))
        if low <= 0 <= high and (intervals is not None or before == after):
            verdict = "within noise" if intervals is not None else "unchanged"
        else:
            verdict = "better" if (high < 0) == lower_is_better else "worse"
        comparison[name] = {
            "baseline": before,
            "candidate": after,
            "delta": after - before,
            "relative_delta": (after - before) / before if before else None,
            "interval_95": [low, high] if intervals is not None and name in intervals else None,
            "verdict": verdict,
            "improved": verdict == "better",
        }
    return comparison


def write_report(
    directory: str | Path,
    result: VerificationMetrics,
    scores: np.ndarray,
    labels: np.ndarray,
    trials: Sequence[Trial],
    baseline: Baseline | None = None,
    label: str = "candidate",
    extra: dict | None = None,
) -> ReportFiles:
    """Write the report folder for ``result`` (measured on ``scores``), creating it if needed.

    ``scores`` and ``labels`` are in the order of ``trials``, whose labels they must agree with;
    with a ``baseline`` the DET plot shows both curves and ``metrics.json`` the comparison.
    ``extra`` adds entries to ``metrics.json`` (what the scores are, calibration measures).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if not len(scores) == len(labels) == len(trials):
        raise EvaluationError(f"{len(trials)} trials but {len(scores)} scores and {len(labels)} labels")
    if not np.array_equal(labels, trial_labels(trials)):
        raise EvaluationError("labels disagree with the trials' target/nontarget marks")
    systems = [] if baseline is None else [(baseline.label, baseline.metrics, baseline.scores, baseline.labels)]
    systems.append((label, result, scores, labels))
    # Drawn first: unusable baseline scores then fail before any file is written.
    det_figure, score_figure = _det_figure(systems), _score_figure(systems)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        directory=directory,
        metrics=directory / "metrics.json",
        scores=directory / "scores.tsv",
        det_plot=directory / "det.png",
        score_plot=directory / "scores.png",
    )

    record = result.to_dict() | (extra or {})
    if baseline is not None:
        record["baseline"] = baseline.metrics.to_dict()
        record["comparison"] = compare_metrics(baseline.metrics, result, baseline.intervals)
    files.metrics.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    lines = ["enrol\ttest\tlabel\tscore"]
    lines += [
        f"{t.enrol}\t{t.test}\t{'target' if t.target else 'nontarget'}\t{s:.6f}"
        for t, s in zip(trials, scores.tolist(), strict=True)
    ]
    files.scores.write_text("\n".join(lines) + "\n", encoding="utf-8")

    _save(det_figure, files.det_plot)
    _save(score_figure, files.score_plot)
    return files


# Acklam's rational approximation of the normal quantile function (relative error < 1.2e-9),
# kept here so plotting needs no scipy. Coefficients highest power first, for np.polyval.
_CENTRAL_NUM = [-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
                1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00]  # fmt: skip
_CENTRAL_DEN = [-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
                6.680131188771972e01, -1.328068155288572e01, 1.0]  # fmt: skip
_TAIL_NUM = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
             -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00]  # fmt: skip
_TAIL_DEN = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
             3.754408661907416e00, 1.0]  # fmt: skip
_TAIL = 0.02425


def _probit(p: np.ndarray) -> np.ndarray:
    """The standard normal quantile of each probability in (0, 1)."""
    p = np.asarray(p, dtype=np.float64)
    central = np.abs(p - 0.5) <= 0.5 - _TAIL
    q = p - 0.5
    r = q * q
    x = np.empty_like(p)
    x[central] = q[central] * np.polyval(_CENTRAL_NUM, r[central]) / np.polyval(_CENTRAL_DEN, r[central])
    # The tails are symmetric: work with the smaller of p and 1 - p and restore the sign.
    tail = ~central
    t = np.sqrt(-2.0 * np.log(np.minimum(p[tail], 1.0 - p[tail])))
    magnitude = np.polyval(_TAIL_NUM, t) / np.polyval(_TAIL_DEN, t)
    x[tail] = np.where(p[tail] < 0.5, magnitude, -magnitude)
    return x


# DET axis ticks, as fractions; the axes show the part of this range the curves need.
# (below 0.1 % only decades: on probit axes finer labels there run into each other).
_DET_TICKS = np.array([1e-5, 1e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8,
                       0.9, 0.95, 0.98, 0.99])  # fmt: skip
# Rates of exactly 0 or 1 have no probit; pushed to here they fall outside any axes drawn.
_DET_CLIP = 1e-7

_System = tuple[str, VerificationMetrics, np.ndarray, np.ndarray]


def _margins(width_inches: float, height_inches: float) -> dict[str, float]:
    # Fixed room for tick labels and titles: tight_layout would measure them by drawing the whole
    # figure once more, half the cost of a report.
    return {
        "left": 0.75 / width_inches,
        "right": 1 - 0.2 / width_inches,
        "bottom": 0.75 / height_inches,
        "top": 1 - 0.4 / height_inches,
    }


def _corners(far: np.ndarray, frr: np.ndarray) -> np.ndarray:
    """Indices of the DET staircase's corners: points inside a straight run add nothing to a line."""
    keep = np.ones(len(far), dtype=bool)
    same_frr = (frr[1:-1] == frr[:-2]) & (frr[1:-1] == frr[2:])
    same_far = (far[1:-1] == far[:-2]) & (far[1:-1] == far[2:])
    keep[1:-1] = ~(same_frr | same_far)
    return np.flatnonzero(keep)


def _det_figure(systems: list[_System]) -> Figure:
    figure = Figure(figsize=(6, 6), dpi=100)
    figure.subplots_adjust(**_margins(6, 6))
    ax = figure.add_subplot()
    smallest = 1.0
    for index, (name, metrics, scores, labels) in enumerate(systems):
        far, frr, thresholds = det_curve(scores, labels)
        smallest = min(smallest, far[far > 0].min(), frr[frr > 0].min())
        keep = _corners(far, frr)
        x = _probit(np.clip(far[keep], _DET_CLIP, 1 - _DET_CLIP))
        y = _probit(np.clip(frr[keep], _DET_CLIP, 1 - _DET_CLIP))
        is_candidate = index == len(systems) - 1
        style = {"color": "C0" if is_candidate else "0.5", "linestyle": "-" if is_candidate else "--"}
        ax.plot(x, y, label=f"{name}: EER {metrics.eer:.2%}, minDCF {metrics.min_dcf:.3f}", **style)
        eer_at = _probit(np.clip([metrics.eer], _DET_CLIP, 1 - _DET_CLIP))[0]
        ax.plot(eer_at, eer_at, "o", color=style["color"])
        dcf_point = min(np.searchsorted(thresholds, metrics.min_dcf_threshold), len(thresholds) - 1)
        dcf_xy = _probit(np.clip([far[dcf_point], frr[dcf_point]], _DET_CLIP, 1 - _DET_CLIP))
        ax.plot(*dcf_xy, "s", color=style["color"], fillstyle="none")
    # Square axes from the finest rate the trials can show; up to 40 % as NIST draws them, further
    # only when a system is so poor that its EER would fall off the plot.
    low = _DET_TICKS[max(0, np.searchsorted(_DET_TICKS, smallest, side="right") - 1)]
    high = 0.4 if max(m.eer for _, m, _, _ in systems) <= 0.35 else 0.99
    ticks = _DET_TICKS[(_DET_TICKS >= low) & (_DET_TICKS <= high)]
    positions = _probit(ticks)
    tick_labels = [f"{100 * t:g}" for t in ticks]
    limits = (positions[0], positions[-1])
    ax.plot(limits, limits, ":", color="0.7", linewidth=0.8)  # FAR = FRR: where each EER point lies
    ax.set(xlim=limits, ylim=limits, xticks=positions, yticks=positions, aspect="equal")
    ax.set_xticklabels(tick_labels, rotation=45)
    ax.set_yticklabels(tick_labels)
    ax.set_xlabel("False accept rate (%)")
    ax.set_ylabel("False reject rate (%)")
    ax.set_title("DET curve (circle: EER, square: minDCF)")
    ax.grid(True, color="0.9")
    ax.legend(loc="lower left", fontsize="small")  # the corner only a near-perfect system reaches
    return figure


def _score_histogram(ax: Axes, name: str, metrics: VerificationMetrics, scores: np.ndarray, labels: np.ndarray) -> None:
    edges = np.histogram_bin_edges(scores, bins=80)
    # Densities, not counts: non-target trials usually outnumber target trials a hundredfold.
    for kind, chosen, color in (("target", labels, "C2"), ("non-target", ~labels, "C3")):
        density, _ = np.histogram(scores[chosen], bins=edges, density=True)
        ax.stairs(density, edges, fill=True, alpha=0.35, color=color, label=f"{kind} ({chosen.sum()})")
    ax.axvline(metrics.eer_threshold, color="k", linestyle="--", label=f"EER threshold {metrics.eer_threshold:.3f}")
    if metrics.threshold != metrics.eer_threshold:
        ax.axvline(metrics.threshold, color="C0", label=f"decision threshold {metrics.threshold:.3f}")
    ax.set_title(f"{name}: EER {metrics.eer:.2%}")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")


def _score_figure(systems: list[_System]) -> Figure:
    figure = Figure(figsize=(6 * len(systems), 4), dpi=100)
    figure.subplots_adjust(wspace=0.25, **_margins(6 * len(systems), 4))
    for index, (name, metrics, scores, labels) in enumerate(systems):
        labels = np.asarray(labels, dtype=bool)
        _score_histogram(figure.add_subplot(1, len(systems), index + 1), name, metrics, np.asarray(scores), labels)
    return figure


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)  # attaches itself to the figure
    figure.savefig(path, format="png")
