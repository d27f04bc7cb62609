"""spkft-tui driven as a person would: the whole wizard on real speech and a tiny model, Back,
Cancel and resume, every kind of refused value, and a saved config as the starting point."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from textual.pilot import Pilot
from textual.widgets import (Button, DataTable, DirectoryTree, Input, RadioButton, RadioSet, Select, SelectionList,
                             Static)

from spkft.core.catalogue import DEMO_BASE
from spkft.core.data import DEMO_SPEAKERS, write_demo
from spkft.core.export import MIN_COSINE, QuantizedModel
from spkft.core.metrics import compute_metrics
from spkft.core.quantize import EerRoseError
from spkft.core.train import load_config
from spkft.core.train.config import FREEZE_PRESETS, STAGES
from spkft.core.train.recipes import describe, pick_recipe, recipe_values, resolve_recipe, training_data
from spkft.tui.wizard import app as wizard_app
from spkft.tui.wizard.app import Starting, WizardApp
from spkft.tui.wizard.dialogs import ErrorDialog, FinishDialog, PromptDialog
from spkft.tui.wizard.draft import Draft
from spkft.tui.wizard.fields import InputField, SelectField, as_text
from spkft.tui.wizard.pickers import PathPicker
from spkft.tui.wizard.step import StepScreen
from spkft.tui.wizard.steps import serve as serve_step
from spkft.tui.wizard.steps.model import WidthField
from spkft.tui.wizard.steps.train import CANCELLED_EARLY
from wizard_scenes import SCENES, TINY_CHECKPOINT, app_at, live_train_scene

pytestmark = pytest.mark.asyncio
SIZE = (100, 40)
# Longest a tiny run may take on a busy 2-core machine before a wait counts as hung.
DEADLINE_SECONDS = 600


@pytest.fixture(autouse=True)
def no_loader_sigchld_handler():
    """The process state of a real wizard: no SIGCHLD handler of torch's DataLoader.

    torch installs a process-wide SIGCHLD handler the first time a DataLoader iterator is made in
    the main thread, as the training tests before these do in the same pytest process. The wizard
    trains in worker threads, so it never has that handler; with it, any loader worker's exit is
    judged inside Textual's event loop. A worker that really fails still fails the run: the
    trainer's loader checks its workers whenever it waits for a batch.
    """
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGCHLD, previous)


@pytest.fixture
def scratch(tmp_path, monkeypatch, reference_dir) -> Path:
    """An empty working folder: the scenes write their demo set and links there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


async def settle(pilot: Pilot) -> None:
    """Wait until no step has work in flight and every message it sent is handled.

    Only the steps' own workers count: some widgets (the file tree) keep one running for good.
    """
    app = pilot.app
    while True:
        await pilot.pause()
        busy = [w for w in app.workers if isinstance(w.node, StepScreen) and not w.is_finished]
        if not busy:
            await pilot.pause()
            return
        await app.workers.wait_for_complete(busy)


async def wait_for(pilot: Pilot, condition, what: str) -> None:
    """Let the app run until ``condition()`` holds (work on other threads reports by message)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await pilot.pause(0.1)


async def first_step(pilot: Pilot) -> None:
    """Wait for step 1: a wizard started without a draft shows a first screen while its steps load."""
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, StepScreen), "step 1")


def step(app: WizardApp) -> StepScreen:
    assert isinstance(app.screen, StepScreen), f"expected a step, found {app.screen!r}"
    return app.screen


def field(app: WizardApp, key: str) -> InputField:
    return next(f for f in step(app).query(InputField) if f.key == key)


async def type_into(pilot: Pilot, key: str, text: str) -> InputField:
    target = field(pilot.app, key)
    for _ in range(200):  # a step that has just opened may not have mounted the field's input yet
        if target.query(Input):
            break
        await pilot.pause(0.05)
    target.input.value = text
    await pilot.pause()
    return target


async def press(pilot: Pilot, selector: str) -> None:
    step(pilot.app).query_one(selector, Button).press()
    await pilot.pause()


async def next_step(pilot: Pilot, expected: int) -> None:
    await pilot.press("ctrl+n")
    await settle(pilot)
    assert step(pilot.app).NUMBER == expected, step(pilot.app).query_one("#status", Static).render()


def status(app: WizardApp) -> str:
    return str(step(app).query_one("#status", Static).render())


def text_of(app: WizardApp, selector: str) -> str:
    return str(step(app).query_one(selector, Static).render())


def chosen(app: WizardApp, radio_set: str) -> str:
    """The button pressed in a step's radio set, by the name after its prefix (``recipe-partial`` -> ``partial``)."""
    return step(app).query_one(f"#{radio_set}s", RadioSet).pressed_button.id.removeprefix(f"{radio_set}-")


async def choose_recipe(pilot: Pilot, name: str) -> None:
    """Click a recipe on step 3 once the step's layout has settled (a click sent while the step still
    lays out its fields can land beside the button), and let the widgets it changes catch up."""
    await settle(pilot)
    await pilot.click(f"#recipe-{name}")
    await settle(pilot)


def knobs(draft: Draft, name: str) -> dict:
    """What the draft holds for each knob recipe ``name`` sets, beside what the recipe sets."""
    values = recipe_values(name, pretrained=draft.pretrained, rehearsal=draft.rehearsal)
    return {key: (draft.get(key), value) for key, value in values.items() if draft.get(key) != value}


