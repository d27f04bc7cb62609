"""Step 1: where the recordings are, what a scan of them found, and which speakers are held out."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, Static
from textual.worker import Worker, WorkerState

from spkft.core.catalogue import DEMO_BASE
from spkft.core.data import DEMO_RECORDINGS, DEMO_SPEAKERS, DEMO_TEST_SPEAKERS, ScanReport, SourceKind, scan, write_demo
from spkft.core.errors import DataError
from spkft.core.features import SAMPLE_RATE
from spkft.tui.wizard.dialogs import PromptDialog
from spkft.tui.wizard.fields import Field, InputField, PathField
from spkft.tui.wizard.step import StepScreen

KINDS = {
    SourceKind.CSV: "a CSV list",
    SourceKind.THREED_SPEAKER_CSV: "3D-Speaker's train.csv",
    SourceKind.SPEAKER_FOLDERS: "a folder of speaker folders",
    SourceKind.KALDI: "a Kaldi data directory",
    SourceKind.POOL: "a pool of sources",
}
LIST_SUFFIXES = (".csv", ".tsv", ".scp")
DEMO_FOLDER = "spkft-demo"
# From this many speakers, step 1 holds out TEST_FRACTION of them (at least 2) for testing by default.
TEST_FROM_SPEAKERS = 8
TEST_FRACTION = 0.1
# The widest duration-histogram bar, in characters.
BAR_WIDTH = 30
# Excluded rows listed in the table; the count says how many more there are.
SHOWN_EXCLUDED = 200


class ScanProgress(Message):
    """Audio headers read so far; a newer one replaces an older one still in the queue."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__()
        self.done, self.total = done, total

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ScanProgress)


def summary(report: ScanReport, shown_source: str) -> Text:
    per_speaker = list(report.recordings_per_speaker.values())
    rates = ", ".join(f"{rate} Hz ({n})" for rate, n in report.sample_rates.items()) or "-"
    channels = ", ".join(f"{'mono' if c == 1 else f'{c} channels'} ({n})" for c, n in report.channels.items()) or "-"
    text = Text()
    text.append(f"{shown_source}: {KINDS[report.kind]}", style="bold")
    if report.synthetic:
        text.append("  SYNTHETIC demo set, not real speech", style="bold reverse")
    text.append(f"\n{len(per_speaker)} speakers · {len(report.recordings)} recordings in {report.files} files · "
                f"{report.total_hours:.2f} h")
    if per_speaker:
        low, high = min(per_speaker), max(per_speaker)
        text.append(f" · {low if low == high else f'{low}–{high}'} recordings per speaker")
    text.append(f"\nsample rates {rates} · {channels}")
    text.append(f"\nfixed when read: {report.resampled} resampled to {SAMPLE_RATE} Hz, {report.downmixed} down-mixed")
    reasons = ", ".join(f"{reason} {n}" for reason, n in report.excluded_by_reason.items())
    text.append(f"\nexcluded: {len(report.excluded)} rows" + (f" ({reasons})" if reasons else ""))
    return text


def histogram(report: ScanReport) -> Table:
    table = Table.grid(padding=(0, 1))
    table.add_column(justify="right")
    table.add_column(justify="right")
    table.add_column()
    bins = report.duration_histogram
    largest = max((b.count for b in bins), default=0)
    for b in bins:
        # Any non-empty bin gets a mark, so rare lengths stay visible.
        width = max(1, round(BAR_WIDTH * b.count / largest)) if b.count else 0
        table.add_row(b.label, str(b.count), Text("█" * width, style="cyan"))
    return table


