"""The wizard's app: the steps in order, Back and Next between them, the theme, a clean exit.

This module loads only Textual: the first screen shows at once while a thread imports the steps,
which bring in torch and the rest of spkft (seconds on a first start).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, LoadingIndicator, Static

from spkft.tui.wizard.dialogs import FinishDialog
from spkft.tui.wizard.step import Move, StepBar

if TYPE_CHECKING:
    from spkft.tui.wizard.draft import Draft
    from spkft.tui.wizard.step import StepScreen


def step_screens() -> tuple[type[StepScreen], ...]:
    """The steps in order (importing them loads torch and spkft's core)."""
    from spkft.tui.wizard.steps.data import DataStep
    from spkft.tui.wizard.steps.evaluate import EvaluateStep
    from spkft.tui.wizard.steps.freezing import FreezeStep
    from spkft.tui.wizard.steps.model import ModelStep
    from spkft.tui.wizard.steps.review import ReviewStep
    from spkft.tui.wizard.steps.serve import ServeStep
    from spkft.tui.wizard.steps.settings import SettingsStep
    from spkft.tui.wizard.steps.train import TrainStep

    return DataStep, ModelStep, FreezeStep, SettingsStep, ReviewStep, TrainStep, EvaluateStep, ServeStep


def new_draft() -> Draft:
    from spkft.tui.wizard.draft import Draft

    return Draft()


class Starting(Screen[None]):
    """What shows while the steps load: the steps to come, and why there is a wait."""

    def compose(self) -> ComposeResult:
        yield StepBar(0)
        with Vertical(id="starting"):
            yield Static("spkft-tui: from your recordings to a fine-tuned, evaluated and served speaker "
                         "verifier, in the eight steps above.", classes="intro")
            yield Static("Loading torch and spkft's model code: a few seconds, longer on the first start "
                         "after installing.", id="starting-text")
            yield LoadingIndicator()
        yield Footer()


def finish_summary(draft: Draft) -> list[str]:
    """What the wizard made, in lines to show on Finish and print once it has closed."""
    lines = []
    training = draft.training
    if training is not None and training.finished is not None:
        best = training.finished.best_checkpoint
        lines.append(f"Run folder: {training.run_dir}" + (f" (best checkpoint {best})" if best else ""))
    if draft.evaluation is not None:
        lines.append(f"Evaluation report: {draft.evaluation.report_dir}")
    exported = draft.exported
    if exported is not None:
        lines.append(f"Model: {exported.output} ({exported.size_bytes / 1e6:.1f} MB, {exported.format})")
    if draft.server is not None:
        lines.append(f"Server: {draft.server.address}, stopped as the wizard closes.")
    if exported is not None and exported.format == "onnx":
        store = training.run_dir / "enrollments.sqlite" if training is not None else Path("enrollments.sqlite")
        lines.append(f"Serve it again: spkft serve --model {exported.output} --enroll-db {store}")
    return lines or ["Nothing was trained or exported this time."]


class WizardApp(App[list[str] | None]):
    """spkft-tui: from recordings to a served speaker verifier, one step at a time."""

    CSS_PATH = "wizard.tcss"
    TITLE = "spkft"
    BINDINGS = [
        Binding("ctrl+t", "toggle_theme", "Light/dark"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, draft: Draft | None = None, start: int = 1) -> None:
        """``start`` is the step (from 1) to open; the draft must hold what the steps before it made.

        Without a draft, the wizard starts empty, and shows a first screen while its steps load.
        """
        super().__init__()
        self.draft: Draft | None = draft
        self.start = start

    def on_mount(self) -> None:
        self.walk()

    @work(exclusive=True, group="wizard")
    async def walk(self) -> None:
        if self.draft is None:
            await self.push_screen(Starting())
            steps, self.draft = await asyncio.to_thread(lambda: (step_screens(), new_draft()))
            await self.pop_screen()
        else:
            steps = step_screens()
        from spkft.tui.wizard.steps.serve import stop_server

        index = self.start - 1
        while index < len(steps):
            move = await self.push_screen_wait(steps[index](self.draft))
            index = max(0, index - 1) if move is Move.BACK else index + 1
        lines = finish_summary(self.draft)
        if self.draft.server is not None:
            await asyncio.to_thread(stop_server, self.draft.server)
            self.draft.server = None
        await self.push_screen_wait(FinishDialog(lines))
        self.exit(lines)

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def on_unmount(self) -> None:
        if self.draft is not None and self.draft.server is not None:
            from spkft.tui.wizard.steps.serve import stop_server

            stop_server(self.draft.server)
            self.draft.server = None