def run_config(librispeech_dir: Path, reference_dir: Path, output_dir: Path, **run) -> Draft:
    """A draft ready for step 6: the tiny checkpoint on LibriSpeech, a few short steps."""
    config = load_config(None, {
        "data.train": librispeech_dir / "manifest.csv", "data.val_speakers": 2, "data.test_speakers": 2,
        "model.init": reference_dir / "tiny_w24s4ep4_m8.ckpt", "augment.crop_seconds": 0.5,
        "run.batch_size": 2, "run.num_workers": 0, "run.device": "cpu", "run.output_dir": output_dir,
        **{f"run.{k}": v for k, v in run.items()},
    })
    return Draft(config=config, resume=False)


# ------------------------------------------------------------------------ the whole wizard
async def test_the_whole_wizard_from_recordings_to_a_served_model(tmp_path, monkeypatch, librispeech_dir,
                                                                  reference_dir):
    monkeypatch.chdir(tmp_path)
    app = WizardApp()
    async with app.run_test(size=SIZE) as pilot:
        await first_step(pilot)
        # 1 Data: scan real speech, hold out speakers for validation and test.
        await type_into(pilot, "data.train", str(librispeech_dir))
        await type_into(pilot, "data.val_speakers", "2")
        await type_into(pilot, "data.test_speakers", "2")
        await press(pilot, "#scan")
        await settle(pilot)
        assert "251 speakers · 251 recordings" in str(step(app).query_one("#summary", Static).render())
        assert "Training 247 speakers" in str(step(app).query_one("#split", Static).render())
        await next_step(pilot, 2)

        # 2 Model: the released models come first; a checkpoint file of one's own, its variant read off it.
        assert step(app).query_one("#released", RadioButton).value
        step(app).query_one("#pretrained", RadioButton).value = True
        await pilot.pause()
        await type_into(pilot, "model.init", str(reference_dir / "tiny_w24s4ep4_m8.ckpt"))
        await press(pilot, "#load")
        await settle(pilot)
        info = str(step(app).query_one("#model-info", Static).render())
        assert "eres2netv2_w24s4ep4 · m_channels 8" in info and "✓" in info
        await next_step(pilot, 3)

        # 3 Freezing: auto's recipe for 247 speakers, then the early preset and one more stage by hand.
        pick = pick_recipe(training_data(app.draft.config, app.draft.scan), pretrained=True)
        assert chosen(app, "recipe") == "auto" and app.draft.config.recipe == pick.name
        assert text_of(app, "#recipe-line") == f"auto → {pick.name}: {pick.reason}"
        before = str(step(app).query_one("#total", Static).render())
        step(app).query_one("#preset-early", RadioButton).value = True
        await pilot.pause()
        step(app).query_one("#stages", SelectionList).select("layer3")
        await pilot.pause()
        assert str(step(app).query_one("#total", Static).render()) != before
        assert step(app).query_one("#preset-custom", RadioButton).value
        assert chosen(app, "recipe") == "custom" and app.draft.config.recipe is None
        await type_into(pilot, "freeze.head_only_epochs", "1")
        await next_step(pilot, 4)

        # 4 Hyperparameters: the recipe's values kept, a batch size suggested, then ours.
        recipe_lr = recipe_values(pick.name, pretrained=True)["optim.lr"]
        assert field(app, "optim.lr").input.value == as_text(recipe_lr)
        assert "Suggested" in str(step(app).query_one("#batch-advice", Static).render())
        choices = {"optim.lr": "0.005", "run.epochs": "2", "run.batch_size": "2", "run.steps_per_epoch": "2",
                   "augment.crop_seconds": "0.5", "run.patience": "2"}
        for key, text in choices.items():
            assert (await type_into(pilot, key, text)).problem is None, key
        await next_step(pilot, 5)

        # 5 Review: where it writes, a measured estimate, the config saved.
        await type_into(pilot, "run.output_dir", str(tmp_path / "run"))
        await settle(pilot)
        assert "per epoch" in str(step(app).query_one("#estimate", Static).render())
        step(app).query_one("#save-path").value = str(tmp_path / "saved.yaml")
        await press(pilot, "#save")
        saved = load_config(tmp_path / "saved.yaml")
        assert saved.optim.lr == 0.005 and saved.run.epochs == 2 and saved.freeze.head_only_epochs == 1
        assert saved.freeze.stages == ["stem", "layer1", "layer2", "layer3"] and saved.recipe is None
        assert (saved.data.val_speakers, saved.data.test_speakers) == (2, 2)
        assert saved.model.init == reference_dir / "tiny_w24s4ep4_m8.ckpt"
        await next_step(pilot, 6)

        # 6 Train: runs to the end, curves and the epoch table filled.
        await wait_for(pilot, lambda: app.draft.training.finished is not None, "the run to finish")
        await pilot.pause()
        finished = app.draft.training.finished
        assert finished.reason in ("completed", "early_stopped") and finished.best_checkpoint
        assert step(app).query_one("#epochs").row_count == len(app.draft.training.epochs) >= 1
        assert "Best validation EER" in str(step(app).query_one("#best", Static).render())
        run_config_file = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert run_config_file["optim"]["lr"] == 0.005 and run_config_file["data"]["test_speakers"] == 2
        await next_step(pilot, 7)

        # 7 Evaluate: on the held-out test speakers, against the starting checkpoint.
        comparison = app.draft.evaluation
        assert "2 held-out test speakers" in comparison.data
        assert 0 <= comparison.candidate.metrics.eer <= 1 and comparison.baseline is not None
        table = step(app).query_one("#metrics", Static).content
        assert [c.header for c in table.columns] == ["metric", "starting model", "fine-tuned", "change"]
        assert table.columns[0]._cells[0] == "EER" and table.columns[2]._cells[0].endswith(" %")
        assert json.loads((tmp_path / "run" / "test-report" / "metrics.json").read_text())["comparison"]
        # Calibrated on the validation speakers when their trials allow it, and said either way.
        line = str(step(app).query_one("#calibration-line", Static).render())
        assert line == comparison.calibration
        assert line.startswith("Calibrated on the validation speakers" if comparison.calibrated else "Not calibrated: ")
        assert ("calibration" in torch.load(tmp_path / "run" / "best.ckpt", weights_only=True)) == comparison.calibrated
        await next_step(pilot, 8)

        # 8 Export, serve, verify, copy the snippet.
        await press(pilot, "#export")
        await settle(pilot)
        assert app.draft.exported.parity.worst_cosine >= MIN_COSINE
        assert (tmp_path / "run" / "model.onnx").is_file()
        # The served threshold comes from the validation speakers, not from step 7's test speakers.
        validation = torch.load(tmp_path / "run" / "best.ckpt", weights_only=True)["evaluation"]
        metadata = app.draft.exported.metadata
        assert metadata["spkft_threshold_source"] == "eer"
        assert float(metadata["spkft_threshold"]) == pytest.approx(validation["eer_threshold"])
        assert float(metadata["spkft_threshold"]) != comparison.candidate.metrics.eer_threshold
        assert ("spkft_calibration" in metadata) == comparison.calibrated
        step(app).query_one("#port").value = "0"
        await press(pilot, "#start-server")
        await settle(pilot)
        server = app.draft.server
        assert server is not None and server.port > 0
        served = server.service.model
        assert f"with {served.engine} in {served.precision}" in str(step(app).query_one("#server-state", Static).render())
        await press(pilot, "#verify")
        await settle(pilot)
        assert str(step(app).query_one("#verdict", Static).render()).startswith("score ")
        await press(pilot, "#copy-cli")
        assert app.clipboard.startswith("spkft client verify ") and server.address in app.clipboard

        # Finish says what was made, and that the server stops, before the wizard exits.
        address = server.address
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, FinishDialog), "the summary")
        summary = str(app.screen.query_one("#finish-summary", Static).render())
        run = tmp_path / "run"
        assert f"Run folder: {run} (best checkpoint {run / 'best.ckpt'})" in summary
        assert f"Model: {run / 'model.onnx'} (" in summary and f"Server: {address}, stopped" in summary
        assert (f"Serve it again: spkft serve --model {run / 'model.onnx'} --enroll-db {run / 'enrollments.sqlite'}"
                in summary)
        assert app.draft.server is None  # stopped before the summary shows
        await pilot.press("enter")
        await pilot.pause()
    assert app.return_value and app.return_value[-1].startswith("Serve it again: ")


