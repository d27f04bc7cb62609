"""Step 2: the model fine-tuning starts from — a released model, a checkpoint file, or a fresh network.

A released model is downloaded here, in a worker, with a progress bar and a Cancel button; a
cancelled download leaves nothing behind (its partial file is deleted).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.validation import Integer
from textual.widgets import Button, Input, ProgressBar, RadioButton, RadioSet, Select, Static
from textual.worker import Worker, WorkerState

from spkft.core.catalogue import CATALOGUE, ReleasedModel, availability, fetch, megabytes, released
from spkft.core.checkpoint import load_model
from spkft.core.download import DownloadCancelled
from spkft.core.model import DEFAULT_VARIANT, VARIANTS, build_model, count_parameters
from spkft.core.train.freeze import summarise
from spkft.tui.wizard.draft import Draft, ModelInfo
from spkft.tui.wizard.fields import Field, Option, PathField, PathInput, SelectField, as_text
from spkft.tui.wizard.step import StepScreen

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UPSTREAM_CHANNELS = VARIANTS[DEFAULT_VARIANT].m_channels
DEFAULT_RELEASED = "eres2netv2_w24s4ep4"


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


def entry_details(entry: ReleasedModel) -> str:
    source = "bundled with spkft, no download" if entry.bundled else f"ModelScope {entry.model_id} @ {entry.revision}"
    return (f"{entry.variant} · {entry.parameters / 1e6:.1f} M parameters · {megabytes(entry.size_bytes)} · "
            f"licence {entry.licence}\ntrained on {entry.training_data} · {entry.sample_rate_hertz // 1000} kHz\n"
            f"{source}\n{availability(entry).describe(entry)}")


class DownloadProgress(Message):
    """Bytes fetched so far; a newer one replaces an older one still in the queue."""

    def __init__(self, done: int, total: int | None) -> None:
        super().__init__()
        self.done, self.total = done, total

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DownloadProgress)


class CheckpointFileField(PathField):
    """The checkpoint file; empty while model.init names a released model (that choice has its own list)."""

    def compose_control(self) -> ComposeResult:
        init = self.draft.config.model.init
        yield PathInput("" if released(init) else as_text(init), suffixes=self.suffixes, folders=self.folders,
                        placeholder=self.placeholder, validators=[self.validator])


class ModelStep(StepScreen):
    NUMBER = 2
    HEADING = "Model: where fine-tuning starts"

    def __init__(self, draft: Draft) -> None:
        super().__init__(draft)
        self.cancel_download: threading.Event | None = None  # set while a download runs
        # Models loaded on this visit by choice, so going back to an earlier choice needs no reload.
        self.loaded: dict[str, ModelInfo] = {} if draft.model is None else {draft.model.choice: draft.model}

    def compose_body(self) -> ComposeResult:
        mode = self.mode()
        yield Static("Fine-tune a released model (3D-Speaker's ERes2NetV2_w24s4ep4 above all; spkft_demo_base, "
                     "small and bundled, for the demo set): it already knows voices and needs little data. A "
                     "fresh network starts from random weights and needs thousands of speakers.", classes="intro")
        with RadioSet(id="mode"):
            yield Option("A released model (bundled, or downloaded once and cached)", id="released",
                              value=mode == "released")
            yield Option("My own checkpoint file", id="pretrained", value=mode == "pretrained")
            yield Option("A fresh network", id="fresh", value=mode == "fresh")
        with Vertical(id="released-form"):
            chosen = self.chosen_entry()
            with RadioSet(id="catalogue"):
                for entry in CATALOGUE.values():
                    yield Option(f"{entry.name} · {entry.parameters / 1e6:.1f} M · "
                                      f"{megabytes(entry.size_bytes)}", id=f"released-{entry.name}",
                                      value=entry.name == chosen.name)
            yield Static(id="released-details", markup=False)
            yield ProgressBar(id="download-progress", show_eta=True)
            yield Static(id="download-text", markup=False)
        with Vertical(id="pretrained-form"):
            yield CheckpointFileField(self.draft, "model.init", "Checkpoint", "A 3D-Speaker .ckpt or an spkft "
                                      "checkpoint; the variant is read off its tensor shapes.",
                                      suffixes=CHECKPOINT_SUFFIXES, folders=False, optional=True, id="checkpoint")
        with Vertical(id="fresh-form"):
            yield SelectField(self.draft, "model.variant", "Variant", [(describe(v), v) for v in VARIANTS],
                              "The released checkpoints are eres2netv2_w24s4ep4 (53.5 M) and eres2netv2 (17.9 M).")
            yield WidthField(self.draft, "model.args", "m_channels",
                             f"Width of the network; {UPSTREAM_CHANNELS} as released, smaller trains faster.")
        with Horizontal(classes="actions"):
            yield Button("Load", id="load", variant="primary", compact=True)
            yield Button("Cancel download", id="cancel-download", compact=True)
        yield Static(id="model-info", markup=False)

    def mode(self) -> str:
        """released, pretrained (a file) or fresh: what the draft's model section says."""
        if self.draft.fresh_model:
            return "fresh"
        init = self.draft.config.model.init
        return "released" if init is None or released(init) else "pretrained"

    def chosen_entry(self) -> ReleasedModel:
        return released(self.draft.config.model.init) or CATALOGUE.get(DEFAULT_RELEASED) or next(iter(CATALOGUE.values()))

    def on_mount(self) -> None:
        for widget in ("#download-progress", "#download-text", "#cancel-download"):
            self.query_one(widget).display = False
        if self.mode() == "released" and self.draft.config.model.init is None:
            self.draft.config.model.init = Path(self.chosen_entry().name)  # the choice shown is the choice made
        self.show_mode()
        if self.draft.model is not None:
            self.show_info()
        elif self.draft.config.model.init is not None and self.ready_to_load():  # prefilled from a saved config
            self.start_load()

    def ready_to_load(self) -> bool:
        """Whether loading needs no download (a file, or a released model already cached)."""
        entry = released(self.draft.config.model.init)
        return entry is None or availability(entry).ready

    def show_mode(self) -> None:
        mode = self.mode()
        for form in ("released", "pretrained", "fresh"):
            self.query_one(f"#{form}-form").display = form == mode
        if mode == "released":
            self.query_one("#released-details", Static).update(entry_details(self.chosen_entry()))
        label = {"fresh": "Build", "pretrained": "Load"}.get(mode) or ("Load" if self.ready_to_load()
                                                                       else "Download and load")
        self.query_one("#load", Button).label = label

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        event.stop()
        model = self.draft.config.model
        if event.radio_set.id == "catalogue":
            model.init = Path(event.pressed.id.removeprefix("released-"))
            self.show_mode()
            self.follow_choice()
            return
        self.draft.fresh_model = event.pressed.id == "fresh"
        if self.draft.fresh_model:
            model.init = None
            model.variant = self.query_one(SelectField).query_one(Select).value
        elif event.pressed.id == "released":
            model.init = Path(self.chosen_entry_from_list())
            model.args = {}
        else:
            typed = self.query_one("#checkpoint", PathField).input.value.strip()
            model.init = Path(typed) if typed else None
            model.args = {}
        self.show_mode()
        self.follow_choice()

    def chosen_entry_from_list(self) -> str:
        pressed = self.query_one("#catalogue", RadioSet).pressed_button
        return pressed.id.removeprefix("released-") if pressed is not None else DEFAULT_RELEASED

    def current_choice(self) -> str:
        model = self.draft.config.model
        return choice_of(model.init, model.variant, model.args)

    def start_load(self) -> None:
        model = self.draft.config.model
        if self.cancel_download is not None:
            self.say("A download is running: wait for it, or cancel it.", problem=True)
            return
        if not self.draft.fresh_model and model.init is None:
            self.say("Type or browse to a checkpoint first.", problem=True)
            return
        if any(field.problem for field in self.query(Field)):
            self.say("Correct the highlighted field first.", problem=True)
            return
        entry = released(model.init)
        if entry is not None and not self.ready_to_load():
            self.start_download(entry)
            return
        self.say("Loading…")
        self.load(model.init, model.variant, dict(model.args))

    def start_download(self, entry: ReleasedModel) -> None:
        self.cancel_download = threading.Event()
        bar = self.query_one("#download-progress", ProgressBar)
        bar.update(total=None, progress=0)
        bar.display = True
        self.query_one("#download-text", Static).update("")
        self.query_one("#download-text").display = True
        self.query_one("#cancel-download").display = True
        self.query_one("#load", Button).disabled = True
        self.say(f"Downloading {entry.name} from ModelScope…")
        self.download(entry, self.cancel_download)

    @work(thread=True, exclusive=True, exit_on_error=False, group="download")
    def download(self, entry: ReleasedModel, cancel: threading.Event) -> ModelInfo | None:
        """Fetch, check and cache the entry, then load it; None when cancelled."""
        try:
            fetch(entry, progress=lambda done, total: self.post_message(DownloadProgress(done, total)),
                  cancel=cancel)
        except DownloadCancelled:
            return None
        return model_info(Path(entry.name), None, {})

    def on_download_progress(self, message: DownloadProgress) -> None:
        self.query_one("#download-progress", ProgressBar).update(total=message.total, progress=message.done)
        if message.total:
            self.query_one("#download-text", Static).update(
                f"{message.done / 1e6:.1f} of {message.total / 1e6:.1f} MB")

    @work(thread=True, exclusive=True, exit_on_error=False, group="model")
    def load(self, init: Path | None, variant: str | None, args: dict[str, Any]) -> ModelInfo:
        return model_info(init, variant, args)

    def finish_download(self) -> None:
        self.cancel_download = None
        for widget in ("#download-progress", "#download-text", "#cancel-download"):
            self.query_one(widget).display = False
        self.query_one("#load", Button).disabled = False
        self.show_mode()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.name == "download" and event.state in (WorkerState.SUCCESS, WorkerState.ERROR,
                                                               WorkerState.CANCELLED):
            self.finish_download()
            if event.state is WorkerState.SUCCESS and event.worker.result is None:
                self.say("Download cancelled: nothing of it was kept.")
                return
        if event.state is WorkerState.SUCCESS and event.worker.name in ("load", "download"):
            self.adopt(event.worker.result)

    def adopt(self, info: ModelInfo) -> None:
        """Make ``info`` the step's model: loaded just now, or loaded before and chosen again."""
        self.loaded[info.choice] = info
        if self.draft.model is None or self.draft.model.choice != info.choice:
            self.draft.batch = None  # the batch size suggestion depends on the model
        self.draft.model = info
        if self.draft.config.model.init is not None:
            # The file fixes the variant and every size: name the variant, override nothing.
            self.draft.config.model.variant = info.variant
            self.draft.config.model.args = {}
        self.show_info()

    def follow_choice(self) -> None:
        """After the choice changed: the model loaded for it before, if any, else nothing stale."""
        info = self.loaded.get(self.current_choice())
        if info is not None:
            self.adopt(info)
        else:
            self.query_one("#model-info", Static).update("")
            self.say("")

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
        elif event.button.id == "cancel-download" and self.cancel_download is not None:
            self.cancel_download.set()
            self.say("Cancelling the download…")

    def back_blocker(self) -> str | None:
        return "A download is running: wait for it, or cancel it." if self.cancel_download is not None else None

    def blocker(self) -> str | None:
        if self.cancel_download is not None:
            return "A download is running: wait for it, or cancel it."
        if any(field.problem for field in self.query(Field)):
            return "Correct the highlighted field first."
        if self.draft.model is None or self.draft.model.choice != self.current_choice():
            entry = released(self.draft.config.model.init)
            if entry is not None and not self.ready_to_load():
                return f"Download {entry.name} first (Download and load)."
            return "Load the checkpoint (or build the fresh model) first."
        return None