class DataStep(StepScreen):
    NUMBER = 1
    HEADING = "Data: your labelled recordings"

    def compose_body(self) -> ComposeResult:
        yield Static("A CSV list with path and speaker columns, 3D-Speaker's train.csv, a folder with one "
                     "subfolder per speaker, or a Kaldi data directory (wav.scp + utt2spk).", classes="intro")
        yield PathField(self.draft, "data.train", "Recordings", "Type a path or Browse…; Enter scans it.",
                        suffixes=LIST_SUFFIXES, id="source")
        yield InputField(self.draft, "data.min_recordings_per_speaker", "Min. recordings",
                         "Speakers with fewer usable recordings are left out.", id="min-recordings")
        with Horizontal(classes="actions"):
            yield Button("Scan", id="scan", variant="primary", compact=True)
            yield Button("No data? Write the synthetic demo set", id="demo", compact=True)
        yield ProgressBar(id="scan-progress", show_eta=False)
        with Vertical(id="report"):
            yield Static(id="summary")
            yield Label("Durations", classes="section")
            yield Static(id="histogram")
            yield Label("Excluded rows", classes="section", id="excluded-title")
            yield DataTable(id="excluded", cursor_type="row", zebra_stripes=True)
        yield Label("Held-out speakers", classes="section")
        yield InputField(self.draft, "data.val_speakers", "Validation",
                         "Speakers held out to measure each epoch and pick the best: a count (4) or a fraction (0.1).")
        yield InputField(self.draft, "data.test_speakers", "Test",
                         "Speakers held out for the final evaluation (step 7): a count or a fraction; 0 = none, "
                         "step 7 then uses the validation speakers.")
        yield PathField(self.draft, "data.val", "Validation source", "Or a labelled source of its own for "
                        "validation, instead of held-out speakers.", suffixes=LIST_SUFFIXES, optional=True)
        yield PathField(self.draft, "data.test", "Test source", "Or a labelled source of its own for the final "
                        "evaluation, instead of held-out speakers.", suffixes=LIST_SUFFIXES, optional=True)
        yield Static(id="split", markup=False)
        yield Label("Rehearsal recordings (optional)", classes="section")
        yield PathField(self.draft, "data.rehearsal", "Rehearsal source", "Labelled speech of many speakers from "
                        "the domain the pretrained model knows, mixed into every batch so fine-tuning does not "
                        "forget it. Blank: none.", suffixes=LIST_SUFFIXES, optional=True)

    def on_mount(self) -> None:
        self.query_one("#scan-progress").display = False
        if self.draft.scan is not None:
            self.show_report()
        else:
            self.query_one("#report").display = False
            if self.draft.config.data.train is not None:  # prefilled from a saved config
                self.start_scan()

    @property
    def source_text(self) -> str:
        return self.query_one("#source", PathField).input.value.strip()

    def start_scan(self) -> None:
        if self.query_one("#source", PathField).problem or self.query_one("#min-recordings", Field).problem:
            self.say("Correct the highlighted field first.", problem=True)
            return
        self.say("Scanning: reading every file's header…")
        bar = self.query_one("#scan-progress", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True
        self.scan_source(self.source_text, self.draft.config.data.min_recordings_per_speaker)

    @work(thread=True, exclusive=True, exit_on_error=False, group="scan")
    def scan_source(self, source: str, min_recordings: int) -> tuple[str, ScanReport]:
        report = scan(source, min_recordings_per_speaker=min_recordings,
                      progress=lambda done, total: self.post_message(ScanProgress(done, total)))
        return source, report

    @work(thread=True, exclusive=True, exit_on_error=False, group="scan")
    def write_demo_set(self, folder: str) -> str:
        write_demo(folder)
        return folder

    def adopt_demo_set(self, folder: str) -> None:
        """Train on the demo's train/, test on its test/ (voices never trained on), and start from the
        bundled demo base unless a model has been chosen already: the demo then shows fine-tuning at work."""
        root = Path(folder)
        self.draft.set("data.test", root / "test")
        self.draft.set("data.test_speakers", 0)
        for field in self.query(Field):
            if field.key in ("data.test", "data.test_speakers"):
                field.refresh_value()
        if self.draft.model is None and not self.draft.is_explicit("model.init") and not self.draft.fresh_model:
            self.draft.set("model.init", Path(DEMO_BASE))
        self.query_one("#source", PathField).input.value = str(root / "train")
        self.start_scan()

    def on_scan_progress(self, message: ScanProgress) -> None:
        self.query_one("#scan-progress", ProgressBar).update(total=message.total, progress=message.done)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self.query_one("#scan-progress").display = False
        if event.state is not WorkerState.SUCCESS:
            return
        if event.worker.name == "write_demo_set":
            self.adopt_demo_set(event.worker.result)
        elif event.worker.name == "scan_source":
            self.draft.scanned, self.draft.scan = event.worker.result
            self.query_one("#scan-progress").display = False
            self.hold_out_test_speakers()
            self.show_report()

    def hold_out_test_speakers(self) -> None:
        """With enough speakers, hold some out for step 7's test unless told otherwise: figures on the
        validation speakers, which chose the best epoch, flatter the model."""
        data = self.draft.config.data
        speakers = len(self.draft.scan.speakers)
        if self.draft.is_explicit("data.test_speakers") or data.test is not None or speakers < TEST_FROM_SPEAKERS:
            return
        self.draft.set("data.test_speakers", max(2, round(TEST_FRACTION * speakers)))
        next(f for f in self.query(InputField) if f.key == "data.test_speakers").refresh_value()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "scan":
            self.start_scan()
        elif event.button.id == "demo":
            self.app.push_screen(PromptDialog(
                "Synthetic demo set", "Generated voices (not real speech) to try the whole wizard: "
                f"{DEMO_SPEAKERS} speakers to fine-tune on and {DEMO_TEST_SPEAKERS} others to test on, "
                f"{DEMO_RECORDINGS} recordings each, 16 kHz WAV. Step 2 then starts from {DEMO_BASE}, a small "
                "model bundled with spkft that knows real English speech but has never heard these voices. "
                "Folder to write it to (new or empty):", DEMO_FOLDER), self._demo_folder_chosen)

    def _demo_folder_chosen(self, folder: str | None) -> None:
        if folder is not None:
            self.say(f"Writing the demo set to {folder}…")
            self.write_demo_set(folder)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if self.query_one("#source", PathField).input is event.input:
            event.stop()
            self.start_scan()

    def on_field_changed(self, event: Field.Changed) -> None:
        self.show_split()

    def show_report(self) -> None:
        report = self.draft.scan
        self.query_one("#report").display = True
        self.query_one("#summary", Static).update(summary(report, self.draft.scanned or str(report.source)))
        self.query_one("#histogram", Static).update(histogram(report))
        table = self.query_one("#excluded", DataTable)
        table.clear(columns=True)
        table.add_columns("where", "reason", "detail")
        for row in report.excluded[:SHOWN_EXCLUDED]:
            table.add_row(row.where, row.reason.value, row.detail)
        hidden = len(report.excluded) - SHOWN_EXCLUDED
        if hidden > 0:
            table.add_row("…", "", f"and {hidden} more rows: `spkft data check --json` lists them all")
        table.display = bool(report.excluded)
        self.query_one("#excluded-title").display = bool(report.excluded)
        self.say(f"Scanned {self.draft.scanned}." if report.recordings else "Nothing usable was found.",
                 problem=not report.recordings)
        self.show_split()

    def show_split(self) -> None:
        if self.draft.scan is None:
            return
        view = self.query_one("#split", Static)
        try:
            split = self.draft.split()
        except DataError as error:
            view.update(str(error))
            view.add_class("-problem")
            return
        view.remove_class("-problem")
        data = self.draft.config.data

        def count(part: tuple) -> str:
            return f"{len(split.speakers_of(part))} speakers ({len(part)} recordings)"

        val = f"from {data.val}" if data.val else count(split.val)
        test = f"from {data.test}" if data.test else count(split.test) if split.test else "none"
        view.update(f"Training {count(split.train)} · validation {val} · test {test}")

    def blocker(self) -> str | None:
        if any(field.problem for field in self.query(Field)):
            return "Correct the highlighted fields first."
        if self.draft.scan is None or self.draft.scanned != self.source_text:
            return "Scan the recordings first (Scan, or Enter in the path)."
        if self.draft.scan.min_recordings_per_speaker != self.draft.config.data.min_recordings_per_speaker:
            return "The minimum number of recordings changed: scan again."
        if not self.draft.scan.recordings:
            return "The scan found no usable recordings; see the excluded rows."
        try:
            self.draft.split()
        except DataError as error:
            return str(error)
        return None

    def leave(self) -> None:
        self.draft.set("data.train", Path(self.draft.scanned))
