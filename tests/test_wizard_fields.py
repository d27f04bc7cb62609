"""The wizard's forms say why a value is refused, and warn beside a valid value that is very likely a slip."""

from __future__ import annotations

import pytest
from textual.widgets import Button, Static

from spkft.tui.wizard.app import WizardApp

from test_wizard import SIZE, field, first_step, scratch, settle, status, step, text_of, type_into  # noqa: F401 (a fixture)
from wizard_scenes import SCENES

pytestmark = pytest.mark.asyncio


def below(app: WizardApp, key: str, kind: str) -> str:
    """What the field shows under its hint: its ``error`` or its ``warning`` (empty when hidden)."""
    target = field(app, key)
    line = target.query_one(f".field-{kind}", Static)
    return str(line.render()) if line.display and line.styles.display != "none" else ""


async def test_a_refused_value_says_why_beside_its_field(scratch):
    app = WizardApp(SCENES[4](), start=4)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert below(app, "run.batch_size", "error") == ""
        await type_into(pilot, "run.batch_size", "-3")
        assert below(app, "run.batch_size", "error") == "✗ Input should be greater than or equal to 1"
        await type_into(pilot, "optim.lr", "fast")
        assert "✗ Input should be a valid number" in below(app, "optim.lr", "error")
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == 4 and status(app) == "Correct Learning rate, Batch size first."
        await type_into(pilot, "run.batch_size", "2")
        assert below(app, "run.batch_size", "error") == ""


async def test_implausible_values_are_warned_about_and_the_batch_fits_the_data(scratch):
    app = WizardApp(SCENES[4](), start=4)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        # 6 training recordings (2 speakers of 3, the rest held out): memory would allow 64.
        assert text_of(app, "#batch-advice").startswith("Suggested 2: at least 4 steps per pass over 6 training "
                                                        "recordings (memory allows 64")
        step(app).query_one("#use-batch", Button).press()
        await pilot.pause()
        assert field(app, "run.batch_size").input.value == "2" and below(app, "run.batch_size", "warning") == ""
        await type_into(pilot, "run.batch_size", "99999")
        assert below(app, "run.batch_size", "warning").startswith("⚠ 99999 crops per step from 6 training recordings")
        await type_into(pilot, "optim.lr", "5")
        assert "⚠ 5 is far above AdamW's usual range" in below(app, "optim.lr", "warning")
        await type_into(pilot, "run.batch_size", "2")
        assert below(app, "run.batch_size", "warning") == ""
        assert not step(app).blocker()  # warned, not refused: Next would go on


async def test_enough_speakers_hold_some_out_for_testing_unless_told_otherwise(scratch, librispeech_dir):
    app = WizardApp()
    async with app.run_test(size=SIZE) as pilot:
        await first_step(pilot)
        await type_into(pilot, "data.train", str(librispeech_dir))
        step(app).query_one("#scan", Button).press()
        await settle(pilot)
        assert app.draft.config.data.test_speakers == 25 and field(app, "data.test_speakers").input.value == "25"
        assert "test 25 speakers" in text_of(app, "#split")
        await type_into(pilot, "data.test_speakers", "0")  # the user's choice stands, scan after scan
        step(app).query_one("#scan", Button).press()
        await settle(pilot)
        assert app.draft.config.data.test_speakers == 0 and "test none" in text_of(app, "#split")


@pytest.mark.parametrize("number", range(1, 9))
async def test_focus_starts_on_the_first_control_of_each_step(scratch, number):
    app = WizardApp(SCENES[number](), start=number)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        body = step(app).query_one("#body")
        first = next(w for w in body.query("*") if w.focusable)
        assert app.focused is first, (app.focused, first)


async def test_a_chosen_option_shows_a_symbol_not_only_a_colour(scratch):
    app = WizardApp(SCENES[2](), start=2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        chosen, other = step(app).query_one("#pretrained"), step(app).query_one("#fresh")
        assert "●" in str(chosen.render()) and "○" in str(other.render())
        other.value = True
        await pilot.pause()
        assert "○" in str(chosen.render()) and "●" in str(other.render())


async def test_a_frozen_stage_shows_a_tick_not_only_a_colour(scratch):
    app = WizardApp(SCENES[4](), start=3)  # recipe linear-probe: every stage frozen but seg_1
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        stages = step(app).query_one("#stages")
        lines = [stages.render_line(y).text for y in range(stages.size.height)]
        rows = {line[4:].split()[0]: line[:3] for line in lines if len(line) > 4 and line[4:].strip()}
        assert rows["stem"] == "▐✓▌" and rows["fuse34"] == "▐✓▌" and rows["seg_1"] == "▐ ▌", lines
