"""Modal dialogs: an error with what to do about it, and a one-line question."""

from __future__ import annotations

import traceback

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Collapsible, Input, Label, Static

from spkft.core.errors import AudioError, CheckpointError, DataError, DeviceError, SpkftError


def advice(error: BaseException) -> str:
    """What a person can do about ``error``."""
    # Imported here: the wizard's first screen shows before the training code (and torch) has loaded.
    from spkft.core.train import ConfigError, TrainingDiverged

    match error:
        case ConfigError():
            return "Go back to the step that sets each key named above and correct it."
        case DataError() | AudioError():
            return ("Check the data source in step 1: `spkft data check PATH` lists every row it "
                    "cannot use and why.")
        case CheckpointError():
            return ("Choose a checkpoint that 3D-Speaker or spkft wrote (step 2), or start from a "
                    "fresh model.")
        case DeviceError():
            return "Choose another device in step 4; cpu always works."
        case TrainingDiverged():
            return ("Lower the learning rate in step 4 (or keep gradient clipping on), then start "
                    "again or resume from the last checkpoint.")
        case SpkftError():
            return "Correct what the message names and try again."
        case OSError():
            return "Check that the path exists and that you may read it (and write where output goes)."
    return "This is a bug in spkft, not a problem with your input; the details below help to report it."


class ErrorDialog(ModalScreen[None]):
    """An error, what to do about it, and the traceback when it is a bug."""

    BINDINGS = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, error: BaseException, title: str = "That did not work") -> None:
        super().__init__()
        self.error = error
        self.heading = title

    def compose(self) -> ComposeResult:
        expected = isinstance(self.error, (SpkftError, OSError))
        with Vertical(id="dialog", classes="error"):
            yield Label(self.heading, classes="dialog-title")
            with VerticalScroll(classes="dialog-body"):
                message = str(self.error) if expected else f"{type(self.error).__name__}: {self.error}"
                yield Static(message, id="error-message", markup=False)
                yield Label("What to do", classes="dialog-subtitle")
                yield Static(advice(self.error), id="error-advice", markup=False)
                if not expected:
                    with Collapsible(title="Traceback"):
                        yield Static("".join(traceback.format_exception(self.error)), markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Close", id="close", variant="primary", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss()


class PromptDialog(ModalScreen[str | None]):
    """Asks for one line of text; dismisses with it, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, text: str, value: str = "") -> None:
        super().__init__()
        self.heading, self.text, self.value = title, text, value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.heading, classes="dialog-title")
            yield Static(self.text, classes="dialog-body", markup=False)
            yield Input(self.value, id="answer")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", id="cancel", compact=True)
                yield Button("OK", id="ok", variant="primary", compact=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._answer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "ok":
            self._answer()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def _answer(self) -> None:
        answer = self.query_one("#answer", Input).value.strip()
        if answer:
            self.dismiss(answer)


class FinishDialog(ModalScreen[None]):
    """What the wizard made, said before it exits (and printed to the terminal after)."""

    BINDINGS = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Done: what the wizard made", classes="dialog-title")
            with VerticalScroll(classes="dialog-body"):
                yield Static("\n".join(self.lines), id="finish-summary", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Close the wizard", id="close", variant="primary", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss()