async def test_the_first_screen_shows_before_the_steps_have_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = threading.Event()
    real = wizard_app.step_screens

    def slow_steps():
        assert loaded.wait(DEADLINE_SECONDS), "the test never let the steps load"
        return real()

    monkeypatch.setattr(wizard_app, "step_screens", slow_steps)
    app = WizardApp()
    async with app.run_test(size=SIZE) as pilot:
        try:
            await pilot.pause()
            assert isinstance(app.screen, Starting), app.screen  # shown while the steps (and torch) load
            assert "Loading torch" in str(app.screen.query_one("#starting-text", Static).render())
            assert app.draft is None
        finally:
            loaded.set()
        await wait_for(pilot, lambda: isinstance(app.screen, StepScreen), "step 1")
        assert app.screen.NUMBER == 1 and app.draft is not None


async def test_no_data_of_your_own_the_demo_set_is_written_and_scanned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = WizardApp()
    async with app.run_test(size=SIZE) as pilot:
        await first_step(pilot)
        await press(pilot, "#demo")
        assert isinstance(app.screen, PromptDialog)
        app.screen.query_one("#answer").value = "my-demo"
        await pilot.press("enter")
        await settle(pilot)
        assert field(app, "data.train").input.value == str(Path("my-demo") / "train")
        assert app.draft.scan.synthetic and len(app.draft.scan.speakers) == DEMO_SPEAKERS
        assert "SYNTHETIC" in str(step(app).query_one("#summary", Static).render())
        # Tested on voices of its own, never trained on; no test speakers taken from train/.
        assert field(app, "data.test").input.value == str(Path("my-demo") / "test")
        assert field(app, "data.test_speakers").input.value == "0"
        await next_step(pilot, 2)
        await settle(pilot)
        # Step 2 starts from the bundled base, loaded at once: nothing to download.
        assert app.draft.config.model.init == Path(DEMO_BASE)
        assert app.draft.model is not None and app.draft.model.variant == "eres2netv2"
        assert DEMO_BASE in str(app.screen.query_one("#released-details", Static).render())
    assert app.draft.config.data.train == Path("my-demo") / "train"
    assert app.draft.config.data.test == Path("my-demo") / "test"


