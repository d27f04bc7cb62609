"""Step 4: the hyperparameters, each validated as typed; the recipe's values, or defaults for this data and model."""

from __future__ import annotations

import math
import statistics
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Label, Static
from textual.worker import Worker, WorkerState

from spkft.core.errors import DeviceError
from spkft.core.train.memory import BatchSuggestion, suggest_batch_size
from spkft.core.train.plausible import UPSTREAM_LR, data_batch, implausible
from spkft.core.train.recipes import training_data
from spkft.core.train.runtime import pick_device
from spkft.tui.wizard.draft import Draft
from spkft.tui.wizard.fields import Field, InputField, PathField, SelectField
from spkft.tui.wizard.step import StepScreen

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def median_seconds(draft: Draft) -> float:
    return statistics.median(r.duration_seconds or 0.0 for r in draft.scan.recordings)


def suggestions(draft: Draft) -> dict[str, Any]:
    """Defaults for the chosen data and model: fine-tuning or not, and how long the recordings are."""
    pretrained = draft.config.model.init is not None
    # Crops no longer than a typical recording, so most crops hold speech rather than repeats of it.
    crop = min(3.0, max(1.0, math.floor(median_seconds(draft) * 2) / 2))
    return {"optim.lr": UPSTREAM_LR / 20 if pretrained else UPSTREAM_LR / 2,
            "run.epochs": 10 if pretrained else 30,
            "augment.crop_seconds": crop}


def devices(current: str) -> list[tuple[str, str]]:
    names = ["auto", "cpu"] + (["cuda"] if pick_device("auto").type == "cuda" else [])
    if current not in names:
        names.append(current)
    return [(name, name) for name in names]


