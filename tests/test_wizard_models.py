"""The wizard's Model step offers the released models first: download with progress, cancel, load."""

from __future__ import annotations

import pytest
from textual.widgets import Button, ProgressBar, RadioButton, Static

from spkft.core.catalogue import cache_record, partial_path
from spkft.tui.wizard.app import WizardApp

from model_server import TINY
from test_wizard import SIZE, next_step, scratch, settle, status, step, text_of, wait_for  # noqa: F401 (a fixture)
from wizard_scenes import SCENES

pytestmark = pytest.mark.asyncio


def at_model_step() -> WizardApp:
    """Step 2 with a scanned data set and no model chosen yet, as a newcomer arrives there."""
    return WizardApp(SCENES[1](), start=2)


async def download_tiny(pilot) -> None:
    """On arrival at step 2: choose the tests' released model and press Download and load."""
    await settle(pilot)
    step(pilot.app).query_one(f"#released-{TINY.name}", RadioButton).value = True
    await pilot.pause()
    step(pilot.app).query_one("#load", Button).press()


async def test_the_released_models_come_first_and_download_with_progress(home, server, tiny_bytes):
    server.delay_per_chunk = 0.01  # a download long enough for the bar to move
    app = at_model_step()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert step(app).query_one("#released", RadioButton).value  # the first choice, preselected
        assert str(app.draft.config.model.init) == "eres2netv2_w24s4ep4"
        details = text_of(app, "#released-details")
        assert "53.5 M parameters · 214 MB · licence Apache-2.0" in details and "not downloaded yet" in details
        assert str(step(app).query_one("#load", Button).label) == "Download and load"

        step(app).query_one(f"#released-{TINY.name}", RadioButton).value = True
        await pilot.pause()
        assert str(app.draft.config.model.init) == TINY.name
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert f"Download {TINY.name} first" in status(app)

        step(app).query_one("#load", Button).press()
        bar = step(app).query_one("#download-progress", ProgressBar)
        await wait_for(pilot, lambda: bar.total and bar.progress > 0, "the download to show progress")
        assert bar.display and step(app).query_one("#cancel-download", Button).display
        await settle(pilot)
        assert not bar.display and not step(app).query_one("#cancel-download", Button).display
        info = str(step(app).query_one("#model-info", Static).render())
        assert f"✓ {TINY.name} loaded" in info and "eres2netv2_w24s4ep4 · m_channels 8" in info
        assert TINY.cached_path().read_bytes() == tiny_bytes and cache_record(TINY) is not None
        assert "downloaded: " in text_of(app, "#released-details")
        await next_step(pilot, 3)
    assert str(app.draft.config.model.init) == TINY.name


async def test_cancelling_a_download_leaves_no_file_behind(home, server):
    server.delay_per_chunk = 0.05  # about 6 s for the whole file: time to cancel halfway
    app = at_model_step()
    async with app.run_test(size=SIZE) as pilot:
        await download_tiny(pilot)
        bar = step(app).query_one("#download-progress", ProgressBar)
        await wait_for(pilot, lambda: bar.progress and partial_path(TINY).exists(), "the download to start")
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert step(app).NUMBER == 2 and "A download is running" in status(app)

        step(app).query_one("#cancel-download", Button).press()
        await settle(pilot)
        assert "Download cancelled: nothing of it was kept" in status(app)
        assert not partial_path(TINY).exists() and not TINY.cached_path().exists()
        assert not list((home / "downloads").glob("*.part*.json"))
        assert app.draft.model is None and not bar.display
        assert str(step(app).query_one("#load", Button).label) == "Download and load"
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == 2 and f"Download {TINY.name} first" in status(app)


async def test_a_failed_download_opens_the_error_dialog_and_can_be_retried(home, server, tiny_bytes):
    server.status = 404
    app = at_model_step()
    async with app.run_test(size=SIZE) as pilot:
        await download_tiny(pilot)
        await settle(pilot)
        message = str(app.screen.query_one("#error-message", Static).render())
        assert "HTTP 404" in message and "To place it by hand" in message
        await pilot.press("escape")
        server.status = None
        step(app).query_one("#load", Button).press()
        await settle(pilot)
        assert f"✓ {TINY.name} loaded" in str(step(app).query_one("#model-info", Static).render())


async def test_going_back_to_a_loaded_choice_needs_no_second_load(scratch):
    app = WizardApp(SCENES[2](), start=2)  # the tiny checkpoint file, loaded
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        step(app).query_one("#fresh", RadioButton).value = True
        await pilot.pause()
        assert text_of(app, "#model-info") == ""  # nothing said about a model not built yet
        step(app).query_one("#m-channels").value = "8"
        step(app).query_one("#load", Button).press()
        await settle(pilot)
        assert "a fresh eres2netv2_w24s4ep4" in text_of(app, "#model-info")
        step(app).query_one("#pretrained", RadioButton).value = True
        await pilot.pause()
        assert "✓ tiny.ckpt loaded" in text_of(app, "#model-info") and status(app) == ""
        await next_step(pilot, 3)
    assert str(app.draft.config.model.init) == "tiny.ckpt" and app.draft.model.choice == "tiny.ckpt"