async def test_a_checkpoint_is_picked_from_the_file_tree(scratch):
    app = app_at(2)
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "model.init", "")
        field(app, "model.init").query_one(".browse", Button).press()
        await pilot.pause()
        assert isinstance(app.screen, PathPicker)
        tree = app.screen.query_one(DirectoryTree)
        await wait_for(pilot, lambda: tree.root.children, "the folder to be listed")
        shown = {str(node.label) for node in tree.root.children}
        assert shown == {"demo", "tiny.ckpt"}  # folders, and files of the kinds asked for
        tree.move_cursor(next(node for node in tree.root.children if str(node.label) == "tiny.ckpt"))
        await pilot.press("enter")
        await pilot.pause()
        assert field(app, "model.init").input.value == str(scratch / "tiny.ckpt")


# ---------------------------------------------------------------------------------- recipes
async def test_step_3_starts_on_auto_with_what_it_recommends_selected(scratch):
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        draft = app.draft
        pick = pick_recipe(training_data(draft.config, draft.scan), pretrained=True)
        assert pick.name == "linear-probe"  # 2 training speakers of a few seconds each
        assert chosen(app, "recipe") == "auto" and draft.config.recipe == "linear-probe"
        assert text_of(app, "#recipe-line") == f"auto → linear-probe: {pick.reason}"
        stages = recipe_values("linear-probe", pretrained=True)["freeze.stages"]
        assert chosen(app, "preset") == stages
        assert set(step(app).query_one("#stages", SelectionList).selected) == set(FREEZE_PRESETS[stages])
        assert knobs(draft, "linear-probe") == {}
        # No rehearsal recordings given: distillation holds the old domain.
        assert "no data.rehearsal to rehearse" in pick.reason
        assert draft.config.freeze.distill == recipe_values(pick.name, pretrained=True)["freeze.distill"] > 0
        assert step(app).query_one("#rehearsal-fraction").disabled
        assert "Distillation (weight" in text_of(app, "#plan") and "rehearsed" not in text_of(app, "#plan")


async def test_choosing_a_recipe_sets_every_knob_it_owns(scratch):
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for name in ("partial", "full", "linear-probe"):  # each sets something the one before did not
            await choose_recipe(pilot, name)
            assert chosen(app, "recipe") == name and app.draft.config.recipe == name
            assert knobs(app.draft, name) == {}
            assert text_of(app, "#recipe-line") == f"{name}: {describe(name, pretrained=True)}"
            values = recipe_values(name, pretrained=True)
            assert chosen(app, "preset") == values["freeze.stages"]
            for key in ("freeze.head_only_epochs", "freeze.backbone_lr_scale", "freeze.l2_sp"):
                assert field(app, key).input.value == as_text(values[key]), key
        await choose_recipe(pilot, "full")
        await next_step(pilot, 4)
        values = recipe_values("full", pretrained=True)
        assert text_of(app, "#recipe-line").startswith(f"Recipe full: {describe('full', pretrained=True)}")
        for key in ("optim.lr", "optim.weight_decay", "run.epochs", "optim.warmup_epochs", "head.margin",
                    "head.stats_dropout", "head.label_smoothing", "run.patience"):
            assert field(app, key).input.value == as_text(values[key]), key
        optimiser = next(f for f in step(app).query(SelectField) if f.key == "optim.optimizer")
        assert optimiser.query_one(Select).value == values["optim.optimizer"]


async def test_changing_a_knob_the_recipe_set_makes_the_choice_custom(scratch):
    partial = recipe_values("partial", pretrained=True)
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for key in ("freeze.backbone_lr_scale", "freeze.distill"):
            await choose_recipe(pilot, "partial")
            changed = partial[key] / 2
            await type_into(pilot, key, f"{changed:g}")
            await settle(pilot)
            assert chosen(app, "recipe") == "custom" and app.draft.config.recipe is None
            assert text_of(app, "#recipe-line") == "custom: your own values"
            assert knobs(app.draft, "partial") == {key: (changed, partial[key])}
        assert f"Distillation (weight {changed:g})" in text_of(app, "#plan")

        await choose_recipe(pilot, "partial")  # back to the recipe, then a stage frozen by hand
        assert app.draft.config.recipe == "partial" and knobs(app.draft, "partial") == {}
        frozen = FREEZE_PRESETS[partial["freeze.stages"]]
        extra = next(stage for stage in STAGES if stage not in frozen)
        step(app).query_one("#stages", SelectionList).select(extra)
        await settle(pilot)
        assert chosen(app, "recipe") == "custom" and chosen(app, "preset") == "custom"
        assert set(app.draft.config.freeze.stages) == {*frozen, extra}

        await choose_recipe(pilot, "partial")
        await next_step(pilot, 4)
        await type_into(pilot, "head.scale", "30")  # no recipe sets the scale: the recipe stays
        assert app.draft.config.recipe == "partial"
        assert text_of(app, "#recipe-line").startswith("Recipe partial: ")
        lr = partial["optim.lr"] / 2
        await type_into(pilot, "optim.lr", f"{lr:g}")
        assert app.draft.config.recipe is None and app.draft.recipe == "custom"
        assert text_of(app, "#recipe-line") == "Recipe custom: your own values"
        assert knobs(app.draft, "partial") == {"optim.lr": (lr, partial["optim.lr"])}