class SettingsStep(StepScreen):
    NUMBER = 4
    HEADING = "Hyperparameters"

    def __init__(self, draft: Draft) -> None:
        super().__init__(draft)
        if draft.recipe is None:  # opened without step 3 before it
            draft.settle_recipe()
        # A recipe's values are set by now, so these fill in only what no recipe set (and the user did not).
        if not draft.suggested:
            for key, value in suggestions(draft).items():
                if not draft.is_explicit(key):
                    draft.set(key, value)
            draft.suggested = True

    def compose_body(self) -> ComposeResult:
        draft = self.draft
        pretrained = draft.config.model.init is not None
        median = median_seconds(draft)
        lr_hint = (f"Fine-tuning: 1/10–1/100 of the original {UPSTREAM_LR:g}, so {UPSTREAM_LR / 100:g}–"
                   f"{UPSTREAM_LR / 10:g}; too high erases what the checkpoint knows." if pretrained else
                   f"From scratch: 3D-Speaker uses {UPSTREAM_LR:g} with large multi-GPU batches.")
        yield Static(id="recipe-line", markup=False)
        yield Label("Learning", classes="section")
        yield InputField(draft, "optim.lr", "Learning rate", lr_hint)
        yield SelectField(draft, "optim.optimizer", "Optimiser", [("SGD, Nesterov momentum", "sgd"), ("AdamW", "adamw")],
                          "SGD as 3D-Speaker trains; AdamW adapts each weight's step and forgives a rougher lr.")
        yield InputField(draft, "optim.weight_decay", "Weight decay")
        yield InputField(draft, "run.epochs", "Epochs", "At most this many passes; early stopping may end sooner.")
        yield InputField(draft, "run.batch_size", "Batch size", "Crops per step; more steadies the gradient, "
                         "needs more memory.", id="batch-size")
        with Horizontal(classes="actions"):
            yield Static("Measuring the memory one crop takes…", id="batch-advice", markup=False)
            yield Button("Use it", id="use-batch", compact=True, disabled=True)
            yield Button("Measure again", id="measure-batch", compact=True)
        yield InputField(draft, "run.steps_per_epoch", "Steps per epoch", "Blank: one pass over the training "
                         "recordings per epoch; a number makes epochs that long.", optional=True)
        yield Label("Schedule", classes="section")
        yield SelectField(draft, "optim.schedule", "Schedule", [("warmup, then cosine decay", "cosine"),
                                                                ("warmup, then constant", "constant")])
        yield InputField(draft, "optim.warmup_epochs", "Warmup epochs")
        yield Label("Margin head (AAM-softmax)", classes="section")
        yield InputField(draft, "head.margin", "Margin", "How far apart the head pushes speakers (radians); "
                         "it rises from 0 over the first epochs while the new head settles.")
        yield InputField(draft, "head.scale", "Scale")
        yield InputField(draft, "head.stats_dropout", "Dropout", "Drops pooled statistics at random while "
                         "training, so a few speakers are not learnt by heart; 0 = off.")
        yield InputField(draft, "head.label_smoothing", "Label smoothing", "Moves a little of each target onto "
                         "the other speakers, so the head is never certain on few recordings; 0 = off.")
        yield Label("Crops and augmentation", classes="section")
        yield InputField(draft, "augment.crop_seconds", "Crop length (s)", f"Each step trains on random crops "
                         f"this long; your recordings last {median:.1f} s at the median.", id="crop")
        yield PathField(draft, "augment.noise_dir", "Noise folder", "Recordings of noise (MUSAN-style) mixed "
                        "into crops, so the model learns to ignore it. Blank: none.", optional=True)
        yield PathField(draft, "augment.rir_dir", "Room responses", "Room impulse responses to reverberate "
                        "crops with. Blank: none.", optional=True)
        yield Label("Stopping", classes="section")
        yield InputField(draft, "run.patience", "Patience", "Stop after this many epochs without a better "
                         "validation EER; blank: never stop early.", optional=True)
        yield Label("Hardware", classes="section")
        yield SelectField(draft, "run.device", "Device", devices(draft.config.run.device), "auto: the GPU when "
                          "there is one.", id="device")
        yield SelectField(draft, "run.precision", "Precision", [(p, p) for p in PRECISIONS])

    def on_mount(self) -> None:
        self.training_recordings = training_data(self.draft.config, self.draft.scan).recordings
        self.show_recipe()
        if self.draft.batch is None:
            self.measure()
        else:
            self.show_batch(self.draft.batch)
        self.show_warnings()

    def show_warnings(self) -> None:
        """Beside each field, why its value is very likely a slip, if it is."""
        warnings = implausible(self.draft.config, self.training_recordings, self.draft.batch)
        for field in self.query(InputField):
            field.show_warning(warnings.get(field.key))

    def suggested_batch(self, memory: BatchSuggestion) -> int:
        """The memory's suggestion, held to at least 4 steps per pass over the training recordings."""
        return min(memory.batch_size, data_batch(self.training_recordings))

    def show_recipe(self) -> None:
        text = f"Recipe {self.draft.recipe_line()}"
        if self.draft.config.recipe is not None:
            text += ". Its values are below; changing one makes the choice custom."
        self.query_one("#recipe-line", Static).update(text)

    def on_field_changed(self, event: Field.Changed) -> None:
        self.show_recipe()
        self.show_warnings()

    def measure(self) -> None:
        self.query_one("#batch-advice", Static).update("Measuring the memory one crop takes…")
        self.suggest_batch(self.draft.config.augment.crop_seconds, self.draft.config.run.device)

    @work(thread=True, exclusive=True, exit_on_error=False, group="batch")
    def suggest_batch(self, crop_seconds: float, device: str) -> BatchSuggestion:
        return suggest_batch_size(self.draft.model.model, crop_seconds, pick_device(device))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.SUCCESS and event.worker.name == "suggest_batch":
            suggestion: BatchSuggestion = event.worker.result
            self.draft.batch = suggestion
            if not self.draft.is_explicit("run.batch_size"):
                self.draft.set("run.batch_size", self.suggested_batch(suggestion))
                self.query_one("#batch-size", InputField).refresh_value()
            self.show_batch(suggestion)
            self.show_warnings()

    def show_batch(self, suggestion: BatchSuggestion) -> None:
        gigabytes = suggestion.free_bytes / 2**30
        memory = f"{gigabytes:.1f} GiB free, {suggestion.bytes_per_crop / 2**20:.0f} MiB per crop (measured)"
        batch = self.suggested_batch(suggestion)
        text = (f"Suggested {batch}: {memory}." if batch == suggestion.batch_size else
                f"Suggested {batch}: at least 4 steps per pass over {self.training_recordings} training "
                f"recordings (memory allows {suggestion.batch_size}: {memory}).")
        self.query_one("#batch-advice", Static).update(text)
        self.query_one("#use-batch", Button).disabled = False

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "use-batch" and self.draft.batch is not None:
            self.draft.set("run.batch_size", self.suggested_batch(self.draft.batch))
            self.query_one("#batch-size", InputField).refresh_value()
            self.show_warnings()
        elif event.button.id == "measure-batch":
            self.measure()

    def blocker(self) -> str | None:
        invalid = [field.label for field in self.query(Field) if field.problem]
        if invalid:
            return f"Correct {', '.join(invalid)} first."
        try:
            pick_device(self.draft.config.run.device)
        except DeviceError as error:
            return str(error)
        return None
