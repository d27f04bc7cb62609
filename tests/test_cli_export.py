"""``spkft export``, and ``spkft embed`` / ``spkft verify`` with an exported ``--model``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spkft.core.checkpoint import embedding_checkpoint, load_model
from spkft.core.metrics import compute_metrics
from spkft.core.onnx_model import OnnxEmbedder
from spkft.tui.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def recordings(fsdd_dir):
    return [fsdd_dir / "0_george_0.wav", fsdd_dir / "1_george_1.wav", fsdd_dir / "0_jackson_0.wav"]


@pytest.fixture(scope="module")
def evaluated_checkpoint(tiny_checkpoint, tmp_path_factory):
    """An spkft checkpoint of the tiny model carrying a validation evaluation, as training saves it."""
    loaded = load_model(tiny_checkpoint)
    rng = np.random.default_rng(0)
    metrics = compute_metrics(np.r_[rng.normal(0.7, 0.1, 30), rng.normal(0.2, 0.1, 90)],
                              np.r_[np.ones(30), np.zeros(90)].astype(bool))
    path = tmp_path_factory.mktemp("run") / "best.ckpt"
    torch.save(embedding_checkpoint(loaded.model, loaded.variant, epoch=4,
                                    evaluation=metrics.to_dict() | {"data": "validation"}), path)
    return path, metrics


@pytest.fixture(scope="module")
def exported(evaluated_checkpoint, tmp_path_factory):
    """``spkft export`` of the evaluated checkpoint: its output and the ONNX file."""
    output = tmp_path_factory.mktemp("onnx") / "speaker.onnx"
    result = run("export", "--checkpoint", evaluated_checkpoint[0], "--output", output, "--language", "English")
    assert result.exit_code == 0, result.output
    return result.stdout, output


def test_export_prints_parity_size_and_metadata(exported, evaluated_checkpoint):
    stdout, output = exported
    metrics = evaluated_checkpoint[1]
    lines = stdout.splitlines()
    assert lines[0].startswith(f"wrote {output} (ONNX opset 17, ")
    assert lines[1].startswith("parity, onnxruntime vs PyTorch: worst cosine 0.99999")
    assert "batch sizes 1, 2, 4; lengths 9, 137, 400 frames" in lines[1]
    assert "  framework = 3d-speaker" in lines and "  language = English" in lines
    assert f"  spkft_threshold = {metrics.eer_threshold!r}" in lines and "  spkft_threshold_source = eer" in lines
    model = OnnxEmbedder.from_file(output)
    assert model.default_threshold == metrics.eer_threshold and model.variant == "eres2netv2_w24s4ep4"
    assert model.metadata["spkft_epoch"] == "4"


def test_export_json_and_3dspeaker_format(tiny_checkpoint, tmp_path):
    result = run("export", "-c", tiny_checkpoint, "-o", tmp_path / "pretrained.ckpt", "--format", "3dspeaker", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["format"] == "3dspeaker" and record["parity"]["max_abs_diff"] == 0.0
    assert record["size_bytes"] == (tmp_path / "pretrained.ckpt").stat().st_size
    assert load_model(tmp_path / "pretrained.ckpt").variant == "eres2netv2_w24s4ep4"


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--format", "3dspeaker", "--quantize", "int8", "--opset", "18"], 2, "--opset, --quantize only apply to --format onnx"),
        (["--quantize", "int4"], 2, "'int4' is not one of 'int8'"),
        (["--variant", "resnet"], 2, "unknown variant 'resnet'"),
        (["--opset", "21"], 2, "Invalid value for '--opset'"),
    ],
)
def test_export_usage_errors(tiny_checkpoint, tmp_path, extra, code, message):
    result = run("export", "-c", tiny_checkpoint, "-o", tmp_path / "m.onnx", *extra)
    assert result.exit_code == code and message in result.output
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_bad_checkpoint_is_one_line(tmp_path):
    (tmp_path / "bad.ckpt").write_text("nope")
    result = run("export", "-c", tmp_path / "bad.ckpt", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and result.stderr == f"error: {tmp_path / 'bad.ckpt'}: not a PyTorch checkpoint file\n"


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_embed_with_the_onnx_model_equals_the_checkpoint(exported, evaluated_checkpoint, recordings, engine):
    from_model = run("embed", *recordings, "--model", exported[1], "--engine", engine, "--precision", "fp32")
    from_checkpoint = run("embed", *recordings, "--checkpoint", evaluated_checkpoint[0])
    assert from_model.exit_code == 0 and from_checkpoint.exit_code == 0, from_model.output + from_checkpoint.output
    for a, b in zip(from_model.stdout.splitlines(), from_checkpoint.stdout.splitlines(), strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a["path"] == b["path"] and a["duration_seconds"] == b["duration_seconds"]
        assert float(np.dot(a["embedding"], b["embedding"])) > 0.99999


def test_verify_with_the_model_uses_its_calibrated_threshold(exported, evaluated_checkpoint, recordings):
    threshold = evaluated_checkpoint[1].eer_threshold
    result = run("verify", recordings[0], recordings[1], "-m", exported[1], "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["threshold"] == threshold and payload["threshold_source"] == "model"
    assert payload["accepted"] is (payload["score"] >= threshold)
    text = run("verify", recordings[0], recordings[1], "-m", exported[1])
    assert text.stdout.rstrip().endswith("(the threshold in the model's metadata)")
    given = json.loads(run("verify", recordings[0], recordings[1], "-m", exported[1], "-t", "-1", "--json").stdout)
    assert (given["threshold"], given["threshold_source"], given["accepted"]) == (-1.0, "option", True)
    # A checkpoint has no calibrated threshold: without --threshold there is only a score.
    plain = json.loads(run("verify", recordings[0], recordings[1], "-c", evaluated_checkpoint[0], "--json").stdout)
    # The same score from PyTorch and the exported model, up to float32 rounding of two engines (the
    # export's parity contract: cosine of at least 0.99999 between their embeddings).
    assert plain["threshold"] is None and plain["score"] == pytest.approx(payload["score"], abs=5e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "give exactly one of --checkpoint (PyTorch weights) and --model"),
        (["-c", "CKPT", "-m", "MODEL"], "give exactly one of --checkpoint (PyTorch weights) and --model"),
        (["-m", "MODEL", "--variant", "eres2netv2"], "applies to --checkpoint only"),
        (["-m", "MODEL", "--device", "cuda"], "--model runs on the CPU"),
    ],
)
def test_embed_model_usage_errors(exported, tiny_checkpoint, recordings, extra, message):
    args = [{"CKPT": tiny_checkpoint, "MODEL": exported[1]}.get(a, a) for a in extra]
    result = run("embed", recordings[0], *args)
    assert result.exit_code == 2 and message in result.output


def test_verify_with_a_bad_model_file_is_one_line(recordings, tmp_path):
    (tmp_path / "bad.onnx").write_text("nope")
    result = run("verify", recordings[0], recordings[1], "--model", tmp_path / "bad.onnx")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'bad.onnx'}: not a readable ONNX model")
