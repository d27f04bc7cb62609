from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spkft.core import __version__
from spkft.core.embedding import Embedder
from spkft.core.errors import NonFiniteEmbeddingError
from spkft.tui.cli import app
from spkft.tui.cli.output import score_against

runner = CliRunner()


@pytest.fixture(scope="module")
def recordings(fsdd_dir):
    return [fsdd_dir / "0_george_0.wav", fsdd_dir / "1_george_1.wav", fsdd_dir / "0_jackson_0.wav"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_help():
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"spkft {__version__}"
    result = run("--help")
    assert result.exit_code == 0 and "embed" in result.stdout and "verify" in result.stdout


def test_embed_prints_one_json_object_per_file(recordings, tiny_checkpoint):
    result = run("embed", *recordings, "--checkpoint", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(p) for p in recordings]
    expected = Embedder.from_checkpoint(tiny_checkpoint).embed(recordings[0])
    first = np.array(lines[0]["embedding"])
    assert first.shape == (192,) and abs(np.linalg.norm(first) - 1) < 1e-5
    assert np.abs(first - expected.vector).max() < 1e-6
    assert lines[0]["duration_seconds"] == pytest.approx(expected.duration_seconds, abs=1e-4)


def test_embed_writes_an_array(recordings, tiny_checkpoint, tmp_path):
    out = tmp_path / "emb" / "all.npy"
    result = run("embed", *recordings, "-c", tiny_checkpoint, "--output", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    array = np.load(out)
    assert array.shape == (3, 192) and array.dtype == np.float32
    assert np.allclose(np.linalg.norm(array, axis=1), 1, atol=1e-5)


def test_embed_reports_bad_files_and_writes_nothing(recordings, tiny_checkpoint, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    out = tmp_path / "out.npy"
    result = run("embed", recordings[0], tmp_path / "absent.wav", text, "-c", tiny_checkpoint, "-o", out)
    assert result.exit_code == 1
    assert "absent.wav: no such file" in result.stderr
    assert "notes.txt: not a readable audio file" in result.stderr
    assert "out.npy was not written" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    # Without --output the good files are still printed.
    result = run("embed", recordings[0], text, "-c", tiny_checkpoint)
    assert result.exit_code == 1 and len(result.stdout.splitlines()) == 1


def test_verify_scores_and_decides(recordings, tiny_checkpoint):
    result = run("verify", recordings[0], recordings[1], "-c", tiny_checkpoint, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    a, b = (embedder.embed(p).vector for p in recordings[:2])
    assert payload["score"] == pytest.approx(float(a @ b), abs=1e-5)
    assert payload["threshold"] is None and payload["accepted"] is None

    high = run("verify", recordings[0], recordings[1], "-c", tiny_checkpoint, "--threshold", "1.0", "--json")
    assert json.loads(high.stdout)["accepted"] is (payload["score"] >= 1.0)
    text = run("verify", recordings[0], recordings[1], "-c", tiny_checkpoint, "-t", "-1")
    assert text.exit_code == 0 and text.stdout.startswith(f"score {payload['score']:.4f} >= threshold -1.0000: same speaker")


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda r, c, t: ["verify", t / "absent.wav", r[0], "-c", c], "absent.wav: no such file"),
        (lambda r, c, t: ["verify", r[0], t / "notes.txt", "-c", c], "notes.txt: not a readable audio file"),
        (lambda r, c, t: ["verify", r[0], r[1], "-c", t / "notes.txt"], "notes.txt: not a PyTorch checkpoint file"),
        (lambda r, c, t: ["verify", r[0], r[1], "-c", t / "absent.ckpt"], "absent.ckpt: no such checkpoint file"),
        (lambda r, c, t: ["embed", r[0], "-c", c, "--variant", "eres2netv2"], "does not fit ERes2NetV2 variant"),
        (lambda r, c, t: ["embed", r[0], "-c", c, "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_errors_are_one_line_without_traceback(recordings, tiny_checkpoint, tmp_path, make_args, message):
    (tmp_path / "notes.txt").write_text("not audio")
    result = run(*make_args(recordings, tiny_checkpoint, tmp_path))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_unknown_variant_is_a_usage_error(recordings, tiny_checkpoint):
    result = run("embed", recordings[0], "-c", tiny_checkpoint, "--variant", "resnet")
    assert result.exit_code == 2 and "unknown variant 'resnet'" in result.output


def test_console_script_and_debug_traceback(recordings, tmp_path):
    (tmp_path / "bad.ckpt").write_text("nope")
    command = [sys.executable, "-m", "spkft.tui.cli", "verify", str(recordings[0]), str(recordings[1]),
               "-c", str(tmp_path / "bad.ckpt")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 1
    assert plain.stderr.strip() == f"error: {tmp_path / 'bad.ckpt'}: not a PyTorch checkpoint file"
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_a_score_and_its_threshold_print_with_enough_digits_to_differ():
    assert score_against(0.99993, 0.99987) == ("0.99993", "0.99987")
    assert score_against(0.5, 0.25) == ("0.5000", "0.2500")
    assert score_against(0.70000004, 0.7) == ("0.70000004", "0.70000000")
    assert score_against(0.7, 0.7) == ("0.7000", "0.7000")
    assert score_against(0.7, 0.7000000001) == ("0.7000", "0.7000")  # alike to 8 decimals: alike


def test_a_checkpoint_with_nan_weights_is_refused_and_no_nan_is_printed(recordings, tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, tmp_path / "nan.ckpt")
    result = run("embed", recordings[0], "-c", tmp_path / "nan.ckpt")
    assert result.exit_code == 1 and "NaN" not in result.stdout
    assert result.stderr.count("\n") == 1 and "the weights hold NaN or infinite values" in result.stderr


def test_an_embedder_never_returns_a_non_finite_embedding(tiny_checkpoint):
    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    features = torch.randn(1, 200, 80)
    with torch.no_grad():
        next(embedder.model.parameters()).fill_(float("inf"))  # broken after loading, as a damaged export would be
    with pytest.raises(NonFiniteEmbeddingError, match="NaN or infinite embeddings"):
        embedder.embed_batch(features)


def test_a_reader_that_stops_early_ends_the_command_quietly(fsdd_dir, tiny_checkpoint):
    files = [str(p) for p in sorted(fsdd_dir.glob("*.wav"))[:20]]
    spkft = Path(sys.executable).with_name("spkft")
    child = subprocess.Popen([str(spkft), "embed", *files, "--checkpoint", str(tiny_checkpoint)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"SPKFT_DEBUG": ""})
    first = child.stdout.readline()  # as `spkft embed ... | head -1` reads
    child.stdout.close()
    _, stderr = child.communicate(timeout=120)
    assert first.startswith(b'{"path": ')
    assert stderr == b"" and child.returncode == 141
