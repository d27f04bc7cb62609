"""The wizard at each step with fixed content, for snapshot tests and the README screenshot.

Each scene is a draft holding what the steps before it made: a real scan of a small synthetic
demo set and the real tiny checkpoint, then fixed figures where real ones would vary from run to
run (free memory, timings, training curves, scores). Paths are relative to the working folder,
which must be an empty scratch folder, so that screenshots do not depend on where it is.

    python tests/wizard_scenes.py docs/wizard.svg    # the README screenshot (the Train step)
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from spkft.core.data import scan, write_demo
from spkft.core.evaluate import Evaluation
from spkft.core.export import Agreement, ExportResult
from spkft.core.metrics import compute_metrics
from spkft.core.records import Trial
from spkft.core.report import Baseline
from spkft.core.train import EpochEnded, PhaseStarted, RunFinished, RunStarted, StepEnded, Validated
from spkft.core.train.memory import BatchSuggestion
from spkft.tui.wizard.app import WizardApp
from spkft.tui.wizard.draft import Comparison, Draft, Estimate, TrainingLog
from spkft.tui.wizard.steps.model import model_info
from spkft.tui.wizard.steps.review import basis

TINY_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tiny_w24s4ep4_m8.ckpt"
RUN_DIR = Path("runs/demo")
EPOCHS, STEPS_PER_EPOCH = 4, 6
VAL_EER = (0.24, 0.19, 0.17, 0.18)


def data_scene() -> Draft:
    """Step 1 after scanning a demo set whose list also names a missing file and a text file."""
    write_demo("demo", speakers=6, recordings_per_speaker=3, seconds=(1.0, 4.0), test_speakers=0)
    Path("demo/notes.txt").write_text("not audio\n")
    with open("demo/manifest.csv", "a") as manifest:
        manifest.write("synth01/gone.wav,synth01\nnotes.txt,synth02\n")
    draft = Draft()
    draft.set("data.train", Path("demo"))
    draft.set("data.val_speakers", 2)
    draft.set("data.test_speakers", 2)
    draft.scanned, draft.scan = "demo", scan("demo")
    return draft


def model_scene() -> Draft:
    draft = data_scene()
    os.symlink(TINY_CHECKPOINT, "tiny.ckpt")
    draft.set("model.init", Path("tiny.ckpt"))
    draft.model = model_info(Path("tiny.ckpt"), None, {})
    draft.set("model.variant", draft.model.variant)
    return draft


def freeze_scene() -> Draft:
    """Step 3 on first arrival: it chooses auto, which picks a recipe for the data and model."""
    return model_scene()


def fresh_freeze_scene() -> Draft:
    """Step 3 with a fresh network: the recipes that fine-tune a pretrained one are refused."""
    draft = data_scene()
    draft.fresh_model = True
    draft.set("model.variant", "eres2netv2_w24s4ep4")
    draft.set("model.args", {"m_channels": 8})
    draft.model = model_info(None, "eres2netv2_w24s4ep4", {"m_channels": 8})
    return draft


def settings_scene() -> Draft:
    draft = freeze_scene()
    draft.settle_recipe()  # as step 3 leaves it
    draft.batch = BatchSuggestion(batch_size=64, free_bytes=16 * 2**30, bytes_per_crop=67 * 2**20,
                                  state_bytes=28 * 2**20)
    return draft


def review_scene() -> Draft:
    draft = settings_scene()
    # The recipe's values kept; what no recipe sets, chosen.
    for key, value in {"run.batch_size": 8, "augment.crop_seconds": 2.0, "run.output_dir": RUN_DIR}.items():
        draft.edit(key, value)
    draft.suggested = True
    draft.estimate = Estimate(step_seconds=1.85, validation_seconds=12.0, steps_per_epoch=STEPS_PER_EPOCH,
                              epochs=draft.config.run.epochs, train_recordings=6, val_trials=21,
                              basis=basis(draft.config))
    return draft


def training_events(steps_done: int) -> list:
    """A run of EPOCHS x STEPS_PER_EPOCH steps, ``steps_done`` of them taken, with smooth made-up curves."""
    events = [
        RunStarted(str(RUN_DIR), EPOCHS, STEPS_PER_EPOCH, 0, 6, 2, 2, 21, "cpu", "fp32", 1),
        Validated(0, 0.31, 0.92),
        PhaseStarted(1, "phase 1: only the new head trains until epoch 1"),
    ]
    for done in range(1, steps_done + 1):
        epoch, step = (done - 1) // STEPS_PER_EPOCH + 1, (done - 1) % STEPS_PER_EPOCH + 1
        if epoch == 2 and step == 1:
            events.append(PhaseStarted(2, "phase 2: training the head and layer3, layer4, layer3_ds, fuse34, seg_1"))
        loss, accuracy = 2.0 + 12.0 * 0.88 ** done, 1.0 - 0.92 ** done
        events.append(StepEnded(epoch, step, STEPS_PER_EPOCH, done, loss, accuracy, 0.01, 0.2 * min(1.0, done / 12),
                                3.1 * (EPOCHS * STEPS_PER_EPOCH - done)))
        if step == STEPS_PER_EPOCH:
            best = min(range(epoch), key=lambda e: VAL_EER[e])
            events.append(EpochEnded(epoch, EPOCHS, loss, accuracy, VAL_EER[epoch - 1], 3 * VAL_EER[epoch - 1],
                                     VAL_EER[best], best + 1, best == epoch - 1, epoch - 1 - best, 3, 20.0))
    return events


def train_scene() -> Draft:
    """Step 6 after the whole run."""
    draft = review_scene()
    draft.training = TrainingLog(RUN_DIR, training_events(EPOCHS * STEPS_PER_EPOCH))
    draft.training.events.append(RunFinished("completed", str(RUN_DIR), 0.31, 3, 0.17, str(RUN_DIR / "best.ckpt")))
    return draft


def live_train_scene() -> Draft:
    """Step 6 in the middle of epoch 3."""
    draft = review_scene()
    draft.training = TrainingLog(RUN_DIR, training_events(2 * STEPS_PER_EPOCH + 4))
    return draft


def scores(rng: np.random.Generator, target: tuple[float, float], nontarget: tuple[float, float]):
    values = np.concatenate([rng.normal(*target, 60), rng.normal(*nontarget, 600)])
    labels = np.arange(660) < 60
    return np.clip(values, -1, 1), labels


def evaluate_scene() -> Draft:
    draft = train_scene()
    rng = np.random.default_rng(0)
    trials = [Trial(f"e{i}", f"t{i}", i < 60) for i in range(660)]
    after, labels = scores(rng, (0.62, 0.12), (0.18, 0.14))
    before, _ = scores(rng, (0.55, 0.15), (0.3, 0.15))
    candidate = Evaluation(compute_metrics(after, labels), after, labels, trials)
    baseline = Baseline(compute_metrics(before, labels), before, labels, "starting model")
    draft.evaluation = Comparison("660 trials among 12 recordings of 2 held-out test speakers",
                                  RUN_DIR / "best.ckpt", candidate, baseline, RUN_DIR / "test-report")
    return draft


def serve_scene() -> Draft:
    draft = evaluate_scene()
    draft.exported = ExportResult(RUN_DIR / "model.onnx", "onnx", 7_101_000, 17, {},
                                  Agreement(0.9999998, 0.9999999, 2.4e-6, (1, 2, 4), (9, 137, 400)), 3.2)
    return draft


SCENES = {1: data_scene, 2: model_scene, 3: freeze_scene, 4: settings_scene, 5: review_scene, 6: train_scene,
          7: evaluate_scene, 8: serve_scene}


def app_at(step: int) -> WizardApp:
    """The wizard opened at ``step`` with that step's scene (call in an empty working folder)."""
    return WizardApp(SCENES[step](), start=step)


async def _screenshot(output: Path, size: tuple[int, int]) -> None:
    app = WizardApp(live_train_scene(), start=6)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        app.screen.running = True  # as while the run goes on: Cancel is offered
        await pilot.pause()
        app.save_screenshot(str(output))


def main() -> None:
    output = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/wizard.svg").resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        asyncio.run(_screenshot(output, (100, 34)))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
