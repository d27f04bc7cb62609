"""ONNX and 3D-Speaker export of tiny checkpoints, and embedding with the exported ONNX model."""

from __future__ import annotations

import json
import os
import stat
import threading

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from spkft.core.checkpoint import embedding_checkpoint, load_model, read_checkpoint
from spkft.core.embedding import Embedder
from spkft.core.errors import CheckpointError, ExportError, InputTooShortError, ModelError
from spkft.core.export import MIN_COSINE, export_3dspeaker, export_onnx, onnx_metadata
from spkft.core.metrics import compute_metrics
from spkft.core.model import MIN_FRAMES
from spkft.core.onnx_model import OnnxEmbedder

VARIANTS = {"eres2netv2_w24s4ep4": "tiny_w24s4ep4_m8.ckpt", "eres2netv2": "tiny_w26s2ep2_m8.ckpt"}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, reference_dir, tmp_path_factory):
    """Each tiny reference checkpoint exported to ONNX."""
    checkpoint = reference_dir / VARIANTS[request.param]
    output = tmp_path_factory.mktemp(request.param) / "model.onnx"
    return request.param, checkpoint, export_onnx(checkpoint, output)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_onnx_file_has_upstream_io_and_sherpa_metadata(exported):
    variant, checkpoint, result = exported
    proto = onnx.load(str(result.output))
    assert [i.name for i in proto.graph.input] == ["feature"] and [o.name for o in proto.graph.output] == ["embedding"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "frames", 80]
    assert proto.opset_import[0].version == result.opset == 17
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert metadata == result.metadata
    assert {k: metadata[k] for k in ("framework", "sample_rate", "output_dim", "normalize_samples",
                                     "feature_normalize_type", "language")} == {
        "framework": "3d-speaker", "sample_rate": "16000", "output_dim": "192", "normalize_samples": "1",
        "feature_normalize_type": "global-mean", "language": "unspecified"}
    assert metadata["spkft_variant"] == variant
    assert json.loads(metadata["spkft_model_args"]) == load_model(checkpoint).config.to_dict()
    # An upstream state_dict carries no evaluation, so no threshold is claimed.
    assert not any(k.startswith(("spkft_threshold", "spkft_eer")) for k in metadata)
    assert result.size_bytes == result.output.stat().st_size
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(result.output.stat().st_mode) == 0o666 & ~umask  # not a temp file's owner-only mode
    assert sorted(p.name for p in result.output.parent.iterdir()) == ["model.onnx"]


def test_export_checked_parity_on_batches_and_lengths(exported):
    parity = exported[2].parity
    assert parity.batch_sizes == (1, 2, 4) and MIN_FRAMES in parity.frame_counts and max(parity.frame_counts) >= 300
    assert MIN_COSINE <= parity.worst_cosine <= parity.mean_cosine <= 1.0 + 1e-6
    assert parity.max_abs_diff < 1e-3


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_batch_and_frames_are_dynamic(exported, engine):
    _, checkpoint, result = exported
    onnx_embedder = OnnxEmbedder.from_file(result.output, threads=1, engine=engine, precision="fp32")
    assert (onnx_embedder.engine.name, onnx_embedder.engine.precision) == (engine, "fp32")
    torch_embedder = Embedder.from_checkpoint(checkpoint)
    for batch, frames in ((3, MIN_FRAMES), (5, 523)):
        features = np.random.default_rng(batch).standard_normal((batch, frames, 80)).astype(np.float32)
        found = onnx_embedder.embed_batch(features)
        assert found.shape == (batch, 192) and found.dtype == np.float32
        assert np.allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-5)
        assert cosines(found, torch_embedder.embed_batch(features)).min() > MIN_COSINE


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_onnx_embedder_embeds_recordings_like_pytorch(exported, speech, tmp_path, fsdd_dir, engine):
    _, checkpoint, result = exported
    data, rate = speech
    long_file = tmp_path / "long.flac"
    sf.write(long_file, np.tile(data, 3)[: 35 * rate], rate)  # over 30 s: embedded in windows
    onnx_embedder = OnnxEmbedder.from_file(result.output, engine=engine, precision="fp32")
    torch_embedder = Embedder.from_checkpoint(checkpoint)
    assert onnx_embedder.embedding_dim == torch_embedder.embedding_dim == 192
    for source in (fsdd_dir / "0_george_0.wav", long_file):
        found, expected = onnx_embedder.embed(source), torch_embedder.embed(source)
        assert found.vector.dtype == np.float32 and found.duration_seconds == expected.duration_seconds
        assert float(found.vector @ expected.vector) > MIN_COSINE


