"""What every step of the wizard shares: the bar of steps, Back and Next, a status line, and the
one place where a failed worker becomes an error dialog."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Label, Static
from textual.worker import Worker, WorkerState

from spkft.tui.wizard.dialogs import ErrorDialog

if TYPE_CHECKING:
    from spkft.tui.wizard.draft import Draft

STEP_NAMES = ("Data", "Model", "Freeze", "Settings", "Review", "Train", "Evaluate", "Serve")


class Move(Enum):
    """How a step was left."""

    BACK = "back"
    NEXT = "next"


class StepBar(Horizontal):
    """Every step by number and name; done steps, the current one and those to come look different."""

    def __init__(self, current: int) -> None:
        super().__init__(id="step-bar")
        self.current = current

    def compose(self) -> ComposeResult:
        yield Label("spkft", id="brand")
        for number, name in enumerate(STEP_NAMES, start=1):
            state = "-done" if number < self.current else "-current" if number == self.current else "-todo"
            yield Label(f"{number} {name}", classes=f"step {state}")


class StepScreen(Screen[Move]):
    """One step: a scrolling body below the bar of steps, Back and Next at the bottom.

    Subclasses compose the body and say, in :meth:`blocker`, why Next cannot be taken yet.
    """

    NUMBER: ClassVar[int]
    HEADING: ClassVar[str]
    NEXT_LABEL: ClassVar[str] = "Next"
    BINDINGS = [
        Binding("ctrl+b", "back", "Back", priority=True),
        Binding("ctrl+n", "next", "Next", priority=True),
    ]

    def __init__(self, draft: Draft) -> None:
        super().__init__()
        self.draft = draft

    def compose(self) -> ComposeResult:
        yield StepBar(self.NUMBER)
        with VerticalScroll(id="body") as body:
            body.can_focus = False  # focus starts on the step's first field; the body scrolls to what has focus
            yield Label(f"Step {self.NUMBER} of {len(STEP_NAMES)} · {self.HEADING}", classes="heading")
            yield from self.compose_body()
        with Horizontal(id="nav"):
            yield Static("", id="status", markup=False)
            yield Button("Back", id="back", compact=True, disabled=self.NUMBER == 1)
            yield Button(self.NEXT_LABEL, id="next", variant="primary", compact=True)
        yield Footer()

    def compose_body(self) -> ComposeResult:
        raise NotImplementedError

    def blocker(self) -> str | None:
        """Why Next cannot be taken now, or None when it can."""
        return None

    def back_blocker(self) -> str | None:
        """Why Back cannot be taken now, or None when it can."""
        return None

    def say(self, text: str, problem: bool = False) -> None:
        status = self.query_one("#status", Static)
        status.update(text)
        status.set_class(problem, "-problem")

    def action_back(self) -> None:
        if self.NUMBER == 1:
            return
        reason = self.back_blocker()
        if reason is not None:
            self.say(reason, problem=True)
            return
        self.dismiss(Move.BACK)

    def action_next(self) -> None:
        reason = self.blocker()
        if reason is not None:
            self.say(reason, problem=True)
            return
        self.leave()
        self.dismiss(Move.NEXT)

    def leave(self) -> None:
        """Called just before Next takes the user on."""

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "back":
            event.stop()
            self.action_back()
        elif event.button.id == "next":
            event.stop()
            self.action_next()

    def show_error(self, error: BaseException) -> None:
        """Every failure of a step ends here: a dialog with what went wrong and what to do."""
        self.say(str(error).splitlines()[0] if str(error) else type(error).__name__, problem=True)
        self.app.push_screen(ErrorDialog(error))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR and event.worker.error is not None:
            self.show_error(event.worker.error)
