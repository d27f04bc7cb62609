"""How every step of spkft-tui looks, pinned as SVG snapshots (pytest-textual-snapshot).

The scenes in ``wizard_scenes`` give each step fixed content. After an intended change to the
look, review the new screenshots and accept them with ``pytest tests/test_wizard_snapshots.py
--snapshot-update``; the files live in ``tests/__snapshots__/test_wizard_snapshots/``.
"""

from __future__ import annotations

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, Input, TabbedContent

from spkft.tui.wizard.app import WizardApp
from spkft.tui.wizard.step import STEP_NAMES, StepScreen
from wizard_scenes import app_at, fresh_freeze_scene


@pytest.fixture
def scratch(tmp_path, monkeypatch, reference_dir):
    """The scenes write their demo set and links into an empty working folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def until_idle(pilot: Pilot) -> None:
    """Until the step is on screen and nothing it started is still working."""
    while not isinstance(pilot.app.screen, StepScreen):
        await pilot.pause()
    busy = [w for w in pilot.app.workers if isinstance(w.node, StepScreen) and not w.is_finished]
    if busy:  # an empty list would mean every worker, the wizard's own walk included
        await pilot.app.workers.wait_for_complete(busy)
    # A focused input's cursor blinks; stopped, it stays drawn, so the picture is the same every time.
    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause()


@pytest.mark.parametrize("number", range(1, len(STEP_NAMES) + 1), ids=[name.lower() for name in STEP_NAMES])
def test_each_step_at_80x24(snap_compare, scratch, number):
    assert snap_compare(app_at(number), terminal_size=(80, 24), run_before=until_idle)


def test_freezing_a_fresh_model(snap_compare, scratch):
    assert snap_compare(WizardApp(fresh_freeze_scene(), start=3), terminal_size=(80, 24), run_before=until_idle)


def test_training_at_a_large_size(snap_compare, scratch):
    assert snap_compare(app_at(6), terminal_size=(140, 44), run_before=until_idle)


@pytest.mark.parametrize("tab", ["det-tab", "scores-tab"])
def test_evaluation_plots(snap_compare, scratch, tab):
    async def show_tab(pilot: Pilot) -> None:
        await until_idle(pilot)
        pilot.app.screen.query_one(TabbedContent).active = tab

    assert snap_compare(app_at(7), terminal_size=(100, 36), run_before=show_tab)


def test_light_theme(snap_compare, scratch):
    async def light(pilot: Pilot) -> None:
        await until_idle(pilot)
        await pilot.press("ctrl+t")

    assert snap_compare(app_at(3), terminal_size=(80, 24), run_before=light)


def test_error_dialog(snap_compare, scratch):
    async def scan_nothing(pilot: Pilot) -> None:
        await until_idle(pilot)
        pilot.app.screen.query_one("#source Input", Input).value = "no-such-folder"
        pilot.app.screen.query_one("#scan", Button).press()
        await until_idle(pilot)
        while isinstance(pilot.app.screen, StepScreen):
            await pilot.pause()

    assert snap_compare(app_at(1), terminal_size=(80, 24), run_before=scan_nothing)
