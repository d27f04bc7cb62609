"""Step 6: the run, live — progress and ETA, curves, validation EER per epoch; cancel and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Button, DataTable, ProgressBar, Static
from textual.worker import get_current_worker

from spkft.core.train import EpochEnded, RunFinished, Trainer, TrainConfig, Validated
from spkft.tui.wizard.draft import TrainingLog
from spkft.tui.wizard.plots import EerPlot, LossPlot
from spkft.tui.wizard.step import StepScreen
from spkft.tui.wizard.steps.review import duration

ENDINGS = {
    "completed": "Training finished.",
    "early_stopped": "Training stopped early: the validation EER stopped improving.",
    "cancelled": "Training cancelled; the last completed epoch's checkpoint is kept and the run can be resumed.",
}
CANCELLED_EARLY = ("Training cancelled before any epoch completed: no checkpoint was saved, so there is nothing "
                   "to resume. Start again when you are ready.")


class TrainingProgress(Message):
    """The training log grew; a newer one replaces an older one still in the queue."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TrainingProgress)


class TrainingEnded(Message):
    """The trainer returned (finished, stopped early or cancelled), whatever it logged."""


class TrainingFailed(Message):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error


def restored_log(run_dir: Path, config: TrainConfig) -> TrainingLog:
    """A run's finished epochs read back from its metrics.jsonl, for a run reopened in a new session.

    The starting model's validation and each epoch come back as the events the trainer sent, with
    the best epoch recounted as the trainer counts it; each epoch's mean loss and accuracy stand at
    its last step, since per-step figures are not kept on disk.
    """
    try:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return TrainingLog(run_dir)
    events: list = []
    best_eer, best_epoch, stale = math.inf, 0, 0
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            continue  # the average's line
        if record["epoch"] == 0:
            events.append(Validated(0, record["val_eer"], record["val_min_dcf"]))
            continue
        is_best = record["val_eer"] < best_eer
        best_eer, best_epoch, stale = ((record["val_eer"], record["epoch"], 0) if is_best
                                       else (best_eer, best_epoch, stale + 1))
        events.append(EpochEnded(record["epoch"], config.run.epochs, record["train_loss"], record["train_accuracy"],
                                 record["val_eer"], record["val_min_dcf"], best_eer, best_epoch, is_best, stale,
                                 config.run.patience, record.get("seconds", 0.0)))
    return TrainingLog(run_dir, events)


def kept_for_resume(log: TrainingLog) -> TrainingLog:
    """The events of ``log`` up to its last completed epoch: what a resumed run continues from."""
    ends = [i for i, event in enumerate(log.events) if isinstance(event, EpochEnded)]
    return TrainingLog(log.run_dir, log.events[: ends[-1] + 1] if ends else [])


