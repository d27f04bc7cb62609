"""Plots drawn in the terminal with plotext: training curves, validation EER, DET curve, scores."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
from textual_plotext import PlotextPlot

from spkft.core.metrics import det_curve
from spkft.core.train import EpochEnded, StepEnded, Validated

# DET axes: rates as percentages on normal-deviate scales, as NIST draws them.
DET_TICKS = (0.1, 0.5, 1, 2, 5, 10, 20, 40, 60)
DET_RANGE = (0.05, 60.0)
SCORE_BINS = 40


def probit(percent: float) -> float:
    return NormalDist().inv_cdf(min(max(percent / 100, 1e-6), 1 - 1e-6))


class LossPlot(PlotextPlot):
    """Training loss (left axis) and accuracy in % (right axis) at every step."""

    def show(self, steps: list[StepEnded], earlier: list[tuple[int, float, float]] = ()) -> None:
        """``earlier``: (step, loss, accuracy) of epochs read back from disk, each at its last step."""
        plt = self.plt
        plt.clear_data()
        plt.title("loss and accuracy per step")
        points = list(earlier) + [(s.global_step, s.loss, s.accuracy) for s in steps]
        if points:
            x = [step for step, _, _ in points]
            plt.plot(x, [loss for _, loss, _ in points], label="loss", marker="braille")
            plt.plot(x, [100 * accuracy for _, _, accuracy in points], label="accuracy %", yside="right",
                     marker="braille")
        self.refresh()


class EerPlot(PlotextPlot):
    """Validation EER in % by epoch, the starting model at epoch 0."""

    def show(self, initial: Validated | None, epochs: list[EpochEnded]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.title("validation EER % by epoch")
        points = ([(0, initial.val_eer)] if initial is not None else []) + [(e.epoch, e.val_eer) for e in epochs]
        if points:
            x, y = zip(*points)
            plt.plot(list(x), [100 * v for v in y], marker="dot")
            plt.xticks(list(x))
        self.refresh()


class DetPlot(PlotextPlot):
    """False reject against false accept rate, on normal-deviate axes, one line per system."""

    def show(self, systems: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        plt = self.plt
        plt.clear_data()
        plt.title("DET curve (%)")
        ticks = [probit(t) for t in DET_TICKS]
        for name, scores, labels in systems:
            far, frr, _ = det_curve(scores, labels)
            plt.plot([probit(100 * v) for v in far], [probit(100 * v) for v in frr], label=name, marker="braille")
        plt.xlim(probit(DET_RANGE[0]), probit(DET_RANGE[1]))
        plt.ylim(probit(DET_RANGE[0]), probit(DET_RANGE[1]))
        plt.xticks(ticks, [f"{t:g}" for t in DET_TICKS])
        plt.yticks(ticks, [f"{t:g}" for t in DET_TICKS])
        plt.xlabel("false accept %")
        plt.ylabel("false reject %")
        self.refresh()


class ScorePlot(PlotextPlot):
    """Histograms of target and non-target scores, as densities: non-targets usually far outnumber targets."""

    def show(self, name: str, scores: np.ndarray, labels: np.ndarray, threshold: float) -> None:
        plt = self.plt
        plt.clear_data()
        plt.title(f"{name}: scores (threshold {threshold:.3f})")
        edges = np.histogram_bin_edges(scores, bins=SCORE_BINS)
        centres = ((edges[:-1] + edges[1:]) / 2).tolist()
        for kind, chosen in (("target", labels), ("non-target", ~labels)):
            density, _ = np.histogram(scores[chosen], bins=edges, density=True)
            plt.plot(centres, density.tolist(), label=kind, fillx=True, marker="braille")
        plt.vline(threshold)
        plt.xlabel("cosine score")
        self.refresh()
