"""The wizard's app: the steps in order, Back and Next between them, the theme, a clean exit."""

from __future__ import annotations

from textual import work
from textual.app import App
from textual.binding import Binding

from spkft.tui.wizard.draft import Draft
from spkft.tui.wizard.step import Move, StepScreen
from spkft.tui.wizard.steps.data import DataStep
from spkft.tui.wizard.steps.evaluate import EvaluateStep
from spkft.tui.wizard.steps.freezing import FreezeStep
from spkft.tui.wizard.steps.model import ModelStep
from spkft.tui.wizard.steps.review import ReviewStep
from spkft.tui.wizard.steps.serve import ServeStep, stop_server
from spkft.tui.wizard.steps.settings import SettingsStep
from spkft.tui.wizard.steps.train import TrainStep

STEPS: tuple[type[StepScreen], ...] = (
    DataStep, ModelStep, FreezeStep, SettingsStep, ReviewStep, TrainStep, EvaluateStep, ServeStep,
)


class WizardApp(App[None]):
    """spkft-tui: from recordings to a served speaker verifier, one step at a time."""

    CSS_PATH = "wizard.tcss"
    TITLE = "spkft"
    BINDINGS = [
        Binding("ctrl+t", "toggle_theme", "Light/dark"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, draft: Draft | None = None, start: int = 1) -> None:
        """``start`` is the step (from 1) to open; the draft must hold what the steps before it made."""
        super().__init__()
        self.draft = draft if draft is not None else Draft()
        self.start = start

    def on_mount(self) -> None:
        self.walk()

    @work(exclusive=True, group="wizard")
    async def walk(self) -> None:
        index = self.start - 1
        while index < len(STEPS):
            move = await self.push_screen_wait(STEPS[index](self.draft))
            index = max(0, index - 1) if move is Move.BACK else index + 1
        self.exit()

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def on_unmount(self) -> None:
        if self.draft.server is not None:
            stop_server(self.draft.server)
            self.draft.server = None
