"""Checkpoint averaging: the mean itself, what it refuses, its config, runs that average, and export of an average."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from spkft.core.average import average_checkpoints
from spkft.core.checkpoint import embedding_checkpoint, load_model, read_checkpoint
from spkft.core.embedding import Embedder
from spkft.core.errors import CheckpointError
from spkft.core.export import parity_inputs
from spkft.core.model import build_model
from spkft.core.onnx_model import OnnxEmbedder
from spkft.core.train import ConfigError, EpochEnded, TrainConfig, Trainer, load_config
from spkft.core.train.snapshots import EpochSnapshots
from spkft.tui.cli import app
from spkft.tui.cli.train import ProgressView

from data_helpers import write_closed_set

TINY_ARGS = {"m_channels": 8, "num_blocks": [1, 1, 1, 1]}


def tiny_model(seed: int, **args) -> torch.nn.Module:
    """A tiny model whose weights and BatchNorm statistics all differ from another seed's."""
    torch.manual_seed(seed)
    model = build_model("eres2netv2", **(TINY_ARGS | args))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(10 * seed + 3)
    return model


def mean_of(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The hand-computed average: float64 mean of floating tensors, integer buffers from the last."""
    return {key: (sum(s[key].double() for s in states) / len(states)).to(tensor.dtype)
            if tensor.is_floating_point() else states[-1][key]
            for key, tensor in states[0].items()}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for key in expected:
        assert found[key].dtype == expected[key].dtype, key
        assert torch.equal(found[key], expected[key]), key


# ------------------------------------------------------------------------------------ the average
def test_the_average_is_the_mean_of_weights_and_batchnorm_statistics(tmp_path):
    models = [tiny_model(1), tiny_model(2)]
    paths = []
    for epoch, model in zip((4, 5), models):
        paths.append(tmp_path / f"epoch-{epoch}.ckpt")
        torch.save(embedding_checkpoint(model, "eres2netv2", epoch=epoch), paths[-1])
    states = [m.state_dict() for m in models]

    averaged = average_checkpoints(paths)

    assert_same_tensors(averaged["model"], mean_of(states))
    # The statistics really were averaged, not copied from one side, and the counter is the last one's.
    for key in ("bn1.running_mean", "bn1.running_var"):
        assert not torch.equal(averaged["model"][key], states[0][key])
        assert not torch.equal(averaged["model"][key], states[1][key])
    assert averaged["model"]["bn1.num_batches_tracked"].item() == 23
    assert averaged["averaged"] == {"checkpoints": [str(p) for p in paths], "epochs": [4, 5]}
    assert "epoch" not in averaged and averaged["variant"] == "eres2netv2"
    # A normal spkft checkpoint: written and read back like any other (weights_only).
    torch.save(averaged, tmp_path / "average.ckpt")
    loaded = load_model(tmp_path / "average.ckpt")
    assert_same_tensors(loaded.model.state_dict(), mean_of(states))


def test_checkpoints_in_memory_and_upstream_state_dicts_average_alike(tmp_path):
    models = [tiny_model(1), tiny_model(2)]
    spkft = embedding_checkpoint(models[0], "eres2netv2", epoch=4)
    upstream = {f"module.{k}": v for k, v in models[1].state_dict().items()}  # as DDP training saves it
    averaged = average_checkpoints([spkft, upstream])
    assert_same_tensors(averaged["model"], mean_of([m.state_dict() for m in models]))
    assert averaged["averaged"] == {"checkpoints": ["checkpoint 1", "checkpoint 2"]}  # no epoch for upstream's


def test_different_networks_are_refused_naming_the_file_and_keys(tmp_path):
    first, other = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    torch.save(embedding_checkpoint(tiny_model(1), "eres2netv2"), first)
    torch.save(embedding_checkpoint(tiny_model(2, num_blocks=[1, 1, 1, 2]), "eres2netv2"), other)
    with pytest.raises(CheckpointError) as caught:
        average_checkpoints([first, other])
    message = str(caught.value)
    assert message.startswith(f"{other}: not the same network as {first}")
    assert "unexpected: layer4.1." in message and "\n" not in message

    wider = tmp_path / "c.ckpt"
    torch.save(embedding_checkpoint(tiny_model(3, m_channels=16), "eres2netv2"), wider)
    with pytest.raises(CheckpointError, match=r"c\.ckpt: not the same network .*wrong shape: conv1\.weight"):
        average_checkpoints([first, wider])


def test_a_checkpoint_with_an_adaptation_is_refused(tmp_path):
    plain, adapted = tmp_path / "plain.ckpt", tmp_path / "adapted.ckpt"
    torch.save(embedding_checkpoint(tiny_model(1), "eres2netv2"), plain)
    torch.save(embedding_checkpoint(tiny_model(2), "eres2netv2", adaptation={"method": "center"}), adapted)
    with pytest.raises(CheckpointError, match=rf"^{adapted}: carries a backend adaptation fitted to its own weights"):
        average_checkpoints([plain, adapted])


def test_one_checkpoint_is_not_an_average(tmp_path):
    path = tmp_path / "one.ckpt"
    torch.save(embedding_checkpoint(tiny_model(1), "eres2netv2"), path)
    with pytest.raises(CheckpointError, match="at least two checkpoints, got 1"):
        average_checkpoints([path])


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("overrides", "problem"), [
    ({"run.average_last": 1}, "run.average_last: must be 0 (off) or at least 2: the average of 1 epoch is that epoch"),
    ({"run.average_best": 1}, "run.average_best: must be 0 (off) or at least 2"),
    ({"run.average_best": -2}, "run.average_best: Input should be greater than or equal to 0"),
    ({"run.average_last": 3, "run.average_best": 2}, "run: average_last and average_best cannot both be set"),
])
def test_averaging_config_problems(overrides, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith(problem)


def test_averaging_config_is_off_by_default_and_takes_n():
    assert (load_config(None).run.average_last, load_config(None).run.average_best) == (0, 0)
    assert load_config(None, {"run.average_best": 3}).run.average_best == 3


# ------------------------------------------------------------------------------ kept snapshots
def test_snapshots_keep_the_n_best_so_far_with_ties_to_the_earlier_epoch(tmp_path):
    snapshots = EpochSnapshots(tmp_path, "best", 2)
    offers = [(1, 0.30), (2, 0.20), (3, 0.25), (4, 0.40), (5, 0.20)]
    results = [snapshots.offer(epoch, eer) for epoch, eer in offers]
    assert results == [(True, []), (True, []), (True, [snapshots.path(1)]), (False, []), (True, [snapshots.path(3)])]
    assert [s.epoch for s in snapshots.kept] == [2, 5]


def test_snapshots_keep_the_last_n(tmp_path):
    snapshots = EpochSnapshots(tmp_path, "last", 2)
    assert [snapshots.offer(e, 0.1 * e) for e in (1, 2, 3)] == [(True, []), (True, []), (True, [snapshots.path(1)])]
    assert snapshots.state() == [{"epoch": 2, "val_eer": 0.2}, {"epoch": 3, "val_eer": pytest.approx(0.3)}]


def test_restoring_snapshots_deletes_every_other_snapshot_file(tmp_path):
    snapshots = EpochSnapshots(tmp_path / "epochs", "best", 3)
    snapshots.directory.mkdir()
    for epoch in (2, 4, 5, 6):
        snapshots.path(epoch).write_bytes(b"weights")
    (snapshots.directory / ".epoch-007.ckpt.tmp").write_bytes(b"half")
    (snapshots.directory / "notes.txt").write_text("not ours")
    # Epoch 3 was recorded but its file is gone: it cannot be averaged any more.
    snapshots.restore([{"epoch": 2, "val_eer": 0.1}, {"epoch": 3, "val_eer": 0.2}, {"epoch": 5, "val_eer": 0.3}],
                      delete_others=True)
    assert [s.epoch for s in snapshots.kept] == [2, 5]
    assert sorted(p.name for p in snapshots.directory.iterdir()) == ["epoch-002.ckpt", "epoch-005.ckpt", "notes.txt"]


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def lists(fsdd_dir, tmp_path_factory):
    return write_closed_set(fsdd_dir, tmp_path_factory.mktemp("fsdd"), train_takes=4, val_takes=(40, 41), val_digits=1)


def run_config(run_dir: Path, lists, **overrides):
    train, val = lists
    values = {
        "data.train": train, "data.val": val, "model.variant": "eres2netv2", "model.args": TINY_ARGS,
        "run.epochs": 3, "run.batch_size": 8, "run.steps_per_epoch": 1, "run.patience": None,
        "run.output_dir": run_dir, "run.precision": "fp32", "run.channels_last": False, "run.num_workers": 0,
        "augment.crop_seconds": 0.5, "optim.lr": 0.05,
    }
    return load_config(None, values | overrides)


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "epochs").iterdir())


def check_average(run_dir: Path, finished, rule: str, epochs: list[int]) -> None:
    """average.ckpt is the mean of exactly these epochs' snapshots, validated, logged and reported."""
    assert snapshot_files(run_dir) == [f"epoch-{e:03d}.ckpt" for e in epochs]
    snapshots = [read_checkpoint(run_dir / "epochs" / f"epoch-{e:03d}.ckpt") for e in epochs]
    assert [s["epoch"] for s in snapshots] == epochs
    average = read_checkpoint(run_dir / "average.ckpt")
    assert_same_tensors(average["model"], mean_of([s["model"] for s in snapshots]))
    assert average["averaged"]["epochs"] == epochs
    assert "epoch" not in average and "optimizer" not in average and "head" not in average
    lines = metrics_lines(run_dir)
    assert [line["epoch"] for line in lines[:-1]] == list(range(4))
    assert lines[-1] == {"average": rule, "epochs": epochs, "val_eer": pytest.approx(finished.average_eer),
                         "val_min_dcf": pytest.approx(average["evaluation"]["min_dcf"])}
    assert average["evaluation"]["eer"] == pytest.approx(finished.average_eer)
    assert average["evaluation"]["data"] == "validation"
    assert (finished.average, finished.average_epochs) == (rule, tuple(epochs))
    assert finished.average_checkpoint == str(run_dir / "average.ckpt") and finished.average_skipped is None
    # best.ckpt keeps meaning the best single epoch.
    assert read_checkpoint(run_dir / "best.ckpt")["epoch"] == finished.best_epoch


def test_average_last_averages_the_last_epochs_and_keeps_only_their_snapshots(tmp_path, lists):
    run_dir = tmp_path / "run"
    finished = Trainer(run_config(run_dir, lists, **{"run.average_last": 2})).run()
    assert finished.reason == "completed"
    check_average(run_dir, finished, "last 2", [2, 3])
    # A snapshot is its epoch's weights: the last one is last.ckpt's.
    assert_same_tensors(read_checkpoint(run_dir / "epochs" / "epoch-003.ckpt")["model"],
                        read_checkpoint(run_dir / "last.ckpt")["model"])
    out = io.StringIO()
    ProgressView(Console(file=out, width=200), TrainConfig())(finished)
    line = next(x for x in out.getvalue().splitlines() if x.startswith("average of epochs"))
    assert line.startswith(f"average of epochs 2, 3 (last 2): val EER {finished.average_eer:.2%} against "
                           f"{finished.best_eer:.2%} for the best epoch ({finished.best_epoch})")


def test_a_run_shorter_than_the_average_says_why_there_is_none(tmp_path, lists):
    run_dir = tmp_path / "run"
    finished = Trainer(run_config(run_dir, lists, **{"run.epochs": 1, "run.average_last": 3})).run()
    assert finished.average_checkpoint is None and not (run_dir / "average.ckpt").exists()
    assert finished.average_skipped == "only 1 epoch(s) to average, and an average needs at least 2"
    assert all("epoch" in line for line in metrics_lines(run_dir))


@pytest.fixture(scope="module")
def best_run(lists, tmp_path_factory):
    """An uninterrupted run averaging its 2 best epochs of 3."""
    run_dir = tmp_path_factory.mktemp("best") / "run"
    finished = Trainer(run_config(run_dir, lists, **{"run.average_best": 2})).run()
    return run_dir, finished


def test_average_best_averages_the_best_validated_epochs(best_run):
    run_dir, finished = best_run
    epochs = metrics_lines(run_dir)[1:4]
    best = sorted(sorted(epochs, key=lambda line: (line["val_eer"], line["epoch"]))[:2], key=lambda line: line["epoch"])
    check_average(run_dir, finished, "best 2", [line["epoch"] for line in best])


def test_a_resumed_run_makes_the_same_average_as_the_uninterrupted_one(best_run, lists, tmp_path):
    full_dir, full = best_run
    run_dir = tmp_path / "run"
    stop = threading.Event()

    def stop_after_first_epoch(event):
        if isinstance(event, EpochEnded) and event.epoch == 1:
            stop.set()

    cut = run_config(run_dir, lists, **{"run.average_best": 2})
    assert Trainer(cut, sink=stop_after_first_epoch, stop=stop).run().reason == "cancelled"
    assert not (run_dir / "average.ckpt").exists() and all("epoch" in line for line in metrics_lines(run_dir))
    # As if killed while saving epoch 2: its snapshot (and a half-written one) landed, last.ckpt did not.
    (run_dir / "epochs" / "epoch-002.ckpt").write_bytes((run_dir / "epochs" / "epoch-001.ckpt").read_bytes())
    (run_dir / "epochs" / ".epoch-003.ckpt.tmp").write_bytes(b"half")

    resumed = Trainer(cut, resume=True).run()

    assert resumed.average_epochs == full.average_epochs and resumed.average_eer == full.average_eer
    assert snapshot_files(run_dir) == snapshot_files(full_dir)
    assert_same_tensors(read_checkpoint(run_dir / "average.ckpt")["model"],
                        read_checkpoint(full_dir / "average.ckpt")["model"])
    drop_time = lambda lines: [{k: v for k, v in x.items() if k != "seconds"} for x in lines]  # noqa: E731
    assert drop_time(metrics_lines(run_dir)) == drop_time(metrics_lines(full_dir))


# ---------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """An upstream-style state_dict and an spkft checkpoint of one tiny network with different weights."""
    root = tmp_path_factory.mktemp("two")
    torch.save(tiny_model(1).state_dict(), root / "pretrained.ckpt")
    torch.save(embedding_checkpoint(tiny_model(2), "eres2netv2", epoch=7), root / "tuned.ckpt")
    return root / "pretrained.ckpt", root / "tuned.ckpt"


def test_export_of_two_checkpoints_writes_their_mean(two_checkpoints, tmp_path):
    output = tmp_path / "average.ckpt"
    result = CliRunner().invoke(app, ["export", "-c", str(two_checkpoints[0]), "--checkpoint", str(two_checkpoints[1]),
                                      "--format", "3dspeaker", "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (f"exporting the average of 2 checkpoints: {two_checkpoints[0]}, "
                                             f"{two_checkpoints[1]}")
    states = [load_model(path).model.state_dict() for path in two_checkpoints]
    assert_same_tensors(torch.load(output, weights_only=True), mean_of(states))


def test_onnx_export_of_two_checkpoints_embeds_like_their_average(two_checkpoints, tmp_path):
    output = tmp_path / "average.onnx"
    result = CliRunner().invoke(app, ["export", "-c", str(two_checkpoints[0]), "-c", str(two_checkpoints[1]),
                                      "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert "no threshold is stored unless --threshold is given" in result.stdout.splitlines()[0]
    average = load_model(two_checkpoints[0])
    average.model.load_state_dict(mean_of([load_model(p).model.state_dict() for p in two_checkpoints]))
    features = parity_inputs(batch_sizes=(2,), frame_counts=(200,))[0]
    exported = OnnxEmbedder.from_file(output, engine="onnxruntime").raw_embeddings(features)
    first = Embedder(load_model(two_checkpoints[0]).model).raw_embeddings(features)
    assert cosines(exported, Embedder(average.model).raw_embeddings(features)).min() > 0.99999
    assert cosines(exported, first).min() < 0.999  # not simply the first file


def test_export_refuses_to_average_different_networks(two_checkpoints, tmp_path):
    other = tmp_path / "wider.ckpt"
    torch.save(embedding_checkpoint(tiny_model(1, m_channels=16), "eres2netv2"), other)
    result = CliRunner().invoke(app, ["export", "-c", str(two_checkpoints[0]), "-c", str(other),
                                      "--format", "3dspeaker", "-o", str(tmp_path / "x.ckpt")])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"error: {other}: not the same network as {two_checkpoints[0]}")
    assert not (tmp_path / "x.ckpt").exists()
