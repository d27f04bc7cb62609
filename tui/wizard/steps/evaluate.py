"""Step 7: the fine-tuned model against the starting model on held-out speakers — figures and plots."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, ProgressBar, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from spkft.core.calibrate import calibrate_checkpoint
from spkft.core.calibration import bayes_threshold, odds
from spkft.core.data import Split, make_trials, read_trials, segment
from spkft.core.embedding import Embedder
from spkft.core.errors import SpkftError
from spkft.core.evaluate import evaluate
from spkft.core.metrics import VerificationMetrics, bootstrap_differences
from spkft.core.report import Baseline, compare_metrics, write_report
from spkft.core.train import TrainConfig
from spkft.core.train.runtime import pick_device
from spkft.core.train.trainer import split_data
from spkft.tui.wizard.draft import Comparison
from spkft.tui.wizard.plots import DetPlot, ScorePlot
from spkft.tui.wizard.step import StepScreen

CANDIDATE, BASELINE = "fine-tuned", "starting model"
# The prior at which the calibrated decision is described (spkft serve's default --p-target).
DECISION_PRIOR = 0.01


class EvaluationProgress(Message):
    def __init__(self, label: str, done: int, total: int) -> None:
        super().__init__()
        self.label, self.done, self.total = label, done, total

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EvaluationProgress)


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def figures(metrics: VerificationMetrics) -> dict[str, str]:
    rows = {"EER": percent(metrics.eer), "minDCF": f"{metrics.min_dcf:.4f}"}
    for far, point in sorted(metrics.at_far.items(), reverse=True):
        rows[f"FRR at FAR {percent(far)}"] = percent(point.frr)
    rows["accuracy"] = percent(metrics.accuracy)
    rows["EER threshold"] = f"{metrics.eer_threshold:.4f}"
    rows["minDCF threshold"] = f"{metrics.min_dcf_threshold:.4f}"
    for far, point in sorted(metrics.at_far.items(), reverse=True):
        rows[f"threshold at FAR {percent(far)}"] = f"{point.threshold:.4f}"
    return rows


def metrics_table(comparison: Comparison) -> Table:
    """The fine-tuned model's figures, beside the starting model's with the change when there is one."""
    table = Table(expand=False)
    table.add_column("metric")
    after = figures(comparison.candidate.metrics)
    baseline = comparison.baseline
    if baseline is None:
        table.add_column(CANDIDATE, justify="right")
        for name, value in after.items():
            table.add_row(name, value)
        return table
    before = figures(baseline.metrics)
    changes = compare_metrics(baseline.metrics, comparison.candidate.metrics, baseline.intervals)
    by_row = {"EER": "eer", "minDCF": "min_dcf", "accuracy": "accuracy",
              **{f"FRR at FAR {percent(far)}": f"frr@far={far:g}" for far in baseline.metrics.at_far}}
    for column in (BASELINE, CANDIDATE, "change"):
        table.add_column(column, justify="right")
    for name, value in after.items():
        change = changes.get(by_row.get(name, ""))
        if change is None:
            shown = ""
        else:
            delta = f"{change['delta']:+.4f}" if name == "minDCF" else f"{100 * change['delta']:+.2f} pp"
            style = {"better": "green", "worse": "red"}.get(change["verdict"], "default")
            shown = f"[{style}]{delta} {change['verdict']}[/]"
        table.add_row(name, before[name], value, shown)
    return table


class EvaluateStep(StepScreen):
    NUMBER = 7
    HEADING = "Evaluation: is it better?"
    NEXT_LABEL = "Export"

    def compose_body(self) -> ComposeResult:
        yield Static(id="eval-line", markup=False)
        yield ProgressBar(id="eval-progress", show_eta=False)
        with TabbedContent(id="results"):
            with TabPane("Figures", id="figures-tab"):
                yield Static(id="metrics")
                yield Static(id="calibration-line", markup=False)
                yield Static(id="report-line", markup=False)
            with TabPane("DET curve", id="det-tab"):
                yield DetPlot(id="det")
            with TabPane("Scores", id="scores-tab"):
                with Horizontal(id="score-plots"):
                    yield ScorePlot(id="candidate-scores")
                    yield ScorePlot(id="baseline-scores")
        with Horizontal(classes="actions"):
            yield Button("Evaluate again", id="again", compact=True)

    @property
    def checkpoint(self) -> Path:
        return Path(self.draft.training.finished.best_checkpoint)

    def on_mount(self) -> None:
        evaluation = self.draft.evaluation
        if evaluation is not None and evaluation.checkpoint == self.checkpoint:
            self.show_results()
        else:
            self.start()

    def start(self) -> None:
        self.query_one("#results").display = False
        self.query_one("#eval-progress").display = True
        self.query_one("#eval-line", Static).update("Scanning and splitting the data as the run did…")
        self.evaluate_run(self.draft.config, self.checkpoint)

    @work(thread=True, exclusive=True, exit_on_error=False, group="evaluate")
    def evaluate_run(self, config: TrainConfig, checkpoint: Path) -> Comparison:
        split, _ = split_data(config)
        data = config.data
        held_out, which = (split.test, "test") if split.test else (split.val, "validation")
        def generated(held: list) -> tuple[list, list]:
            # As `spkft eval` does: segments give one-file speakers same-speaker trials, and the
            # non-target trials are not tied to the targets' number, for the low-FAR thresholds.
            cut = segment(held, data.segment_seconds)
            return cut, make_trials(cut, seed=config.run.seed, max_target=data.max_trials // 2,
                                    nontarget_per_target=None, max_nontarget=data.max_trials - data.max_trials // 2)

        if not split.test and data.trials is not None:
            recordings, trials = list(split.val), read_trials(data.trials)
        else:
            recordings, trials = generated(held_out)
        device = pick_device(config.run.device)

        def progress(label: str):
            return lambda done, total: self.post_message(EvaluationProgress(label, done, total))

        # Calibrated on the validation speakers, and measured on the test speakers it never saw.
        calibration, calibrated = ("Not calibrated: a calibration is checked on held-out test speakers, and this "
                                   "run has none (set Test speakers on the Data step)."), None
        if split.test:
            try:
                calibrated = calibrate_checkpoint(checkpoint, *generated(list(split.val)), device=device,
                                                  source="validation speakers",
                                                  progress=progress("fine-tuned model (calibrating)")).calibration
            except SpkftError as exc:
                calibration = f"Not calibrated: {exc}"
        candidate = evaluate(Embedder.from_checkpoint(checkpoint, device=device), recordings, trials,
                             progress=progress(CANDIDATE), calibration=calibrated)
        if candidate.calibration is not None:
            measures = candidate.calibration
            calibration = (f"Calibrated on the validation speakers (stored with the model): on the test trials "
                           f"Cllr {measures.cllr:.3f} bits (min {measures.min_cllr:.3f}), actual DCF "
                           f"{measures.act_dcf[DECISION_PRIOR]:.3f} at prior {DECISION_PRIOR:g} (min "
                           f"{measures.min_dcf[DECISION_PRIOR]:.3f}). At that prior it accepts when the evidence "
                           f"favours the same speaker at least {odds(bayes_threshold(DECISION_PRIOR))}.")
        baseline = None
        if config.model.init is not None:
            before = evaluate(Embedder.from_checkpoint(config.model.init, device=device), recordings, trials,
                              progress=progress(BASELINE))
            intervals = bootstrap_differences(before.scores, candidate.scores, candidate.labels, before.metrics,
                                              candidate.metrics, seed=config.run.seed)
            baseline = Baseline(before.metrics, before.scores, before.labels, label=BASELINE, intervals=intervals)
        report_dir = Path(config.run.output_dir) / f"{which}-report"
        write_report(report_dir, candidate.metrics, candidate.scores, candidate.labels, candidate.trials,
                     baseline=baseline, label=CANDIDATE)
        described = (f"{len(trials)} trials among {len(recordings)} recordings of "
                     f"{len(Split.speakers_of(held_out))} held-out {which} speakers")
        if which == "validation":
            described += " (they also chose the best epoch, so the figures flatter it a little)"
        return Comparison(described, checkpoint, candidate, baseline, report_dir, calibration, calibrated is not None)

    def on_evaluation_progress(self, message: EvaluationProgress) -> None:
        self.query_one("#eval-line", Static).update(f"Embedding with the {message.label}…")
        self.query_one("#eval-progress", ProgressBar).update(total=message.total, progress=message.done)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.name != "evaluate_run":
            return
        if event.state is WorkerState.SUCCESS:
            self.draft.evaluation = event.worker.result
            self.show_results()
        elif event.state is WorkerState.ERROR:
            self.query_one("#eval-progress").display = False
            self.query_one("#eval-line", Static).update("The evaluation failed; Evaluate again once it is fixed.")

    def show_results(self) -> None:
        comparison = self.draft.evaluation
        self.query_one("#eval-progress").display = False
        self.query_one("#results").display = True
        line = f"{comparison.checkpoint} on {comparison.data}."
        if comparison.baseline is None:
            initial = self.draft.training.initial
            line += " A fresh model has no starting checkpoint to compare with"
            line += f"; untrained, it scored {initial.val_eer:.2%} EER on validation." if initial else "."
        self.query_one("#eval-line", Static).update(line)
        self.query_one("#metrics", Static).update(metrics_table(comparison))
        calibration_line = self.query_one("#calibration-line", Static)
        calibration_line.display = bool(comparison.calibration)
        calibration_line.update(comparison.calibration)
        self.query_one("#report-line", Static).update(
            f"Report (metrics.json, scores.tsv, det.png, scores.png): {comparison.report_dir}")
        candidate, baseline = comparison.candidate, comparison.baseline
        systems = [(CANDIDATE, candidate.scores, candidate.labels)]
        if baseline is not None:
            systems.insert(0, (BASELINE, baseline.scores, baseline.labels))
        self.query_one("#det", DetPlot).show(systems)
        self.query_one("#candidate-scores", ScorePlot).show(CANDIDATE, candidate.scores, candidate.labels,
                                                            candidate.metrics.eer_threshold)
        baseline_plot = self.query_one("#baseline-scores", ScorePlot)
        baseline_plot.display = baseline is not None
        if baseline is not None:
            baseline_plot.show(BASELINE, baseline.scores, baseline.labels, baseline.metrics.eer_threshold)
        self.say("")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "again":
            self.start()

    def blocker(self) -> str | None:
        if self.draft.evaluation is None:
            return "The evaluation has not finished yet."
        return None