async def test_rehearsal_recordings_hold_the_old_domain_in_place_of_distillation(scratch):
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        draft = app.draft
        write_demo("base", speakers=4, recordings_per_speaker=2, seconds=(1.0, 1.0), seed=1, test_speakers=0)
        for number in (2, 1):
            await pilot.press("ctrl+b")
            await settle(pilot)
            assert step(app).NUMBER == number
        await type_into(pilot, "data.rehearsal", "base")
        assert draft.config.data.rehearsal == Path("base")
        await next_step(pilot, 2)
        await next_step(pilot, 3)
        pick = pick_recipe(training_data(draft.config, draft.scan), pretrained=True, rehearsal=True)
        assert "rehearsed from data.rehearsal" in pick.reason
        assert chosen(app, "recipe") == "auto" and text_of(app, "#recipe-line") == f"auto → {pick.name}: {pick.reason}"
        assert (draft.config.data.rehearsal_fraction, draft.config.freeze.distill) == (0.25, 0)
        assert knobs(draft, pick.name) == {}
        assert field(app, "freeze.distill").input.value == "0.0"
        assert not step(app).query_one("#rehearsal-fraction").disabled
        assert "25% of every batch is rehearsed from base" in text_of(app, "#plan")
        assert "Distillation" not in text_of(app, "#plan")
        assert "per rehearsed speaker" in text_of(app, "#total")

        for number in (2, 1):  # cleared again: distillation holds the old domain once more
            await pilot.press("ctrl+b")
            await settle(pilot)
        await type_into(pilot, "data.rehearsal", "")
        await next_step(pilot, 2)
        await next_step(pilot, 3)
        assert draft.config.data.rehearsal is None
        assert draft.config.freeze.distill == recipe_values("full", pretrained=True)["freeze.distill"]
        assert "no data.rehearsal to rehearse" in text_of(app, "#recipe-line")


async def test_a_fresh_model_trains_from_scratch_and_cannot_take_a_fine_tuning_recipe(scratch):
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await choose_recipe(pilot, "partial")
        await pilot.press("ctrl+b")
        await settle(pilot)
        step(app).query_one("#fresh", RadioButton).value = True
        await pilot.pause()
        step(app).query_one("#m-channels").value = "8"
        await press(pilot, "#load")
        await settle(pilot)
        await next_step(pilot, 3)
        draft = app.draft
        assert "partial fine-tunes a pretrained checkpoint" in status(app)  # the choice had to change
        for name in ("linear-probe", "partial"):
            assert step(app).query_one(f"#recipe-{name}", RadioButton).disabled
        assert "linear-probe and partial fine-tune a pretrained checkpoint" in text_of(app, "#recipe-refused")
        for pull in ("#l2-sp", "#distill", "#rehearsal-fraction"):  # nothing to pull toward, nothing to rehearse
            assert step(app).query_one(pull).disabled
        pick = pick_recipe(training_data(draft.config, draft.scan), pretrained=False)
        assert pick.name == "full"
        assert chosen(app, "recipe") == "auto" and draft.config.recipe == "full"
        assert text_of(app, "#recipe-line") == f"auto → full: {pick.reason}"
        assert knobs(draft, "full") == {}
        await choose_recipe(pilot, "partial")  # refused: nothing changes
        assert chosen(app, "recipe") == "auto" and draft.config.recipe == "full"
        await next_step(pilot, 4)
        assert text_of(app, "#recipe-line").startswith(f"Recipe auto → full: {pick.reason}")
        for key in ("optim.lr", "run.epochs"):  # the recipe's, not the defaults suggested from scratch
            assert field(app, key).input.value == as_text(recipe_values("full", pretrained=False)[key]), key


async def test_back_and_next_keep_the_recipe_choice(scratch):
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await choose_recipe(pilot, "full")
        await next_step(pilot, 4)
        assert text_of(app, "#recipe-line").startswith("Recipe full: ")
        for number in (3, 2, 1):
            await pilot.press("ctrl+b")
            await settle(pilot)
            assert step(app).NUMBER == number
        await next_step(pilot, 2)
        await next_step(pilot, 3)
        assert chosen(app, "recipe") == "full" and app.draft.config.recipe == "full"
        assert knobs(app.draft, "full") == {}
        await next_step(pilot, 4)
        assert text_of(app, "#recipe-line").startswith("Recipe full: ")


async def test_a_saved_config_reloads_with_the_recipe_chosen(scratch):
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await choose_recipe(pilot, "partial")  # not what auto picks for this data
        await next_step(pilot, 4)
        for key, text in {"run.batch_size": "2", "augment.crop_seconds": "0.5", "run.steps_per_epoch": "2"}.items():
            await type_into(pilot, key, text)  # no recipe sets these: the recipe stays
        await next_step(pilot, 5)
        assert "recipe: partial" in text_of(app, "#yaml").splitlines()
        # The estimate runs the trainer on this config, which applies the recipe again: same run.
        assert "per epoch" in text_of(app, "#estimate")
        step(app).query_one("#save-path").value = "saved.yaml"
        await press(pilot, "#save")
        built = app.draft.config
    saved = load_config("saved.yaml")
    assert saved.recipe == "partial" and saved.model_dump() == built.model_dump()
    assert resolve_recipe(saved)[0].model_dump() == saved.model_dump()  # spkft train --config runs the same

    again = WizardApp(Draft.from_config(saved))
    async with again.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await next_step(pilot, 2)
        await next_step(pilot, 3)
        assert chosen(again, "recipe") == "partial" and again.draft.config.recipe == "partial"
        assert knobs(again.draft, "partial") == {}
        await next_step(pilot, 4)
        assert text_of(again, "#recipe-line").startswith("Recipe partial: ")
        assert field(again, "run.batch_size").input.value == "2"