class TrainStep(StepScreen):
    NUMBER = 6
    HEADING = "Training"
    NEXT_LABEL = "Evaluate"

    running: reactive[bool] = reactive(False, init=False)

    def compose_body(self) -> ComposeResult:
        yield Static(id="run-line", markup=False)
        yield ProgressBar(id="progress", show_eta=False)
        with Horizontal(id="curves"):
            yield LossPlot(id="loss-plot")
            yield EerPlot(id="eer-plot")
        yield Static(id="best", markup=False)
        yield DataTable(id="epochs", cursor_type="row", zebra_stripes=True)
        # Docked: the controls that stop or steer the run stay in view however long the epoch table grows.
        with Horizontal(classes="actions", id="run-controls"):
            yield Button("Cancel", id="cancel", variant="error", compact=True)
            yield Button("Resume", id="resume", compact=True)
            yield Button("Start again", id="restart", compact=True)

    def on_mount(self) -> None:
        self.query_one("#epochs", DataTable).add_columns("epoch", "loss", "accuracy", "val EER", "minDCF", "")
        if self.draft.resume is not None:
            resume, self.draft.resume = self.draft.resume, None
            self.start(resume)
        elif self.draft.training is not None:
            self.show_log()
        else:
            self.query_one("#run-line", Static).update("No run yet: go back to step 5 and start one.")
        self.show_controls()

    def start(self, resume: bool) -> None:
        config = self.draft.config
        previous = self.draft.training
        if resume and previous is not None and previous.run_dir == Path(config.run.output_dir):
            self.draft.training = kept_for_resume(previous)
        elif resume:  # a run of an earlier session: its epochs so far, from disk
            self.draft.training = restored_log(Path(config.run.output_dir), config)
        else:
            self.draft.training = TrainingLog(Path(config.run.output_dir))
        self.draft.evaluation = None
        self.running = True
        self.query_one("#run-line", Static).update(
            "Resuming from the last checkpoint…" if resume else
            "Preparing: scanning the data, building the model, validating the starting model (epoch 0)…")
        self.train(config, resume, self.draft.training)

    @work(thread=True, exclusive=True, exit_on_error=False, group="train")
    def train(self, config: TrainConfig, resume: bool, log: TrainingLog) -> None:
        # The worker's cancel event is the trainer's stop: Cancel, and quitting the app, stop it after a step.
        stop = get_current_worker().cancelled_event

        def sink(event) -> None:
            log.events.append(event)
            self.post_message(TrainingProgress())

        try:
            Trainer(config, sink=sink, stop=stop, resume=resume).run()
        except Exception as error:  # reported by message: a cancelled worker reports no state change
            self.post_message(TrainingFailed(error))
        else:
            self.post_message(TrainingEnded())

    def on_training_ended(self, message: TrainingEnded) -> None:
        self.running = False
        self.say("")  # "Stopping after this step…" is over
        self.show_log()

    def on_training_progress(self, message: TrainingProgress) -> None:
        self.show_log()

    def on_training_failed(self, message: TrainingFailed) -> None:
        self.running = False
        self.query_one("#run-line", Static).update(f"Training failed: {message.error}")
        self.show_error(message.error)

    def show_log(self) -> None:
        log = self.draft.training
        started, steps, epochs, finished = log.started, log.steps, log.epochs, log.finished
        if finished is not None:
            self.running = False
        if started is not None:
            bar = self.query_one("#progress", ProgressBar)
            done = steps[-1].global_step if steps else started.start_epoch * started.steps_per_epoch
            bar.update(total=started.epochs * started.steps_per_epoch, progress=done)
        self.query_one("#run-line", Static).update(self.run_line())
        stepped = {s.epoch for s in steps}
        per_step = started.steps_per_epoch if started is not None else 1
        earlier = [(e.epoch * per_step, e.train_loss, e.train_accuracy) for e in epochs if e.epoch not in stepped]
        self.query_one("#loss-plot", LossPlot).show(steps, earlier)
        self.query_one("#eer-plot", EerPlot).show(log.initial, epochs)
        self.query_one("#best", Static).update(self.best_line())
        table = self.query_one("#epochs", DataTable)
        if table.row_count != len(epochs):
            table.clear()
            best = epochs[-1].best_epoch if epochs else None
            for e in epochs:
                table.add_row(str(e.epoch), f"{e.train_loss:.3f}", f"{e.train_accuracy:.1%}", f"{e.val_eer:.2%}",
                              f"{e.val_min_dcf:.3f}", "best" if e.epoch == best else "")

    def run_line(self) -> str:
        log = self.draft.training
        finished, steps, started = log.finished, log.steps, log.started
        if finished is not None:
            if finished.reason == "cancelled" and not self.resumable():
                return CANCELLED_EARLY
            where = f" Best checkpoint: {finished.best_checkpoint}" if finished.best_checkpoint else ""
            return ENDINGS[finished.reason] + where
        if not steps or (started is not None and steps[-1].epoch <= started.start_epoch):
            if started is None:
                return "Preparing: scanning the data, building the model…"
            return (f"Training {started.train_recordings} recordings of {started.train_speakers} speakers on "
                    f"{started.device} ({started.precision}); validating on {started.val_trials} trials…")
        s = steps[-1]
        phase = f" · {log.phase.description}" if log.phase is not None else ""
        return (f"epoch {s.epoch}/{started.epochs} · step {s.step}/{s.steps} · loss {s.loss:.3f} · "
                f"accuracy {s.accuracy:.1%} · lr {s.lr:.1e} · margin {s.margin:.2f} · "
                f"ETA {duration(s.eta_seconds)}{phase}")

    def best_line(self) -> str:
        log = self.draft.training
        initial = f"starting model {log.initial.val_eer:.2%}" if log.initial is not None else ""
        if not log.epochs:
            return f"Validation EER: {initial}" if initial else ""
        last = log.epochs[-1]
        line = f"Best validation EER {last.best_eer:.2%} at epoch {last.best_epoch} ({initial})"
        if last.patience:
            left = last.patience - last.epochs_without_improvement
            line += (f" · early stopping: {last.epochs_without_improvement} of {last.patience} epochs without "
                     f"improvement, {left} to go" if last.epochs_without_improvement else
                     f" · early stopping after {last.patience} epochs without improvement")
        return line

    def watch_running(self) -> None:
        self.show_controls()

    def resumable(self) -> bool:
        log = self.draft.training
        return log is not None and (log.run_dir / "last.ckpt").is_file()

    def show_controls(self) -> None:
        """Cancel while a run is going; then Resume when a cancelled run saved a checkpoint, else Start again."""
        self.query_one("#cancel", Button).display = self.running
        log = self.draft.training
        cancelled = (log is not None and not self.running and isinstance(log.finished, RunFinished)
                     and log.finished.reason == "cancelled")
        self.query_one("#resume", Button).display = cancelled and self.resumable()
        self.query_one("#restart", Button).display = cancelled and not self.resumable()
        self.query_one("#run-controls").display = self.running or cancelled

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.say("Stopping after this step…")
            self.workers.cancel_group(self, "train")
        elif event.button.id == "resume":
            self.start(resume=True)
        elif event.button.id == "restart":
            self.start(resume=False)

    def back_blocker(self) -> str | None:
        return "Training is running: Cancel it first." if self.running else None

    def blocker(self) -> str | None:
        if self.running:
            return "Training is running: wait for it, or Cancel."
        finished = self.draft.training.finished if self.draft.training is not None else None
        if finished is None or finished.best_checkpoint is None:
            return "There is no trained checkpoint to evaluate yet."
        return None
