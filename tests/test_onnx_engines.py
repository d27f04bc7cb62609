"""The two engines that run an exported model: OpenVINO (fp32 and bf16) and onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from spkft.core import onnx_model
from spkft.core.audio import Waveform
from spkft.core.embedding import l2_normalise
from spkft.core.errors import ModelError
from spkft.core.export import MIN_COSINE, export_onnx
from spkft.core.model import MIN_FRAMES
from spkft.core.onnx_model import OnnxEmbedder, cpu_has_bf16
from spkft.serve.server import ServerConfig, ServerError
from spkft.tui.cli import app

# bf16 keeps 8 bits of mantissa; with fp32 accumulation the embeddings stay this close to fp32's.
MIN_BF16_COSINE = 0.9999
needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16 (AVX512_BF16 or AMX)")


@pytest.fixture(scope="module")
def model_file(tiny_checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("engines") / "tiny.onnx"
    export_onnx(tiny_checkpoint, output, threshold=0.4)
    return output


@pytest.fixture(scope="module")
def reference(model_file) -> OnnxEmbedder:
    return OnnxEmbedder.from_file(model_file, engine="onnxruntime")


@pytest.fixture(scope="module")
def recordings(librispeech_dir) -> list[np.ndarray]:
    """Fbank-ready audio of six different speakers, 1 to 4 s long."""
    paths = sorted(librispeech_dir.glob("*.flac"))[:6]
    return [sf.read(path, dtype="float32", frames=16000 * (1 + i % 4))[0] for i, path in enumerate(paths)]


def features(batch: int, frames: int) -> np.ndarray:
    return np.random.default_rng(frames).standard_normal((batch, frames, 80)).astype(np.float32)


def test_openvino_reads_the_model_like_onnxruntime(model_file, reference):
    model = OnnxEmbedder.from_file(model_file, engine="openvino", precision="fp32")
    assert model.engine.name == "openvino"
    assert model.metadata == reference.metadata and model.metadata["framework"] == "3d-speaker"
    assert (model.embedding_dim, model.variant, model.default_threshold) == (192, "eres2netv2_w24s4ep4", 0.4)


@pytest.mark.parametrize("parallel_calls", [1, 2])
def test_openvino_fp32_agrees_with_onnxruntime(model_file, reference, parallel_calls):
    model = OnnxEmbedder.from_file(model_file, threads=1, engine="openvino", precision="fp32",
                                   parallel_calls=parallel_calls)
    assert int(model.engine.compiled.get_property("NUM_STREAMS")) == parallel_calls
    for batch, frames in ((1, MIN_FRAMES), (3, 137), (2, 400)):
        found, expected = model.embed_batch(features(batch, frames)), reference.embed_batch(features(batch, frames))
        assert np.sum(found * expected, axis=1).min() > MIN_COSINE


@needs_bf16
def test_bf16_is_close_to_fp32_and_keeps_speakers_apart(model_file, reference, recordings):
    model = OnnxEmbedder.from_file(model_file, engine="openvino", precision="bf16")
    assert (model.engine.name, model.engine.precision) == ("openvino", "bf16")
    waves = [Waveform(r, 16000, 1) for r in recordings]
    bf16 = np.stack([model.embed_waveform(w).vector for w in waves])
    fp32 = np.stack([reference.embed_waveform(w).vector for w in waves])
    agreement = np.sum(bf16 * fp32, axis=1)
    assert agreement.min() > MIN_BF16_COSINE
    assert np.abs(bf16 - fp32).max() > 1e-6  # it really computed in bfloat16
    # Scores between recordings move by no more than the agreement allows.
    assert np.abs(bf16 @ bf16.T - fp32 @ fp32.T).max() < 2e-3


def test_auto_is_openvino_in_bf16_exactly_where_the_cpu_has_it(model_file):
    model = OnnxEmbedder.from_file(model_file)
    assert model.engine.name == "openvino"
    assert model.engine.precision == ("bf16" if cpu_has_bf16() else "fp32")


def test_auto_falls_back_to_onnxruntime_for_a_graph_openvino_cannot_compile(model_file, reference, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Exception from src/inference: unsupported operation\nmore detail")

    monkeypatch.setattr(onnx_model.ov.Core, "compile_model", refuse)
    model = OnnxEmbedder.from_file(model_file)
    assert (model.engine.name, model.engine.precision) == ("onnxruntime", "fp32")
    np.testing.assert_array_equal(model.embed_batch(features(1, 50)), reference.embed_batch(features(1, 50)))
    with pytest.raises(ModelError, match=r"tiny\.onnx: OpenVINO cannot run this model \(Exception from src/inference: "
                                         r"unsupported operation\)$"):
        OnnxEmbedder.from_file(model_file, engine="openvino")


@pytest.mark.parametrize(
    "engine, precision, message",
    [
        ("onnxruntime", "bf16", "onnxruntime runs this model in fp32 or int8 only; use the openvino engine for bf16"),
        ("tensorrt", "auto", "unknown engine 'tensorrt'; choose one of: auto, openvino, onnxruntime"),
        ("auto", "fp16", "unknown precision 'fp16'; choose one of: auto, fp32, bf16, int8"),
    ],
)
def test_impossible_engine_choices_are_clear_errors(model_file, engine, precision, message):
    with pytest.raises(ModelError, match=f"^{message}$"):
        OnnxEmbedder.from_file(model_file, engine=engine, precision=precision)


def test_bf16_on_a_cpu_without_it_is_refused_and_auto_is_fp32(model_file, monkeypatch):
    monkeypatch.setattr(onnx_model, "cpu_has_bf16", lambda core=None: False)
    with pytest.raises(ModelError, match=r"bf16 needs a CPU that computes bfloat16 natively .* use precision fp32$"):
        OnnxEmbedder.from_file(model_file, precision="bf16")
    assert OnnxEmbedder.from_file(model_file).engine.precision == "fp32"


def test_server_config_refuses_bf16_in_onnxruntime(model_file):
    with pytest.raises(ServerError, match="onnxruntime runs this model in fp32 or int8 only; use the openvino engine for bf16"):
        ServerConfig(model=model_file, engine="onnxruntime", precision="bf16").check()


def test_cli_engine_and_precision(model_file, tiny_checkpoint, fsdd_dir):
    runner = CliRunner()
    recording = str(fsdd_dir / "0_george_0.wav")
    vectors = {}
    for engine in ("onnxruntime", "openvino"):
        result = runner.invoke(app, ["embed", recording, "--model", str(model_file), "--engine", engine, "--precision", "fp32"])
        assert result.exit_code == 0, result.output
        vectors[engine] = np.array(json.loads(result.stdout)["embedding"])
    assert float(l2_normalise(vectors["onnxruntime"]) @ l2_normalise(vectors["openvino"])) > MIN_COSINE

    refused = runner.invoke(app, ["embed", recording, "-m", str(model_file), "--engine", "onnxruntime", "--precision", "bf16"])
    assert refused.exit_code == 1
    assert refused.stderr.strip() == "error: onnxruntime runs this model in fp32 or int8 only; use the openvino engine for bf16"
    misplaced = runner.invoke(app, ["verify", recording, recording, "-c", str(tiny_checkpoint), "--engine", "openvino"])
    assert misplaced.exit_code == 2 and "apply to --model only" in misplaced.stderr
    unknown = runner.invoke(app, ["serve", "-m", str(model_file), "--precision", "fp8"])
    assert unknown.exit_code == 2 and "'fp8' is not one of 'auto', 'fp32', 'bf16'" in unknown.stderr