@pytest.mark.parametrize("saved, choice, recipe, values_of", [
    ({}, "auto", "linear-probe", "linear-probe"),                             # a new wizard
    ({"recipe": "auto"}, "auto", "linear-probe", "linear-probe"),
    ({"recipe": "partial"}, "partial", "partial", "partial"),
    ({"recipe": "partial", "optim.lr": 0.0042}, "custom", None, "partial"),   # the config's own value wins
    ({"freeze.stages": "encoder"}, "custom", None, None),                     # knobs of its own, no recipe
])
async def test_a_config_makes_the_first_recipe_choice_as_spkft_train_reads_it(scratch, saved, choice, recipe,
                                                                             values_of):
    draft = Draft.from_config(load_config(None, {"data.train": "demo", "data.val_speakers": 2,
                                                 "data.test_speakers": 2, "model.init": TINY_CHECKPOINT} | saved))
    draft.scan = SCENES[1]().scan
    assert draft.settle_recipe() is None
    assert (draft.recipe, draft.config.recipe) == (choice, recipe)
    own = {key: value for key, value in saved.items() if key != "recipe"}
    assert {key: draft.get(key) for key in own} == own
    if values_of is not None:  # the recipe's values everywhere else
        assert set(knobs(draft, values_of)) == set(own)


# ------------------------------------------------------------------------------------- Back
async def test_back_keeps_every_choice(scratch):
    app = app_at(3)
    async with app.run_test(size=SIZE) as pilot:
        step(app).query_one("#preset-encoder", RadioButton).value = True
        await pilot.pause()
        await next_step(pilot, 4)
        await type_into(pilot, "optim.lr", "0.0042")
        await pilot.press("ctrl+b")
        await pilot.press("ctrl+b")
        await pilot.press("ctrl+b")
        await settle(pilot)
        assert step(app).NUMBER == 1
        assert field(app, "data.train").input.value == "demo"
        assert "6 speakers" in str(step(app).query_one("#summary", Static).render())
        assert field(app, "data.test_speakers").input.value == "2"
        await next_step(pilot, 2)
        assert "✓ tiny.ckpt loaded" in str(step(app).query_one("#model-info", Static).render())
        await next_step(pilot, 3)
        assert step(app).query_one("#preset-encoder", RadioButton).value
        assert set(step(app).query_one("#stages", SelectionList).selected) == set(FREEZE_PRESETS["encoder"])
        await next_step(pilot, 4)
        assert field(app, "optim.lr").input.value == "0.0042"


async def test_back_is_refused_while_training_runs(tmp_path, librispeech_dir, reference_dir):
    app = WizardApp(run_config(librispeech_dir, reference_dir, tmp_path / "run", epochs=3, steps_per_epoch=2),
                    start=6)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.draft.training is not None, "the run to start")
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert step(app).NUMBER == 6 and "Cancel it first" in status(app)
        await press(pilot, "#cancel")
        await wait_for(pilot, lambda: app.draft.training.finished is not None, "the run to stop")


# ------------------------------------------------------------------------- Cancel and resume
async def test_a_run_reopened_in_a_new_session_shows_its_epochs_from_disk(tmp_path, librispeech_dir, reference_dir):
    run_dir = tmp_path / "run"
    first = WizardApp(run_config(librispeech_dir, reference_dir, run_dir, epochs=2, steps_per_epoch=2), start=6)
    async with first.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: first.draft.training is not None and first.draft.training.finished is not None,
                       "the run to finish")
    before = first.draft.training

    draft = run_config(librispeech_dir, reference_dir, run_dir, epochs=2, steps_per_epoch=2)
    draft.resume = True  # step 5's "Resume that run", in a wizard that never saw it run
    app = WizardApp(draft, start=6)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.draft.training.finished is not None and not step(app).running,
                       "the reopened run")
        await pilot.pause()
        log = app.draft.training
        assert [(e.epoch, e.val_eer, e.best_epoch, e.is_best) for e in log.epochs] == [
            (e.epoch, pytest.approx(e.val_eer), e.best_epoch, e.is_best) for e in before.epochs]
        assert log.initial.val_eer == pytest.approx(before.initial.val_eer)
        assert step(app).query_one("#epochs", DataTable).row_count == 2
        assert f"at epoch {before.epochs[-1].best_epoch}" in text_of(app, "#best")


@pytest.mark.parametrize("size", [(80, 24), (100, 30)], ids=["80x24", "100x30"])
async def test_the_run_controls_stay_in_view_beside_a_full_epoch_table(scratch, size):
    app = WizardApp(live_train_scene(), start=6)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        assert step(app).query_one("#epochs", DataTable).row_count == 2
        step(app).running = True  # as while the run goes on
        await pilot.pause()
        cancel = step(app).query_one("#cancel", Button)
        assert cancel.display and step(app).region.contains_region(cancel.region), cancel.region


