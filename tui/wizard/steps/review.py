"""Step 5: the resolved config, where the run will write, how long it will take; save it, start."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, Input, Label, Static
from textual.worker import Worker, WorkerState, get_current_worker

from spkft.core.train import ConfigError, RunStarted, StepEnded, Trainer, TrainConfig, Validated, check_paths, load_config
from spkft.tui.wizard.draft import Estimate
from spkft.tui.wizard.fields import Field, PathField
from spkft.tui.wizard.step import Move, StepScreen

# Training steps timed for the estimate, after one that warms the kernels up.
TIMED_STEPS = 3
DEFAULT_SAVE_PATH = "spkft-config.yaml"


def resolved(config: TrainConfig) -> TrainConfig:
    """The config as saving and loading it gives it back; raises ConfigError listing every problem."""
    loaded = load_config(None, yaml.safe_load(config.to_yaml()))
    check_paths(loaded)
    return loaded


def basis(config: TrainConfig) -> dict[str, Any]:
    """What the time per epoch depends on: everything but where the run writes."""
    return config.model_dump(exclude={"run": {"output_dir"}})


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class EstimateProgress(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EstimateProgress)


class ReviewStep(StepScreen):
    NUMBER = 5
    HEADING = "Review, save and start"
    NEXT_LABEL = "Start training"

    def compose_body(self) -> ComposeResult:
        yield Static(id="problems", markup=False)
        yield PathField(self.draft, "run.output_dir", "Run folder", "config.yaml, metrics.jsonl, best and last "
                        "checkpoints and the report are written here.", id="output-dir")
        with Horizontal(classes="actions", id="existing-run"):
            yield Static(id="run-state", markup=False)
            yield Button("Resume that run", id="resume", compact=True)
        yield Label("Time", classes="section")
        with Horizontal(classes="actions"):
            yield Static(id="estimate", markup=False)
            yield Button("Measure again", id="measure", compact=True)
        yield Label("Save the config", classes="section")
        with Horizontal(classes="field-row"):
            yield Input(DEFAULT_SAVE_PATH, id="save-path", compact=True)
            yield Button("Save", id="save", compact=True)
        yield Static("spkft train --config FILE runs the same from the command line; spkft-tui --config FILE "
                     "opens the wizard with it.", classes="field-hint")
        yield Label("Resolved config", classes="section")
        yield Static(id="yaml", markup=False)

    def on_mount(self) -> None:
        self.refresh_review()
        estimate = self.draft.estimate
        if self.problems():
            self.query_one("#estimate", Static).update("Measured once the problems above are fixed.")
        elif estimate is None or estimate.basis != basis(self.draft.config):
            self.start_estimate()
        else:
            self.show_estimate()

    def problems(self) -> list[str]:
        try:
            resolved(self.draft.config)
        except ConfigError as error:
            return error.problems
        return []

    @property
    def existing_run(self) -> Path | None:
        last = Path(self.draft.config.run.output_dir) / "last.ckpt"
        return last if last.is_file() else None

    def refresh_review(self) -> None:
        problems = self.problems()
        view = self.query_one("#problems", Static)
        view.update("Problems to fix before starting:\n" + "\n".join(f"  • {p}" for p in problems) if problems else "")
        view.display = bool(problems)
        existing = self.existing_run
        self.query_one("#existing-run").display = existing is not None
        if existing is not None:
            self.query_one("#run-state", Static).update(
                f"{existing.parent} already holds a run: resume it with its own saved config, or choose another folder.")
        self.query_one("#yaml", Static).update(self.draft.config.to_yaml())

    def on_field_changed(self, event: Field.Changed) -> None:
        self.refresh_review()

    def start_estimate(self) -> None:
        self.query_one("#estimate", Static).update("Measuring a few real training steps…")
        self.measure(self.draft.config.model_copy(deep=True))

    @work(thread=True, exclusive=True, exit_on_error=False, group="estimate")
    def measure(self, config: TrainConfig) -> Estimate:
        """Time a few real steps of this run in a scratch folder, then stop it."""
        worker = get_current_worker()
        enough = threading.Event()
        marks: dict[str, Any] = {"steps": []}

        def sink(event) -> None:
            now = time.monotonic()
            if isinstance(event, RunStarted):
                marks["started"], marks["run"] = now, event
                self.post_message(EstimateProgress("Measuring: validating the starting model…"))
            elif isinstance(event, Validated):
                marks["validated"] = now
            elif isinstance(event, StepEnded):
                marks["steps"].append((now, event.epoch))
                self.post_message(EstimateProgress(f"Measuring: step {len(marks['steps'])} of {TIMED_STEPS + 1}…"))
            if len(marks["steps"]) > TIMED_STEPS or worker.is_cancelled:
                enough.set()

        with tempfile.TemporaryDirectory(prefix="spkft-estimate-") as scratch:
            config.run.output_dir = Path(scratch) / "run"
            Trainer(config, sink=sink, stop=enough).run()
        steps, run = marks["steps"], marks["run"]
        # Steps after the first, within one epoch: the first warms up, an epoch's end validates.
        intervals = [b[0] - a[0] for a, b in zip(steps, steps[1:]) if a[1] == b[1]]
        step_seconds = statistics.median(intervals) if intervals else steps[0][0] - marks["validated"]
        return Estimate(step_seconds, marks["validated"] - marks["started"], run.steps_per_epoch, run.epochs,
                        run.train_recordings, run.val_trials, basis(config))

    def on_estimate_progress(self, message: EstimateProgress) -> None:
        self.query_one("#estimate", Static).update(message.text)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.name != "measure":
            return
        if event.state is WorkerState.SUCCESS:
            self.draft.estimate = event.worker.result
            self.show_estimate()
        elif event.state is WorkerState.ERROR:
            self.query_one("#estimate", Static).update("The measurement failed; see the message.")

    def show_estimate(self) -> None:
        e = self.draft.estimate
        self.query_one("#estimate", Static).update(
            f"About {duration(e.epoch_seconds)} per epoch: {e.steps_per_epoch} steps × {e.step_seconds:.2f} s + "
            f"validation {duration(e.validation_seconds)} ({e.val_trials} trials); "
            f"at most {duration(e.epoch_seconds * e.epochs)} for {e.epochs} epochs on "
            f"{e.train_recordings} recordings. Measured on {TIMED_STEPS + 1} real steps.")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        match event.button.id:
            case "measure":
                self.start_estimate()
            case "save":
                self.save()
            case "resume":
                self.resume()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "save-path":
            event.stop()
            self.save()

    def save(self) -> None:
        path = Path(self.query_one("#save-path", Input).value.strip() or DEFAULT_SAVE_PATH).expanduser()
        try:
            path.write_text(self.draft.config.to_yaml())
        except OSError as error:
            self.say(f"Cannot write {path}: {error.strerror or error}", problem=True)
            return
        self.say(f"Saved the config to {path}.")

    def resume(self) -> None:
        run_dir = Path(self.draft.config.run.output_dir)
        try:
            self.draft.config = load_config(run_dir / "config.yaml")
        except ConfigError as error:
            self.say(f"Cannot resume: {error}", problem=True)
            return
        self.draft.recipe = None  # step 3, if visited again, reads the choice off the run's own config
        self.draft.resume = True
        self.dismiss(Move.NEXT)

    def blocker(self) -> str | None:
        if self.problems():
            return "Fix the problems listed at the top first."
        if self.existing_run is not None:
            return f"{self.draft.config.run.output_dir} already holds a run: resume it, or choose another folder."
        return None

    def leave(self) -> None:
        self.draft.resume = False
