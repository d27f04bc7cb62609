"""spkft train from the command line: config handling, a killed run resumed, and DDP with 2 CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from spkft.core.train import load_config
from spkft.tui.cli import app

from data_helpers import write_closed_set

runner = CliRunner()


@pytest.fixture(scope="module")
def run_config(fsdd_dir, tmp_path_factory):
    """A YAML config of a tiny model on real 8 kHz speech (closed set: 6 speakers)."""
    root = tmp_path_factory.mktemp("cli-train")
    train, val = write_closed_set(fsdd_dir, root, train_takes=4, val_takes=(40,), val_digits=4)
    config = {
        "data": {"train": str(train), "val": str(val)},
        "model": {"variant": "eres2netv2", "args": {"m_channels": 8, "num_blocks": [1, 1, 1, 1]}},
        "augment": {"crop_seconds": 0.5},
        "optim": {"lr": 0.05},
        "run": {"epochs": 3, "batch_size": 8, "steps_per_epoch": 6, "patience": None, "precision": "fp32",
                "channels_last": False, "device": "cpu"},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def spkft(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "spkft.tui.cli", *map(str, args)], capture_output=True, text=True, **kwargs)


def test_print_config_applies_flags_over_the_file(run_config, tmp_path):
    result = runner.invoke(app, ["train", "--config", str(run_config), "--epochs", "7", "--lr", "0.003",
                                 "--freeze", "stem,layer1", "--model-arg", "embedding_size=128",
                                 "--output-dir", str(tmp_path / "x"), "--print-config"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["run"]["epochs"] == 7 and resolved["optim"]["lr"] == 0.003
    assert resolved["freeze"]["stages"] == ["stem", "layer1"]
    assert resolved["model"]["args"] == {"embedding_size": 128}
    assert resolved["run"]["batch_size"] == 8  # from the file
    assert not (tmp_path / "x").exists()


def test_config_errors_are_listed_together(run_config, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  epochs: 0\n  batch_sise: 4\noptim:\n  optimizer: rmsprop\n")
    result = runner.invoke(app, ["train", "--config", str(bad), "--lr", "-1"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: 4 problem(s) in the configuration")
    for problem in ("run.epochs", "run.batch_sise: unknown key", "optim.optimizer", "optim.lr"):
        assert problem in line


def test_killed_run_resumes_to_the_same_result(run_config, tmp_path):
    straight = spkft("train", "--config", run_config, "--output-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    expected = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()

    run_dir = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "spkft.tui.cli", "train", "--config", str(run_config),
                                "--output-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # epoch 0 and epoch 1 logged
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "report").exists()

    fresh = spkft("train", "--config", run_config, "--output-dir", run_dir)
    assert fresh.returncode == 1 and "already holds a run" in fresh.stderr
    changed = spkft("train", "--config", run_config, "--output-dir", run_dir, "--resume", "--lr", "0.5")
    assert changed.returncode == 1 and "optim.lr: cannot change when resuming" in changed.stderr
    resumed = spkft("train", "--resume", "--output-dir", run_dir)
    assert resumed.returncode == 0, resumed.stderr
    got = metrics.read_text().splitlines()
    drop_time = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]  # noqa: E731
    assert drop_time(got) == drop_time(expected)


def test_resume_takes_the_run_folder_by_a_relative_or_an_absolute_path(run_config, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(load_config(run_config, {"run.output_dir": run_dir}).to_yaml())
    monkeypatch.chdir(tmp_path)
    for given in ("runs/x", "./runs/../runs/x", str(run_dir)):
        result = runner.invoke(app, ["train", "--resume", "--output-dir", given, "--print-config"])
        assert result.exit_code == 0, result.output
        assert yaml.safe_load(result.stdout)["run"]["output_dir"] in (given, str(Path(given)))
    other = runner.invoke(app, ["train", "--resume", "--output-dir", "runs/x", "--train", "elsewhere.csv"])
    assert other.exit_code == 1 and "data.train: cannot change when resuming" in other.stderr


def test_ddp_with_two_cpu_processes_trains_an_epoch(run_config, tmp_path):
    run_dir = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "spkft.tui.cli", "train", "--config", str(run_config), "--epochs", "1", "--output-dir", str(run_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stderr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    # Each of the two ranks drew its own share of the 6 x 8 crops of an epoch.
    assert lines[1]["train_accuracy"] * 2 * 6 * 8 == pytest.approx(round(lines[1]["train_accuracy"] * 96))
    assert (run_dir / "best.ckpt").is_file() and (run_dir / "report" / "metrics.json").is_file()