async def test_cancel_in_the_first_epoch_says_nothing_was_saved_and_offers_a_fresh_start(tmp_path, librispeech_dir,
                                                                                          reference_dir):
    run_dir = tmp_path / "run"
    app = WizardApp(run_config(librispeech_dir, reference_dir, run_dir, epochs=2, steps_per_epoch=6), start=6)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.draft.training is not None and app.draft.training.steps, "the first step")
        log = app.draft.training
        await press(pilot, "#cancel")  # the status says "Stopping after this step…" until the trainer returns
        await wait_for(pilot, lambda: log.finished is not None and not step(app).running, "the run to stop")
        await pilot.pause()
        assert log.finished.reason == "cancelled" and not log.epochs and not (run_dir / "last.ckpt").exists()
        assert text_of(app, "#run-line") == CANCELLED_EARLY
        assert status(app) == ""
        assert not step(app).query_one("#resume", Button).display
        assert step(app).query_one("#restart", Button).display

        await press(pilot, "#restart")
        assert app.draft.training is not log and step(app).query_one("#cancel", Button).display
        await wait_for(pilot, lambda: app.draft.training.steps, "the new run's first step")
        await press(pilot, "#cancel")
        await wait_for(pilot, lambda: app.draft.training.finished is not None and not step(app).running,
                       "the new run to stop")
        assert app.draft.training.finished.reason == "cancelled"


async def test_cancel_keeps_the_last_checkpoint_and_the_run_resumes(tmp_path, librispeech_dir, reference_dir):
    run_dir = tmp_path / "run"
    app = WizardApp(run_config(librispeech_dir, reference_dir, run_dir, epochs=3, steps_per_epoch=3), start=6)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.draft.training is not None, "the run to start")
        log = app.draft.training
        await wait_for(pilot, lambda: log.epochs, "the first epoch")
        await press(pilot, "#cancel")
        await wait_for(pilot, lambda: log.finished is not None, "the run to stop")
        await pilot.pause()
        assert log.finished.reason == "cancelled"
        assert "cancelled" in str(step(app).query_one("#run-line", Static).render())
        assert torch.load(run_dir / "last.ckpt", weights_only=True)["epoch"] == 1
        assert step(app).query_one("#resume", Button).display

        # Back in step 5 the folder holds the run: Start is refused, Resume continues it.
        await pilot.press("ctrl+b")
        await settle(pilot)
        assert step(app).NUMBER == 5 and step(app).query_one("#existing-run").display
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == 5 and "already holds a run" in status(app)
        await press(pilot, "#resume")
        await settle(pilot)
        assert step(app).NUMBER == 6
        resumed = app.draft.training
        await wait_for(pilot, lambda: resumed.finished is not None, "the resumed run to finish")
    assert resumed.finished.reason == "completed"
    assert [e.epoch for e in resumed.epochs] == [1, 2, 3]  # epoch 1 kept from before the cancel
    assert resumed.started.start_epoch == 1
    metrics = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [0, 1, 2, 3]


# ---------------------------------------------------------------------- refused values
FIELD_ERRORS = [
    (1, "data.train", "", "a value is needed"),
    (1, "data.val_speakers", "0", "greater than 0"),
    (1, "data.test_speakers", "-1", "greater than or equal to 0"),
    (1, "data.min_recordings_per_speaker", "zero", "valid integer"),
    (3, "freeze.head_only_epochs", "-1", "greater than or equal to 0"),
    (3, "freeze.backbone_lr_scale", "2", "less than or equal to 1"),
    (3, "freeze.distill", "-1", "greater than or equal to 0"),
    (4, "optim.lr", "fast", "valid number"),
    (4, "optim.lr", "0", "greater than 0"),
    (4, "run.epochs", "0", "greater than or equal to 1"),
    (4, "run.batch_size", "2.5", "valid integer"),
    (4, "augment.crop_seconds", "0.1", "greater than 0.2"),
    (4, "head.margin", "1", "less than 1"),
    (4, "head.stats_dropout", "1", "less than 1"),
    (4, "run.patience", "0", "greater than or equal to 1"),
]


@pytest.mark.parametrize("number, key, text, reason", FIELD_ERRORS, ids=[f"{k}={t!r}" for _, k, t, _ in FIELD_ERRORS])
async def test_a_refused_value_is_explained_and_blocks_next(scratch, number, key, text, reason):
    app = app_at(number)
    async with app.run_test(size=SIZE) as pilot:
        before = app.draft.get(key)
        refused = await type_into(pilot, key, text)
        assert refused.problem is not None and reason in refused.problem
        assert reason in str(refused.query_one(".field-error", Static).render())
        assert app.draft.get(key) == before  # a refused value never reaches the config
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == number and "-problem" in step(app).query_one("#status").classes


async def test_holding_out_too_many_speakers_is_refused(scratch):
    app = app_at(1)
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "data.val_speakers", "3")
        await type_into(pilot, "data.test_speakers", "3")
        split = step(app).query_one("#split", Static)
        assert "at least one speaker must remain for training" in str(split.render())
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == 1 and "at least one speaker" in status(app)


async def test_a_source_that_does_not_exist_opens_an_error_dialog(scratch):
    app = app_at(1)
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "data.train", "no-such-folder")
        await press(pilot, "#scan")
        await settle(pilot)
        dialog = app.screen
        assert isinstance(dialog, ErrorDialog)
        assert "no such file or folder" in str(dialog.query_one("#error-message", Static).render())
        assert "spkft data check" in str(dialog.query_one("#error-advice", Static).render())
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == 1 and "Scan the recordings first" in status(app)


async def test_a_file_that_is_no_checkpoint_opens_an_error_dialog(scratch):
    Path("notes.ckpt").write_text("not a checkpoint\n")
    app = app_at(2)
    async with app.run_test(size=SIZE) as pilot:
        await type_into(pilot, "model.init", "notes.ckpt")
        await press(pilot, "#load")
        await settle(pilot)
        assert isinstance(app.screen, ErrorDialog)
        assert "not a PyTorch checkpoint" in str(app.screen.query_one("#error-message", Static).render())
        await pilot.press("escape")
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == 2 and "Load the checkpoint" in status(app)


