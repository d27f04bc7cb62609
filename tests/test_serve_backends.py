"""Serving a model that carries a PLDA scorer and a calibration: Verify's LLR, probability and Bayes
decision, Identify by PLDA, and the fields absent for a model without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spkft.core.adapt import plda_checkpoint
from spkft.core.calibrate import calibrate_checkpoint
from spkft.core.calibration import bayes_threshold, probability
from spkft.core.checkpoint import load_model
from spkft.core.data import make_trials, scan
from spkft.core.export import export_onnx
from spkft.core.onnx_model import OnnxEmbedder
from spkft.serve.client import SpeakerClient, ServiceError
from spkft.serve.server import ServerConfig, create_server

from data_helpers import write_fsdd_list

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(fsdd_dir, tiny_checkpoint, tmp_path_factory):
    """(ONNX with PLDA and calibration, the checkpoint it came from, plain ONNX of the bare checkpoint)."""
    folder = tmp_path_factory.mktemp("backends")
    checkpoint = folder / "plda.ckpt"
    train = write_fsdd_list(folder / "train.csv", fsdd_dir, SPEAKERS, range(5), (0, 1))
    plda_checkpoint(tiny_checkpoint, train, output=checkpoint)
    heldout = scan(write_fsdd_list(folder / "heldout.csv", fsdd_dir, SPEAKERS, range(10), (40, 41))).recordings
    calibrate_checkpoint(checkpoint, heldout, make_trials(heldout, seed=0, max_target=400, nontarget_per_target=2))
    exported, plain = folder / "plda.onnx", folder / "plain.onnx"
    export_onnx(checkpoint, exported)
    export_onnx(tiny_checkpoint, plain)
    return exported, checkpoint, plain


def serve(model: Path, tmp_path: Path, **settings):
    config = ServerConfig(model=model, port=0, enroll_db=tmp_path / f"{model.stem}.sqlite", engine="onnxruntime",
                          precision="fp32", **settings)
    server = create_server(config)
    server.start()
    server.load(OnnxEmbedder.from_file(model, engine="onnxruntime", precision="fp32", threads=1))
    return server


def test_verify_answers_with_a_calibrated_llr_and_decides_by_bayes(models, fsdd_dir, tmp_path):
    exported, checkpoint, _ = models
    loaded = load_model(checkpoint)
    embedder = OnnxEmbedder.from_file(exported, engine="onnxruntime", precision="fp32", threads=1)
    a, b = fsdd_dir / "3_lucas_45.wav", fsdd_dir / "4_lucas_46.wav"
    first, second = embedder.embed(a), embedder.embed(b)
    expected_score = float(loaded.plda.llr(first.vector[None], second.vector[None])[0])
    expected_llr = float(loaded.calibration.llr(expected_score, first.duration_seconds, second.duration_seconds))
    server = serve(exported, tmp_path, p_target=0.05)
    try:
        with SpeakerClient(server.address) as client:
            info = client.info()
            answer = client.verify(b, reference=a)
            at_half = client.verify(b, reference=a, p_target=0.5)
            given = client.verify(b, reference=a, threshold=expected_score + 1.0)
            with pytest.raises(ServiceError, match="p_target"):
                client.verify(b, reference=a, p_target=1.0)
    finally:
        server.drain(0)
    assert (info.scoring, info.calibrated, info.p_target) == ("plda", True, pytest.approx(0.05))
    assert answer.score == pytest.approx(expected_score, rel=1e-5, abs=1e-3)  # float32 on the wire
    assert answer.llr == pytest.approx(expected_llr, rel=1e-5, abs=1e-3)
    assert answer.probability == pytest.approx(probability(expected_llr, 0.05), abs=1e-4)
    assert answer.llr_threshold == pytest.approx(bayes_threshold(0.05))
    assert answer.accepted == (answer.llr >= answer.llr_threshold) and not answer.HasField("threshold")
    assert at_half.probability == pytest.approx(probability(expected_llr, 0.5), abs=1e-4)
    assert at_half.llr_threshold == pytest.approx(0.0)
    # A score threshold in the request wins over the Bayes decision.
    assert not given.HasField("llr_threshold") and given.threshold == pytest.approx(expected_score + 1.0)
    assert given.accepted is False


def test_identify_ranks_by_plda_and_adds_the_llr(models, fsdd_dir, tmp_path):
    exported, checkpoint, _ = models
    loaded = load_model(checkpoint)
    embedder = OnnxEmbedder.from_file(exported, engine="onnxruntime", precision="fp32", threads=1)
    enrolled = {s: [fsdd_dir / f"{d}_{s}_47.wav" for d in range(3)] for s in SPEAKERS}
    query = fsdd_dir / "8_nicolas_48.wav"
    server = serve(exported, tmp_path)
    try:
        with SpeakerClient(server.address) as client:
            for speaker, files in enrolled.items():
                client.enroll(speaker, files)
            matches = client.identify(query, top_k=6).matches
    finally:
        server.drain(0)
    means = {}
    for speaker, files in enrolled.items():
        vectors = np.stack([embedder.embed(f).vector for f in files])
        total = vectors.sum(axis=0)
        # The index keeps enrolled embeddings in float16: score what it holds.
        means[speaker] = (total / np.linalg.norm(total)).astype(np.float16).astype(np.float32)
    q = embedder.embed(query)
    brute = {s: float(loaded.plda.llr(v[None], q.vector[None])[0]) for s, v in means.items()}
    assert [m.speaker_id for m in matches] == sorted(brute, key=brute.get, reverse=True)
    for match in matches:
        assert match.score == pytest.approx(brute[match.speaker_id], rel=1e-4, abs=0.02)
        assert match.llr == pytest.approx(float(loaded.calibration.llr(match.score, None, q.duration_seconds)),
                                          rel=1e-5, abs=1e-4)


def test_a_model_without_them_answers_as_before(models, fsdd_dir, tmp_path):
    plain = models[2]
    server = serve(plain, tmp_path)
    try:
        with SpeakerClient(server.address) as client:
            info = client.info()
            answer = client.verify(fsdd_dir / "4_lucas_46.wav", reference=fsdd_dir / "3_lucas_45.wav", threshold=0.5)
            client.enroll("lucas", [fsdd_dir / "3_lucas_45.wav"])
            match = client.identify(fsdd_dir / "4_lucas_46.wav").matches[0]
            with pytest.raises(ServiceError, match=r"\[-1, 1\]"):
                client.verify(fsdd_dir / "4_lucas_46.wav", reference=fsdd_dir / "3_lucas_45.wav", threshold=2.0)
    finally:
        server.drain(0)
    assert (info.scoring, info.calibrated) == ("cosine", False)
    assert -1 <= answer.score <= 1 and answer.threshold == pytest.approx(0.5)
    for field in ("llr", "probability", "llr_threshold"):
        assert not answer.HasField(field)
    assert not match.HasField("llr")
