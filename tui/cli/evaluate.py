"""``spkft eval``: measure a checkpoint as a speaker verifier, write the report, compare with a baseline."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from spkft.core.catalogue import released
from spkft.core.data import POOL_SEPARATOR, ScanReport, make_trials, read_trials, scan, segment
from spkft.core.embedding import Embedder
from spkft.core.errors import DataError
from spkft.core.evaluate import Evaluation, evaluate
from spkft.core.checkpoint import LoadedModel, load_model
from spkft.core.metrics import VerificationMetrics, bootstrap_differences, compute_metrics
from spkft.core.records import Recording, Trial
from spkft.core.report import Baseline, compare_metrics, write_report
from spkft.tui.cli.inference import CheckpointOption, DeviceOption, VariantOption
from spkft.tui.cli.models import fetch_released

# List files named for their format rather than their content: the report folder takes the
# name of the folder that holds them instead.
_GENERIC_LIST_NAMES = frozenset({"manifest.csv", "wav.scp", "utt2spk", "segments"})


class Feedback:
    """What the command says on stderr while it works: plain notes, and progress bars unless --json.

    Bars are drawn on an interactive terminal only: redirected to a file, they would be noise.
    """

    def __init__(self, show_progress: bool) -> None:
        self._console = Console(stderr=True, highlight=False)
        self._bar = None
        if show_progress and self._console.is_interactive:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=self._console, transient=True,
            )

    def __enter__(self) -> Feedback:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def note(self, message: str) -> None:
        # Printed through the console so that a live progress bar stays below it, intact.
        self._console.print(message, markup=False, soft_wrap=True)

    def track(self, description: str) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback that drives a new bar, or None when bars are off."""
        bar = self._bar
        if bar is None:
            return None
        task = bar.add_task(description, total=None)
        return lambda done, total: bar.update(task, completed=done, total=total)


def _scan(source: Path, what: str, feedback: Feedback) -> ScanReport:
    """Scan a data source; excluded rows are one note, no usable recording at all is an error."""
    report = scan(source, progress=feedback.track(f"scanning {what}"))
    if not report.excluded:
        return report
    reasons = ", ".join(f"{reason} {count}" for reason, count in report.excluded_by_reason.items())
    first = report.excluded[0]
    excluded = f"{len(report.excluded)} row(s) excluded ({reasons}), e.g. {first.where}: {first.detail}"
    if not report.recordings:
        raise DataError(f"{report.source}: no usable recordings in the {what}: {excluded}")
    feedback.note(f"{report.source}: {excluded}")
    return report