async def test_a_fresh_model_needs_a_sensible_width(scratch):
    app = app_at(2)
    async with app.run_test(size=SIZE) as pilot:
        step(app).query_one("#fresh", RadioButton).value = True
        await pilot.pause()
        width = step(app).query_one("#m-channels")
        width.value = "2"
        await pilot.pause()
        assert "between 4 and 256" in (step(app).query_one(WidthField).problem or "")
        width.value = "8"
        await press(pilot, "#load")
        await settle(pilot)
        assert app.draft.config.model.init is None and app.draft.config.model.args == {"m_channels": 8}
        assert "a fresh eres2netv2_w24s4ep4" in str(step(app).query_one("#model-info", Static).render())


@pytest.mark.parametrize("key, text, problem", [
    ("freeze.head_only_epochs", "99", "head_only_epochs must be below run.epochs"),
    ("augment.noise_dir", "no-noise-here", "augment.noise_dir: no-noise-here does not exist"),
])
async def test_review_lists_what_the_config_cannot_do_and_refuses_to_start(scratch, key, text, problem):
    draft = SCENES[5]()
    draft.set(key, text)
    app = WizardApp(draft, start=5)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert problem in str(step(app).query_one("#problems", Static).render())
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert step(app).NUMBER == 5 and "Fix the problems" in status(app)


# ----------------------------------------------------------------------------- saved config
async def test_a_saved_config_prefills_every_step(scratch):
    SCENES[1]()  # writes the demo set
    os.symlink(TINY_CHECKPOINT, "tiny.ckpt")
    Path("saved.yaml").write_text(yaml.safe_dump({
        "data": {"train": "demo", "val_speakers": 2, "test_speakers": 2},
        "model": {"init": "tiny.ckpt"}, "freeze": {"stages": "encoder"},
        "optim": {"lr": 0.003}, "run": {"epochs": 5, "output_dir": "runs/saved"},
    }))
    app = WizardApp(Draft.from_config(load_config("saved.yaml")))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)  # the source is scanned on arrival
        assert "6 speakers" in str(step(app).query_one("#summary", Static).render())
        await next_step(pilot, 2)  # the checkpoint is loaded on arrival
        assert "✓ tiny.ckpt loaded" in str(step(app).query_one("#model-info", Static).render())
        await next_step(pilot, 3)
        assert step(app).query_one("#preset-encoder", RadioButton).value
        await next_step(pilot, 4)
        assert field(app, "optim.lr").input.value == "0.003"  # a saved value is not replaced by a suggestion
        assert field(app, "run.epochs").input.value == "5"
        assert app.draft.config.run.output_dir == Path("runs/saved")


async def test_step_8_shows_the_int8_comparison_before_int8_can_be_served(scratch, monkeypatch):
    """Try int8 shows both EERs whether or not the file was written; int8 is served only once written."""
    labels = [True] * 50 + [False] * 50
    fp32 = compute_metrics([0.1 * (i % 10) + (0.3 if t else 0.0) for i, t in enumerate(labels)], labels)
    worse = compute_metrics([0.1 * (i % 10) + (0.1 if t else 0.0) for i, t in enumerate(labels)], labels)
    outcomes = [EerRoseError(fp32, worse, 0.02, Path("model.onnx"), Path("model.int8.onnx")),
                QuantizedModel(scratch / "model.int8.onnx", 2_000_000, fp32, fp32, "validation",
                               "300 crops of the run's training data", 0.02, ("/conv1/Conv",), forced=False)]

    def export_int8(fp32_path, data, note):
        note("int8: measuring fp32 on 100 trials (validation)")
        outcome = outcomes.pop(0)
        if isinstance(outcome, EerRoseError):
            raise outcome
        return outcome

    asked = []

    def create_server(config):
        asked.append(config.precision)
        raise RuntimeError("no server in this test")

    monkeypatch.setattr(serve_step, "read_checkpoint", lambda path: {})
    monkeypatch.setattr(serve_step, "quantization_data", lambda checkpoint: "the run's data")
    monkeypatch.setattr(serve_step, "export_int8", export_int8)
    monkeypatch.setattr(serve_step, "create_server", create_server)
    app = app_at(8)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        step(app).query_one("#precision", Select).value = "int8"
        await press(pilot, "#start-server")
        assert "no int8 model to serve" in status(app) and not asked

        await press(pilot, "#quantize")
        await settle(pilot)
        shown = str(step(app).query_one("#int8-result", Static).render())
        assert "int8 against fp32 on 100 trials (validation)" in shown and "beyond the 2 % allowed" in shown
        assert f"fp32: EER {100 * fp32.eer:.2f} %" in shown and f"int8: EER {100 * worse.eer:.2f} %" in shown
        assert "not written" in shown and isinstance(app.draft.int8, EerRoseError)

        await press(pilot, "#quantize")
        await settle(pilot)
        shown = str(step(app).query_one("#int8-result", Static).render())
        assert "EER +0.0 % relative, within the 2 % allowed" in shown and "✓ wrote" in shown
        assert "1 layer(s) kept in fp32 to hold the EER: /conv1/Conv" in shown
        await press(pilot, "#start-server")
        await settle(pilot)
        assert asked == ["int8"]
        await pilot.press("escape")  # the error dialog of the stand-in server
