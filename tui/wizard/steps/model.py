"""Step 2: the model fine-tuning starts from — a pretrained checkpoint, or a fresh network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.validation import Integer
from textual.widgets import Button, Input, RadioButton, RadioSet, Select, Static
from textual.worker import Worker, WorkerState

from spkft.core.checkpoint import load_model
from spkft.core.model import DEFAULT_VARIANT, VARIANTS, build_model, count_parameters
from spkft.core.train.freeze import summarise
from spkft.tui.wizard.draft import ModelInfo
from spkft.tui.wizard.fields import Field, PathField, SelectField
from spkft.tui.wizard.step import StepScreen

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UPSTREAM_CHANNELS = VARIANTS[DEFAULT_VARIANT].m_channels


def millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def describe(variant: str) -> str:
    config = VARIANTS[variant]
    return f"{variant} (baseWidth {config.baseWidth}, scale {config.scale}, expansion {config.expansion})"


def choice_of(init: Path | None, variant: str | None, args: dict[str, Any]) -> str:
    """What a model choice is, as text: two choices that print alike build the same model."""
    return str(init) if init is not None else f"fresh {variant} {sorted(args.items())}"


def model_info(init: Path | None, variant: str | None, args: dict[str, Any]) -> ModelInfo:
    """Load the checkpoint ``init`` (its variant read off the file), or build a fresh ``variant``."""
    if init is not None:
        loaded = load_model(init)
        model, variant = loaded.model, loaded.variant
        check = (f"✓ {init.name} loaded: all {len(model.state_dict())} tensors match {variant} "
                 "key for key and shape for shape")
        if loaded.adaptation is not None:
            # Fine-tuning moves the embeddings the adaptation was fitted on; refit it on the result.
            check += (f"; its {loaded.adaptation.method} adaptation is left out of fine-tuning "
                      "(fit a new one on the fine-tuned model with spkft adapt)")
    else:
        model = build_model(variant, **args)
        check = f"✓ a fresh {variant} built with random weights"
    stages = {stage: count for stage, (count, _) in summarise(model, ()).stages.items()}
    return ModelInfo(model, variant, count_parameters(model), stages, check, choice_of(init, variant, args))


class WidthField(Field):
    """``m_channels`` of a fresh model: the width every stage is a multiple of."""

    def compose_control(self) -> ComposeResult:
        value = self.draft.config.model.args.get("m_channels", UPSTREAM_CHANNELS)
        yield Input(str(value), validators=[Integer(minimum=4, maximum=256)], compact=True, id="m-channels")

    def on_input_changed(self, event: Input.Changed) -> None:
        if not self.accept(event):
            return
        width = int(event.value)
        self.draft.config.model.args = {} if width == UPSTREAM_CHANNELS else {"m_channels": width}


class ModelStep(StepScreen):
    NUMBER = 2
    HEADING = "Model: where fine-tuning starts"

    def compose_body(self) -> ComposeResult:
        fresh = self.draft.fresh_model
        yield Static("Fine-tune a released checkpoint (3D-Speaker's pretrained_eres2netv2w24s4ep4.ckpt above "
                     "all): it already knows voices and needs little data. A fresh network starts from random "
                     "weights and needs thousands of speakers.", classes="intro")
        with RadioSet(id="mode"):
            yield RadioButton("Fine-tune a pretrained checkpoint", id="pretrained", value=not fresh)
            yield RadioButton("Train a fresh model", id="fresh", value=fresh)
        with Vertical(id="pretrained-form"):
            yield PathField(self.draft, "model.init", "Checkpoint", "A 3D-Speaker .ckpt or an spkft checkpoint; "
                            "the variant is read off its tensor shapes.", suffixes=CHECKPOINT_SUFFIXES,
                            folders=False, optional=True, id="checkpoint")
        with Vertical(id="fresh-form"):
            yield SelectField(self.draft, "model.variant", "Variant", [(describe(v), v) for v in VARIANTS],
                              "The released checkpoints are eres2netv2_w24s4ep4 (53.5 M) and eres2netv2 (17.9 M).")
            yield WidthField(self.draft, "model.args", "m_channels",
                             f"Width of the network; {UPSTREAM_CHANNELS} as released, smaller trains faster.")
        with Horizontal(classes="actions"):
            yield Button("Load", id="load", variant="primary", compact=True)
        yield Static(id="model-info", markup=False)

    def on_mount(self) -> None:
        self.show_mode()
        if self.draft.model is not None:
            self.show_info()
        elif self.draft.config.model.init is not None:  # prefilled from a saved config
            self.start_load()

    def show_mode(self) -> None:
        fresh = self.draft.fresh_model
        self.query_one("#pretrained-form").display = not fresh
        self.query_one("#fresh-form").display = fresh
        self.query_one("#load", Button).label = "Build" if fresh else "Load"

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        model = self.draft.config.model
        self.draft.fresh_model = event.pressed.id == "fresh"
        if self.draft.fresh_model:
            model.init = None
            model.variant = self.query_one(SelectField).query_one(Select).value
        else:
            typed = self.query_one("#checkpoint", PathField).input.value.strip()
            model.init = Path(typed) if typed else None
            model.args = {}
        self.show_mode()

    def current_choice(self) -> str:
        model = self.draft.config.model
        return choice_of(model.init, model.variant, model.args)

    def start_load(self) -> None:
        model = self.draft.config.model
        if not self.draft.fresh_model and model.init is None:
            self.say("Type or browse to a checkpoint first.", problem=True)
            return
        if any(field.problem for field in self.query(Field)):
            self.say("Correct the highlighted field first.", problem=True)
            return
        self.say("Loading…")
        self.load(model.init, model.variant, dict(model.args))

    @work(thread=True, exclusive=True, exit_on_error=False, group="model")
    def load(self, init: Path | None, variant: str | None, args: dict[str, Any]) -> ModelInfo:
        return model_info(init, variant, args)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.SUCCESS and event.worker.name == "load":
            info: ModelInfo = event.worker.result
            if self.draft.model is None or self.draft.model.choice != info.choice:
                self.draft.batch = None  # the batch size suggestion depends on the model
            self.draft.model = info
            if self.draft.config.model.init is not None:
                # The file fixes the variant and every size: name the variant, override nothing.
                self.draft.config.model.variant = info.variant
                self.draft.config.model.args = {}
            self.show_info()

    def show_info(self) -> None:
        info = self.draft.model
        config = info.model.config
        self.query_one("#model-info", Static).update(
            f"{info.variant} · m_channels {config.m_channels} · {config.embedding_size}-dim embeddings · "
            f"{millions(info.parameters)} parameters ({info.parameters:,})\n{info.check}")
        self.say("")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.start_load()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "load":
            self.start_load()

    def blocker(self) -> str | None:
        if any(field.problem for field in self.query(Field)):
            return "Correct the highlighted field first."
        if self.draft.model is None or self.draft.model.choice != self.current_choice():
            return "Load the checkpoint (or build the fresh model) first."
        return None