def _trials(
    report: ScanReport, trials_file: Path | None, segment_seconds: float, max_trials: int, seed: int
) -> tuple[list[Recording], list[Trial]]:
    """The recordings to embed and the trials to score: read from a list, or generated."""
    if trials_file is not None:
        trials = read_trials(trials_file)
        if all(t.target for t in trials) or not any(t.target for t in trials):
            kind = "different-speaker" if all(t.target for t in trials) else "same-speaker"
            raise DataError(f"{trials_file}: the trial list has no {kind} trial; EER needs both kinds")
        return list(report.recordings), trials
    # Segments give speakers with a single long recording same-speaker trials too.
    recordings = segment(report.recordings, segment_seconds)
    # Non-targets are not tied to the number of targets: the low-FAR thresholds need many of them.
    trials = make_trials(recordings, seed=seed, max_target=max_trials // 2, nontarget_per_target=None,
                         max_nontarget=max_trials - max_trials // 2)
    return recordings, trials


def _default_report_dir(checkpoint: Path, data: Path) -> Path:
    """``<checkpoint's folder>/eval-<data>``, named after the data folder or the list file's stem.

    A released model by name lives in the cache, which is no place for reports: its report goes to
    ``eval-<name>-<data>`` in the working folder.
    """
    source = Path(os.path.abspath(data))
    if source.is_dir():
        name = source.name
    elif source.name in _GENERIC_LIST_NAMES:
        name = source.parent.name
    else:
        name = source.stem
    entry = released(checkpoint)
    if entry is not None:
        return Path.cwd() / f"eval-{entry.name}-{name}"
    return Path(os.path.abspath(checkpoint)).parent / f"eval-{name}"


def _embedder(checkpoint: Path, variant: Optional[str], device: str, recordings: list[Recording],
              feedback: Feedback) -> tuple[Embedder, LoadedModel]:
    """The checkpoint's embedder and the checkpoint; a note when it was trained on speakers of the evaluated data."""
    loaded = load_model(checkpoint, variant=variant, device=device)
    trained = set(loaded.checkpoint.get("speakers") or ())
    # A model trained on a pool knows its speakers as corpus/speaker: the corpus read alone names them bare.
    trained |= {name.partition(POOL_SEPARATOR)[2] for name in trained if POOL_SEPARATOR in name}
    heard = sorted(trained & {r.speaker for r in recordings})
    if heard:
        shown = ", ".join(heard[:3]) + (", ..." if len(heard) > 3 else "")
        evaluated = len({r.speaker for r in recordings})
        feedback.note(f"warning: {checkpoint} was trained on {len(heard)} of the {evaluated} speakers evaluated "
                      f"({shown}): its figures flatter it; evaluate on speakers it has not been trained on")
    return Embedder(loaded.inference_model, device), loaded


def _adapted(embedder: Embedder) -> str:
    """`` (with its wccn adaptation)`` when the checkpoint carries one, else nothing."""
    return "" if embedder.adaptation is None else f" (with its {embedder.adaptation.method} adaptation)"


def _calibration_table(evaluation: Evaluation) -> Table:
    """Cllr against its minimum and actual against minimum DCF: what the model's calibration costs."""
    measures = evaluation.calibration
    table = Table(title=Text("calibrated LLRs"), title_justify="left")
    table.add_column("measure")
    table.add_column("actual", justify="right")
    table.add_column("minimum", justify="right")
    table.add_row("Cllr (bits)", f"{measures.cllr:.3f}", f"{measures.min_cllr:.3f}")
    for p, value in measures.act_dcf.items():
        table.add_row(f"DCF, p_target {p:g}", f"{value:.4f}", f"{measures.min_dcf[p]:.4f}")
    return table


def _check_p_target(value: float) -> float:
    if not 0 < value < 1:
        raise typer.BadParameter(f"must lie strictly between 0 and 1, got {value:g}")
    return value


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def _metrics_table(metrics: VerificationMetrics, title: Text) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_row("EER", _percent(metrics.eer), f"{metrics.eer_threshold:.4f}")
    table.add_row(f"minDCF (p_target {metrics.p_target:g})", f"{metrics.min_dcf:.4f}",
                  f"{metrics.min_dcf_threshold:.4f}")
    for target, point in sorted(metrics.at_far.items(), reverse=True):
        table.add_row(f"FRR at FAR <= {_percent(target)}", f"{_percent(point.frr)} (FAR {_percent(point.far)})",
                      f"{point.threshold:.4f}")
    rates = f"FAR {_percent(metrics.far)}, FRR {_percent(metrics.frr)}"
    table.add_row("accuracy", f"{_percent(metrics.accuracy)} ({rates})", f"{metrics.threshold:.4f}")
    table.add_row("trials", f"{metrics.target_trials} target, {metrics.nontarget_trials} non-target", "")
    return table


def _comparison_table(comparison: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="before / after", title_justify="left")
    for column in ("metric", "baseline", "candidate", "delta", "95 % interval", "verdict"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    styles = {"better": "green", "worse": "red"}
    for name, row in comparison.items():
        if name == "min_dcf":  # a normalised cost; every other figure is a rate
            before, after, delta = f"{row['baseline']:.4f}", f"{row['candidate']:.4f}", f"{row['delta']:+.4f}"
            shown = "{:+.4f}".format
        else:
            before, after = _percent(row["baseline"]), _percent(row["candidate"])
            delta = f"{100 * row['delta']:+.2f} pp"
            shown = lambda value: f"{100 * value:+.2f}"  # noqa: E731
        interval = "" if row["interval_95"] is None else "{} to {}".format(*map(shown, row["interval_95"]))
        verdict = Text(row["verdict"], style=styles.get(row["verdict"], ""))
        table.add_row(name, before, after, delta, interval, verdict)
    return table


def eval_command(
    checkpoint: CheckpointOption,
    data: Annotated[
        Path,
        typer.Option("--data", "-d", help="Labelled recordings: a CSV list, a folder of speaker folders or a "
                                          "Kaldi data directory.", show_default=False),
    ],
    trials_file: Annotated[
        Optional[Path],
        typer.Option("--trials", help="Trial list ('enrol test target|nontarget' per line) naming utterance ids "
                                      "of --data; generated from --data when omitted."),
    ] = None,
    baseline: Annotated[
        Optional[Path],
        typer.Option("--baseline", callback=fetch_released,
                     help="A checkpoint to compare with on the same trials (usually the pretrained model, by "
                          "name or file); its variant is read off the file. Each checkpoint is measured with the "
                          "adaptation it carries, if any."),
    ] = None,
    cohort: Annotated[
        Optional[Path],
        typer.Option("--cohort", help="Labelled recordings of speakers outside the trials: AS-norm the scores "
                                      "against one mean embedding per cohort speaker."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", min=2, help="AS-norm: how many of the best-matching cohort speakers to use.")
    ] = 300,
    threshold: Annotated[
        Optional[float],
        typer.Option("--threshold", "-t", help="Decision threshold for accuracy, FAR and FRR; default: the EER's."),
    ] = None,
    p_target: Annotated[
        float,
        typer.Option("--p-target", callback=_check_p_target,
                     help="Prior of a target trial in minDCF (c_miss = c_fa = 1)."),
    ] = 0.01,
    report_dir: Annotated[
        Optional[Path],
        typer.Option("--report-dir", "-o", help="Where to write the report; default: eval-<data name> beside "
                                                "the checkpoint."),
    ] = None,
    segment_seconds: Annotated[
        float,
        typer.Option("--segment-seconds", help="Generated trials: recordings at least twice this long are cut "
                                               "into segments of at least this length."),
    ] = 4.0,
    max_trials: Annotated[
        int, typer.Option("--max-trials", min=2, help="Generated trials: at most half of these are target trials.")
    ] = 20_000,
    seed: Annotated[int, typer.Option("--seed", help="Generated trials: seed of the sampled pairs.")] = 0,
    variant: VariantOption = None,
    device: DeviceOption = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Measure a checkpoint as a speaker verifier (EER, minDCF, thresholds) and write a report folder.

    With --baseline, the baseline checkpoint is measured on the same trials and a before/after
    comparison is printed and written to the report.
    """
    with Feedback(show_progress=not as_json) as feedback:
        report = _scan(data, "data", feedback)
        recordings, trials = _trials(report, trials_file, segment_seconds, max_trials, seed)
        cohort_recordings = None
        if cohort is not None:
            cohort_recordings = list(_scan(cohort, "cohort", feedback).recordings)
            cohort_speakers = len({r.speaker for r in cohort_recordings})
            if cohort_speakers < 2:
                raise DataError(f"{cohort}: an AS-norm cohort needs at least 2 speakers, found {cohort_speakers}")
        # Both models load before any embedding, so a bad baseline fails in seconds, not after a pass.
        candidate_model, candidate_loaded = _embedder(checkpoint, variant, device, recordings, feedback)
        baseline_model, baseline_loaded = (None, None) if baseline is None else _embedder(
            baseline, None, device, recordings, feedback)
        for loaded, name in ((candidate_loaded, checkpoint), (baseline_loaded, baseline)):
            if loaded is not None and loaded.plda is not None and cohort_recordings is not None:
                raise DataError(f"{name} scores by PLDA, and AS-norm (--cohort) normalises cosine scores: "
                                "evaluate without --cohort")

        def measure(embedder: Embedder, label: str) -> tuple[Evaluation, VerificationMetrics]:
            loaded = candidate_loaded if embedder is candidate_model else baseline_loaded
            evaluation = evaluate(embedder, recordings, trials, cohort=cohort_recordings, top_k=top_k,
                                  progress=feedback.track(f"embedding ({label})"), plda=loaded.plda,
                                  calibration=loaded.calibration)
            # evaluate() measures at the default costs; --p-target and --threshold apply here.
            return evaluation, compute_metrics(evaluation.scores, evaluation.labels, p_target=p_target,
                                               threshold=threshold)

        candidate, metrics = measure(candidate_model, "candidate")
        reference = None
        if baseline_model is not None:
            before, before_metrics = measure(baseline_model, "baseline")
            intervals = bootstrap_differences(before.scores, candidate.scores, candidate.labels, before_metrics,
                                              metrics, seed=seed)
            reference = Baseline(before_metrics, before.scores, before.labels, intervals=intervals)

    directory = report_dir if report_dir is not None else _default_report_dir(checkpoint, data)
    extra: dict[str, Any] = {"scores": candidate.score_kind}
    if candidate.calibration is not None:
        extra["calibration"] = candidate.calibration.to_dict()
    files = write_report(directory, metrics, candidate.scores, candidate.labels, candidate.trials,
                         baseline=reference, extra=extra)
    record: dict[str, Any] = metrics.to_dict() | extra
    if reference is not None:
        record["baseline"] = reference.metrics.to_dict()
        record["comparison"] = compare_metrics(reference.metrics, metrics, reference.intervals)
    if as_json:
        typer.echo(json.dumps(record | {"report_dir": str(files.directory)}))
        return

    console = Console(highlight=False)
    scoring = "cosine scores" if candidate.score_kind == "cosine" else "PLDA log-likelihood ratios"
    if cohort_recordings is not None:
        scoring = f"AS-norm scores (top {min(top_k, cohort_speakers)} of {cohort_speakers} cohort speakers)"
    console.print(_metrics_table(metrics, Text(f"{checkpoint}{_adapted(candidate_model)} on {data}, {scoring}")))
    if candidate.calibration is not None:
        console.print(_calibration_table(candidate))
    if reference is not None:
        console.print(_comparison_table(record["comparison"]))
    console.print(f"report written to {files.directory}", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
