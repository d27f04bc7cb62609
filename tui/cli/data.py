"""``spkft data check`` and ``spkft data demo``: look at a data source before training on it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from spkft.core.audio import MIN_SECONDS
from spkft.core.data import DEMO_RECORDINGS, DEMO_SPEAKERS, DEMO_TEST_SPEAKERS, ScanReport, scan, write_demo
from spkft.core.features import SAMPLE_RATE

data_app = typer.Typer(
    name="data",
    help="Check data sources and write a small synthetic demo set.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

# The widest histogram bar, in characters.
_BAR_WIDTH = 40
# Excluded rows listed in full up to this many; beyond it, the first few of each reason.
_LIST_ALL_UP_TO = 20
_FIRST_PER_REASON = 3


@data_app.command()
def check(
    source: Annotated[Path, typer.Argument(
        help="A CSV list (path,speaker), 3D-Speaker's train.csv, a folder of speaker folders "
             "or a Kaldi data directory.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    min_seconds: Annotated[float, typer.Option(
        "--min-seconds", min=0.0, help="Exclude recordings shorter than this many seconds.")] = MIN_SECONDS,
    min_recordings: Annotated[int, typer.Option(
        "--min-recordings-per-speaker", min=1,
        help="Exclude speakers with fewer usable recordings than this.")] = 1,
    show_all: Annotated[bool, typer.Option(
        "--all", help=f"List every excluded row; by default a long list shows the first {_FIRST_PER_REASON} "
                      "of each reason.")] = False,
) -> None:
    """Scan a data source: usable recordings, what will be fixed, and every excluded row and why.

    Exits 0 when the source could be scanned, even if rows were excluded.
    """
    if as_json:
        report = scan(source, min_seconds=min_seconds, min_recordings_per_speaker=min_recordings)
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    # Progress goes to stderr, so the report on stdout stays clean when redirected.
    with Progress(TextColumn("reading audio headers"), BarColumn(), MofNCompleteColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("scan", total=None)
        report = scan(source, min_seconds=min_seconds, min_recordings_per_speaker=min_recordings,
                      progress=lambda done, total: bar.update(task, completed=done, total=total))
    _print_report(report, Console(highlight=False), show_all)


@data_app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="A new or empty folder to write into.", show_default=False)],
    speakers: Annotated[int, typer.Option("--speakers", min=2, help="Synthetic speakers to train on (train/).")] = DEMO_SPEAKERS,
    test_speakers: Annotated[int, typer.Option(
        "--test-speakers", min=0, help="Other synthetic speakers to test on (test/); 0 writes one folder.")] = DEMO_TEST_SPEAKERS,
    recordings_per_speaker: Annotated[int, typer.Option(
        "--recordings-per-speaker", min=2, help="Recordings of each synthetic speaker.")] = DEMO_RECORDINGS,
    seed: Annotated[int, typer.Option("--seed", help="The same seed writes the same audio.")] = 0,
) -> None:
    """Write a small SYNTHETIC multi-speaker set (not real speech) to try spkft end to end."""
    root = write_demo(directory, speakers=speakers, recordings_per_speaker=recordings_per_speaker, seed=seed,
                      test_speakers=test_speakers)
    parts = (f"train/ ({speakers} speakers) and test/ ({test_speakers} other speakers)" if test_speakers
             else f"{speakers} speakers")
    typer.echo(f"wrote a SYNTHETIC demo set (not real speech) to {root}: {parts}, {recordings_per_speaker} "
               "recordings each, 16 kHz WAV, one folder per speaker, plus manifest.csv")
    typer.echo("its voices are generated (pitch and formants per speaker); results on it say nothing "
               "about real recordings")
    typer.echo(f"next: spkft data check {root / 'train' if test_speakers else root}")


def _print_report(report: ScanReport, console: Console, show_all: bool) -> None:
    summary = Table(title="Data source", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    per_speaker = list(report.recordings_per_speaker.values())
    rows = [
        ("source", str(report.source)),
        ("kind", report.kind.value),
        ("usable recordings", str(len(report.recordings))),
        ("excluded rows", str(len(report.excluded))),
        ("speakers", str(len(per_speaker))),
        ("recordings per speaker", f"{min(per_speaker)} min, {max(per_speaker)} max" if per_speaker else "-"),
        ("audio files", str(report.files)),
        ("total", f"{report.total_hours:.2f} h ({report.total_seconds:.0f} s)"),
        ("minimum length", f"{report.min_seconds:.3f} s"),
    ]
    if report.synthetic:
        rows.insert(2, ("data", "SYNTHETIC demo set (generated voices, not real speech)"))
    for name, value in rows:
        summary.add_row(name, Text(value))
    console.print(summary)

    formats = Table(title="Audio formats (usable recordings)", title_justify="left")
    formats.add_column("property")
    formats.add_column("value", justify="right")
    formats.add_column("recordings", justify="right")
    formats.add_column("fix")
    for rate, count in report.sample_rates.items():
        formats.add_row("sample rate", f"{rate} Hz", str(count),
                        "" if rate == SAMPLE_RATE else f"resampled to {SAMPLE_RATE} Hz")
    for channels, count in report.channels.items():
        formats.add_row("channels", str(channels), str(count),
                        "" if channels == 1 else "down-mixed to mono (mean)")
    console.print(formats)
    console.print(f"fixed when read: {report.resampled} resampled, {report.downmixed} down-mixed")

    histogram = Table(title="Durations (usable recordings)", title_justify="left")
    histogram.add_column("length")
    histogram.add_column("recordings", justify="right")
    histogram.add_column("")
    largest = max((b.count for b in report.duration_histogram), default=0)
    for b in report.duration_histogram:
        # Any non-empty bin gets at least one mark, so rare lengths stay visible.
        width = max(1, round(_BAR_WIDTH * b.count / largest)) if b.count else 0
        histogram.add_row(b.label, str(b.count), "#" * width)
    console.print(histogram)

    if not report.excluded:
        console.print("excluded rows: none")
        return
    reasons = ", ".join(f"{reason} {count}" for reason, count in report.excluded_by_reason.items())
    excluded = Table(title=f"Excluded rows ({reasons})", title_justify="left")
    excluded.add_column("where", overflow="fold")
    excluded.add_column("reason")
    excluded.add_column("file", overflow="fold")
    excluded.add_column("detail", overflow="fold")
    base = report.source if report.source.is_dir() else report.source.parent
    shown = report.excluded
    if not show_all and len(shown) > _LIST_ALL_UP_TO:
        shown = _first_of_each_reason(shown, _FIRST_PER_REASON)
    for row in shown:
        excluded.add_row(Text(row.where), row.reason.value, Text(_shown_path(row.path, base)), Text(row.detail))
    console.print(excluded)
    if len(shown) < len(report.excluded):
        console.print(f"the first {_FIRST_PER_REASON} rows of each reason are shown, {len(shown)} of "
                      f"{len(report.excluded)}: --all lists every one, --json gives them all to a script")


def _first_of_each_reason(rows: list, count: int) -> list:
    seen: Counter = Counter()
    kept = []
    for row in rows:
        seen[row.reason] += 1
        if seen[row.reason] <= count:
            kept.append(row)
    return kept


def _shown_path(path: Path | None, base: Path) -> str:
    if path is None:
        return ""
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app)