def test_onnx_embedder_refuses_too_short_input_and_is_thread_safe(exported):
    model = OnnxEmbedder.from_file(exported[2].output)
    with pytest.raises(InputTooShortError, match="needs at least 9"):
        model.embed_batch(np.zeros((1, MIN_FRAMES - 1, 80), dtype=np.float32))
    features = np.random.default_rng(0).standard_normal((4, 2, 150, 80)).astype(np.float32)
    results: list = [None] * 4

    def work(i: int) -> None:
        results[i] = model.embed_batch(features[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        assert np.allclose(results[i], model.embed_batch(features[i]), atol=1e-6)


def test_disagreeing_onnx_fails_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    forward = OnnxEmbedder._forward
    monkeypatch.setattr(OnnxEmbedder, "_forward", lambda self, f: forward(self, f) + np.float32(0.5) * np.sign(forward(self, f)))
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportError, match=r"worst cosine 0\.\d+ < 0\.99999.*model\.onnx was not written"):
        export_onnx(tiny_checkpoint, output)
    assert list(output.parent.iterdir()) == []


def test_evaluation_and_threshold_go_into_metadata():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.7, 0.1, 40), rng.normal(0.1, 0.1, 160)]
    metrics = compute_metrics(scores, np.r_[np.ones(40), np.zeros(160)].astype(bool))
    checkpoint = {"epoch": 3, "evaluation": metrics.to_dict() | {"data": "validation"}}
    args = {"embedding_size": 192}
    metadata = onnx_metadata("eres2netv2", args, checkpoint, "English", None)
    assert float(metadata["spkft_threshold"]) == metrics.eer_threshold and metadata["spkft_threshold_source"] == "eer"
    assert float(metadata["spkft_eer"]) == metrics.eer and float(metadata["spkft_min_dcf"]) == metrics.min_dcf
    assert float(metadata["spkft_min_dcf_threshold"]) == metrics.min_dcf_threshold
    assert float(metadata["spkft_threshold_at_far_0.01"]) == metrics.at_far[0.01].threshold
    assert (metadata["spkft_trials"], metadata["spkft_target_trials"]) == ("200", "40")
    assert metadata["spkft_evaluation_data"] == "validation" and metadata["spkft_epoch"] == "3"
    assert metadata["language"] == "English"
    given = onnx_metadata("eres2netv2", args, checkpoint, "English", 0.25)
    assert (given["spkft_threshold"], given["spkft_threshold_source"]) == ("0.25", "given")
    assert given["spkft_eer_threshold"] == metadata["spkft_eer_threshold"]
    with pytest.raises(ExportError, match="evaluation record is incomplete"):
        onnx_metadata("eres2netv2", args, {"evaluation": {"eer": 0.1}}, "English", None)


def test_3dspeaker_format_is_a_plain_state_dict_that_loads_back(tmp_path, reference_dir):
    source = load_model(reference_dir / "tiny_w26s2ep2_m8.ckpt")
    spkft_checkpoint = tmp_path / "run.ckpt"
    torch.save(embedding_checkpoint(source.model, source.variant, epoch=2, head={"w": torch.zeros(2)}), spkft_checkpoint)
    result = export_3dspeaker(spkft_checkpoint, tmp_path / "pretrained_custom.ckpt")
    assert result.format == "3dspeaker" and result.parity.max_abs_diff == 0.0 and result.opset is None
    state = read_checkpoint(result.output)
    assert "format" not in state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert list(state) == list(source.model.state_dict())
    reloaded = load_model(result.output)
    assert reloaded.variant == "eres2netv2" and reloaded.config == source.config
    features = torch.randn(2, 120, 80)
    with torch.no_grad():
        assert torch.equal(reloaded.model(features), source.model(features))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrained_custom.ckpt", "run.ckpt"]


def test_bad_model_files_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    identity = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 192])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 192])],
    ), opset_imports=[onnx.helper.make_opsetid("", 17)])
    wrong = tmp_path / "identity.onnx"
    onnx.save(identity, str(wrong))
    for path, message in ((tmp_path / "absent.onnx", "absent.onnx: no such model file"),
                          (text, "notes.onnx: not a readable ONNX model"),
                          (wrong, "identity.onnx: not a speaker-embedding model: expected input 'feature'")):
        with pytest.raises(ModelError) as caught:
            OnnxEmbedder.from_file(path)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_export_errors(tmp_path, tiny_checkpoint):
    (tmp_path / "bad.ckpt").write_text("nope")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        export_onnx(tmp_path / "bad.ckpt", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="unknown quantization 'int4'"):
        export_onnx(tiny_checkpoint, tmp_path / "m.onnx", quantize="int4")
    with pytest.raises(ExportError, match="ONNX opset 30 is not supported; choose 9 to 20"):
        export_onnx(tiny_checkpoint, tmp_path / "m.onnx", opset=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]
