"""Fine-tuning runs on real speech with a tiny ERes2NetV2: learning, freezing, resume, bad data, divergence."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from spkft.core.checkpoint import load_model, read_checkpoint
from spkft.core.errors import SpkftError
from spkft.core.train import EpochEnded, StepEnded, Trainer, TrainingDiverged, load_config
from spkft.core.train import trainer as trainer_module
from spkft.core.train.freeze import stage_of, trainable_names
from spkft.core.model import build_model

from data_helpers import write_closed_set

TINY = {"model.variant": "eres2netv2", "model.args": {"m_channels": 8, "num_blocks": [1, 1, 1, 1]}}


@pytest.fixture(scope="module")
def fsdd_lists(fsdd_dir, tmp_path_factory):
    return write_closed_set(fsdd_dir, tmp_path_factory.mktemp("fsdd"), train_takes=8, val_takes=(40, 41), val_digits=5)


def config(tmp_path, train, val, **overrides):
    values = {
        "data.train": train, "data.val": val, **TINY,
        "run.epochs": 2, "run.batch_size": 16, "run.steps_per_epoch": 4, "run.patience": None,
        "run.output_dir": tmp_path / "run", "run.precision": "fp32", "run.channels_last": False,
        "augment.crop_seconds": 0.5, "optim.lr": 0.05,
    }
    return load_config(None, values | overrides)


class Recorder(list):
    def __call__(self, event):
        self.append(event)

    def of(self, kind):
        return [e for e in self if isinstance(e, kind)]


def test_fine_tuning_lowers_validation_eer(tmp_path, fsdd_lists):
    events = Recorder()
    finished = Trainer(config(tmp_path, *fsdd_lists, **{"run.epochs": 4, "run.steps_per_epoch": 8}), sink=events).run()
    assert finished.reason == "completed"
    assert finished.best_eer < finished.initial_eer
    epochs = events.of(EpochEnded)
    assert [e.epoch for e in epochs] == [1, 2, 3, 4]
    assert epochs[-1].train_accuracy > epochs[0].train_accuracy
    run = Path(finished.run_dir)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[0]["val_eer"] == pytest.approx(finished.initial_eer)
    assert min(line["val_eer"] for line in lines[1:]) == pytest.approx(finished.best_eer)
    assert {"config.yaml", "labels.json", "last.ckpt", "best.ckpt", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert (run / "report" / "det.png").is_file()
    best = load_model(run / "best.ckpt")
    assert best.checkpoint["epoch"] == finished.best_epoch and "optimizer" not in best.checkpoint
    # Each checkpoint carries the validation result of its own epoch (export puts it into metadata).
    assert best.checkpoint["evaluation"]["data"] == "validation"
    assert best.checkpoint["evaluation"]["eer"] == pytest.approx(finished.best_eer)
    assert read_checkpoint(run / "last.ckpt")["evaluation"]["eer"] == pytest.approx(lines[-1]["val_eer"])
    assert json.loads((run / "labels.json").read_text()) == sorted({"george", "jackson", "lucas", "nicolas", "theo", "yweweler"})
    assert load_config(run / "config.yaml") == Trainer.__init__.__globals__["TrainConfig"].model_validate(
        json.loads(json.dumps(read_checkpoint(run / "last.ckpt")["config"])))


def test_frozen_stages_and_their_batchnorm_statistics_do_not_move(tmp_path, fsdd_lists):
    cfg = config(tmp_path, *fsdd_lists, **{"run.epochs": 1, "run.steps_per_epoch": 3, "freeze.stages": "early"})
    trainer = Trainer(cfg)
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    frozen = {"stem", "layer1", "layer2"}
    for name, tensor in after.items():
        stage = stage_of(name)
        if stage in frozen:
            assert torch.equal(tensor, before[name]), f"{name} changed although {stage} is frozen"
        elif name.endswith(("weight", "running_mean")) and "num_batches" not in name:
            assert not torch.equal(tensor, before[name]), f"{name} did not train"
    trainer.cleanup()


def test_a_narrow_network_stays_contiguous_on_the_cpu_unless_asked(tmp_path, fsdd_lists):
    for setting, expected in (("auto", False), (True, True)):
        trainer = Trainer(config(tmp_path / str(setting), *fsdd_lists, **{"run.channels_last": setting}))
        trainer.setup()
        try:
            weight = trainer.model.layer1[0].convs[0].weight  # 3x3 over several channels: the two layouts differ
            assert trainer.channels_last is expected
            assert weight.is_contiguous(memory_format=torch.channels_last if expected else torch.contiguous_format)
        finally:
            trainer.cleanup()


def test_every_parameter_is_exactly_trainable_or_frozen():
    model = build_model("eres2netv2", m_channels=8)
    names = {n for n, _ in model.named_parameters()}
    early = trainable_names(model, ("stem", "layer1", "layer2"))
    assert early == {n for n in names if not n.startswith(("conv1.", "bn1.", "layer1.", "layer2."))}
    assert trainable_names(model, ()) == names
    everything = ("stem", "layer1", "layer2", "layer3", "layer4", "layer3_ds", "fuse34", "seg_1")
    assert trainable_names(model, everything) == set()
    assert trainable_names(model, everything[:-1]) == {"seg_1.weight", "seg_1.bias"}


def test_head_only_phase_then_unfrozen(tmp_path, fsdd_lists):
    cfg = config(tmp_path, *fsdd_lists, **{"run.epochs": 2, "run.steps_per_epoch": 2, "freeze.head_only_epochs": 1,
                                          "freeze.backbone_lr_scale": 0.1})
    trainer = Trainer(cfg)
    trainer.setup()
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    snapshots = []
    trainer.sink = lambda e: snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()}) \
        if isinstance(e, EpochEnded) else None
    trainer.train()
    after_phase1, after_phase2 = snapshots
    assert all(torch.equal(after_phase1[k], start[k]) for k in start)  # encoder untouched, BN stats too
    assert not torch.equal(after_phase2["layer4.0.conv1.weight"], start["layer4.0.conv1.weight"])
    assert trainer.optimizer.param_groups[0]["peak"] == pytest.approx(0.1 * trainer.optimizer.param_groups[1]["peak"])
    trainer.cleanup()


def test_resume_reproduces_the_uninterrupted_run(tmp_path, fsdd_lists):
    overrides = {"run.epochs": 3, "run.steps_per_epoch": 3, "head.stats_dropout": 0.2}
    full = Recorder()
    Trainer(config(tmp_path / "full", *fsdd_lists, **overrides), sink=full).run()

    stop = threading.Event()
    first = Recorder()

    def stop_after_first_epoch(event):
        first.append(event)
        if isinstance(event, EpochEnded) and event.epoch == 1:
            stop.set()

    cut = config(tmp_path / "cut", *fsdd_lists, **overrides)
    assert Trainer(cut, sink=stop_after_first_epoch, stop=stop).run().reason == "cancelled"
    with pytest.raises(SpkftError, match="already holds a run"):
        Trainer(cut)
    resumed = Recorder()
    Trainer(cut, sink=resumed, resume=True).run()

    losses = [e.loss for e in full.of(StepEnded)]
    assert [e.loss for e in first.of(StepEnded)] + [e.loss for e in resumed.of(StepEnded)] == losses
    assert [e.val_eer for e in resumed.of(EpochEnded)] == [e.val_eer for e in full.of(EpochEnded)][1:]


def test_bad_rows_are_excluded_and_training_goes_on(tmp_path, fsdd_dir):
    data = tmp_path / "data"
    data.mkdir()
    rows = ["path,speaker"]
    for speaker in ("george", "jackson", "lucas"):
        for take in range(4):
            rows.append(f"{fsdd_dir / f'{take}_{speaker}_0.wav'},{speaker}")
    speech, rate = sf.read(fsdd_dir / "0_theo_0.wav", dtype="float32")
    sf.write(data / "at16k.wav", np.interp(np.arange(0, len(speech), 0.5), np.arange(len(speech)), speech), 16000)
    rows.append(f"{data / 'at16k.wav'},theo")  # another sample rate: resampled, kept
    (data / "notes.wav").write_text("not audio")
    sf.write(data / "short.wav", speech[:400], rate)
    (data / "broken.flac").write_bytes(b"fLaC" + bytes(100))
    rows += [f"{data / 'missing.wav'},theo", f"{data / 'notes.wav'},theo", f"{data / 'short.wav'},theo",
             f"{data / 'broken.flac'},theo"]
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    val = data / "val.csv"
    val.write_text("path,speaker\n" + "\n".join(f"{fsdd_dir / f'{d}_{s}_40.wav'},{s}" for s in ("george", "lucas") for d in range(3)) + "\n")
    trainer = Trainer(config(tmp_path, data / "train.csv", val, **{"run.epochs": 1, "run.steps_per_epoch": 2,
                                                                   "run.batch_size": 4}))
    finished = trainer.run()
    assert finished.reason == "completed"
    report = trainer.scan_reports["train"]
    reasons = {Path(e.path).name: e.reason for e in report.excluded}
    assert set(reasons) == {"missing.wav", "notes.wav", "short.wav", "broken.flac"}
    assert len(report.recordings) == 13 and report.resampled == 13 - 1


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, fsdd_lists, monkeypatch):
    cfg = config(tmp_path, *fsdd_lists, **{"run.epochs": 2, "run.steps_per_epoch": 2})
    trainer = Trainer(cfg)
    trainer.setup()
    real_forward = trainer.head.forward
    calls = {"n": 0}

    def poisoned(embeddings, labels):
        calls["n"] += 1
        loss, cos = real_forward(embeddings, labels)
        return (loss * math.nan if calls["n"] > 2 else loss), cos

    monkeypatch.setattr(trainer.head, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss became NaN at epoch 2, step 1.*last.ckpt"):
        trainer.train()
    trainer.cleanup()
    last = read_checkpoint(tmp_path / "run" / "last.ckpt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


class Killed(BaseException):
    """The process dying at a chosen instant (a BaseException, so nothing on the way catches it)."""


@pytest.mark.parametrize("kill_after", ["last.ckpt", "best.ckpt", "metrics line"])
def test_a_kill_between_any_two_writes_resumes_into_the_uninterrupted_run(tmp_path, fsdd_lists, monkeypatch,
                                                                          kill_after):
    # Epoch 1 is always the best so far, so its writes are last.ckpt, best.ckpt, then the metrics line.
    overrides = {"run.epochs": 2, "run.steps_per_epoch": 2}
    full = Trainer(config(tmp_path / "full", *fsdd_lists, **overrides)).run()
    full_best = torch.load(Path(full.run_dir) / "best.ckpt", weights_only=False)

    cut = config(tmp_path / "cut", *fsdd_lists, **overrides)
    real_save, real_dumps = trainer_module._save_atomically, trainer_module.json.dumps

    def save_then_die(obj, path):
        real_save(obj, path)
        if path.name == kill_after:
            raise Killed

    def line_then_die(obj, *args, **kwargs):
        text = real_dumps(obj, *args, **kwargs)
        if kill_after == "metrics line" and isinstance(obj, dict) and obj.get("epoch") == 1 and "lr" in obj:
            raise Killed  # the line is never appended
        return text

    monkeypatch.setattr(trainer_module, "_save_atomically", save_then_die)
    monkeypatch.setattr(trainer_module.json, "dumps", line_then_die)
    with pytest.raises(Killed):
        Trainer(cut).run()
    monkeypatch.undo()
    run = Path(cut.run.output_dir)
    assert read_checkpoint(run / "last.ckpt")["epoch"] == 1

    resumed = Trainer(cut, resume=True).run()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2]  # epoch 1's line is there, once
    expected = [json.loads(line) for line in (Path(full.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["val_eer"] for line in lines] == [line["val_eer"] for line in expected]
    best = torch.load(run / "best.ckpt", weights_only=False)
    assert best["epoch"] == resumed.best_epoch == full.best_epoch
    assert all(torch.equal(best["model"][k], full_best["model"][k]) for k in full_best["model"])


def test_a_full_disk_is_one_clear_line_and_leaves_no_partial_file(tmp_path, fsdd_lists, monkeypatch):
    cfg = config(tmp_path, *fsdd_lists, **{"run.epochs": 2, "run.steps_per_epoch": 2})
    run = Path(cfg.run.output_dir)
    real_save = torch.save
    saves = []

    def save_until_the_disk_fills(obj, target):
        saves.append(Path(target).name)
        if len(saves) <= 2:  # epoch 1's last.ckpt and best.ckpt fit
            return real_save(obj, target)
        Path(target).write_bytes(b"PK partial")  # what the zip writer leaves when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 538")

    monkeypatch.setattr(trainer_module.torch, "save", save_until_the_disk_fills)
    monkeypatch.setattr(trainer_module, "_free_bytes", lambda folder: 0 if len(saves) > 2 else 1 << 40)
    with pytest.raises(SpkftError) as failed:
        Trainer(cfg).run()
    message = str(failed.value)
    assert message.startswith(f"cannot write {run / 'last.ckpt'}: no space left on device") and "\n" not in message
    assert not list(run.glob(".*.tmp"))  # the partial file is gone
    monkeypatch.undo()
    assert read_checkpoint(run / "last.ckpt")["epoch"] == 1  # epoch 1's checkpoints are intact
    assert read_checkpoint(run / "best.ckpt")["epoch"] == 1
