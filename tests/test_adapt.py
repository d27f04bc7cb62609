"""``spkft adapt`` end to end on real speech with the tiny reference checkpoint, and everywhere it applies:
checkpoints, Embedder, eval, embed, export (ONNX and 3D-Speaker), serve, and training from an adapted init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spkft.core.adapt import adapt_checkpoint
from spkft.core.adaptation import DEFAULT_SHRINKAGE, fit_adaptation
from spkft.core.checkpoint import embedding_checkpoint, load_model, read_checkpoint
from spkft.core.data import SourceKind, scan
from spkft.core.embedding import Embedder
from spkft.core.errors import DataError
from spkft.core.evaluate import embed_recordings
from spkft.core.export import MIN_COSINE, export_onnx
from spkft.core.model import build_model
from spkft.core.onnx_model import OnnxEmbedder
from spkft.core.train import Trainer, load_config
from spkft.serve.client import SpeakerClient
from spkft.serve.server import ServerConfig, create_server
from spkft.tui.cli import app
from spkft.tui.wizard.steps.model import model_info

from data_helpers import write_closed_set

runner = CliRunner()
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_list(path: Path, fsdd_dir: Path, speakers, digits, takes) -> Path:
    rows = [f"{fsdd_dir / f'{d}_{s}_{t}.wav'},{s}" for s in speakers for d in digits for t in takes]
    path.write_text("path,speaker\n" + "\n".join(rows) + "\n")
    return path


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def domain(fsdd_dir, tmp_path_factory) -> Path:
    """6 speakers x 10 recordings: 54 within-speaker degrees of freedom, enough for wccn."""
    return write_list(tmp_path_factory.mktemp("domain") / "domain.csv", fsdd_dir, SPEAKERS, range(5), (0, 1))


@pytest.fixture(scope="module")
def unlabelled(fsdd_dir, tmp_path_factory) -> Path:
    """A flat folder of 12 recordings with no speaker labels."""
    folder = tmp_path_factory.mktemp("calls")
    for path in sorted(fsdd_dir.glob("*_theo_3*.wav"))[:12]:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def bare_embeddings(domain, tiny_checkpoint) -> tuple[np.ndarray, list[str]]:
    """The domain's embeddings by the unadapted network, and their speakers, in the scan's order."""
    recordings = scan(domain).recordings
    embeddings = embed_recordings(Embedder.from_checkpoint(tiny_checkpoint), recordings)
    return np.stack([embeddings[r.utt_id] for r in recordings]), [r.speaker for r in recordings]


@pytest.fixture(scope="module")
def adapted(domain, tiny_checkpoint, tmp_path_factory):
    """``spkft adapt`` of the tiny checkpoint on the domain: the command's result and the written file."""
    output = tmp_path_factory.mktemp("adapted") / "adapted.ckpt"
    result = run("adapt", "--checkpoint", tiny_checkpoint, "--data", domain, "--output", output)
    return result, output


@pytest.fixture(scope="module")
def exported(adapted, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("onnx") / "adapted.onnx"
    export_onnx(adapted[1], output)
    return output


@pytest.fixture(scope="module")
def clip(fsdd_dir) -> Path:
    return fsdd_dir / "7_lucas_40.wav"  # not among the recordings the adaptation was fitted on


# ---------------------------------------------------------------- fitting and the checkpoint


def test_adapt_prints_what_it_fitted_why_and_where(adapted):
    result, output = adapted
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"fitted wccn on 60 recordings of 6 speakers (labels: wccn suppresses "
                             f"within-speaker variation); wrote {output}\n")


def test_the_stored_adaptation_is_fitted_on_unadapted_embeddings(adapted, bare_embeddings, tiny_checkpoint):
    loaded = load_model(adapted[1])
    expected, _ = fit_adaptation(*bare_embeddings, method="wccn")
    assert loaded.adaptation.method == "wccn" and loaded.adaptation.shrinkage == DEFAULT_SHRINKAGE
    assert (loaded.adaptation.recordings, loaded.adaptation.speakers) == (60, 6)
    assert loaded.adaptation.source == "csv:domain0/domain.csv"
    np.testing.assert_allclose(loaded.adaptation.mean, expected.mean, atol=1e-6)
    np.testing.assert_allclose(loaded.adaptation.transform, expected.transform, atol=1e-4)
    # The network is untouched, and an upstream file became a self-describing spkft checkpoint.
    original = load_model(tiny_checkpoint).model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.model.state_dict().items())
    stored = read_checkpoint(adapted[1])  # weights_only: tensors and plain values only
    assert stored["format"] == "spkft" and stored["adaptation"]["method"] == "wccn"
    assert stored["adaptation"]["transform"].dtype == torch.float32


def test_refitting_replaces_the_adaptation_and_fits_on_the_bare_network(adapted, domain, bare_embeddings, tmp_path):
    refit = tmp_path / "refit.ckpt"
    result = adapt_checkpoint(adapted[1], domain, output=refit, method="whiten", unlabelled=True)
    assert (result.replaced, result.adaptation.speakers, result.reason) == (
        "wccn", None, "asked for: whiten evens out the domain's variation across directions")
    expected, _ = fit_adaptation(bare_embeddings[0], None, method="whiten")
    stored = load_model(refit).adaptation
    assert stored.method == "whiten" and stored.speakers is None
    np.testing.assert_allclose(stored.transform, expected.transform, atol=1e-4)
    assert load_model(adapted[1]).adaptation.method == "wccn"  # --output left the input alone


def test_in_place_by_default_and_stale_evaluation_dropped(adapted, domain, tmp_path):
    checkpoint = tmp_path / "best.ckpt"
    loaded = load_model(adapted[1])
    torch.save(embedding_checkpoint(loaded.model, loaded.variant, epoch=3, evaluation={"eer": 0.2},
                                    head={"weight": torch.zeros(2, 192)}), checkpoint)
    result = run("adapt", "-c", checkpoint, "-d", domain, "--method", "center")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"wrote {checkpoint}\n")
    assert "validation figures were measured without adaptation" in result.stderr
    stored = read_checkpoint(checkpoint)
    assert stored["adaptation"]["method"] == "center" and "evaluation" not in stored
    assert stored["epoch"] == 3 and torch.equal(stored["head"]["weight"], torch.zeros(2, 192))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt"]  # no temporary file left


def test_an_unlabelled_folder_is_a_data_source_only_where_labels_are_optional(unlabelled, tiny_checkpoint, tmp_path):
    with pytest.raises(DataError, match="no speaker labels"):
        scan(unlabelled)
    report = scan(unlabelled, allow_unlabelled=True)
    assert report.kind is SourceKind.AUDIO_FOLDER and not report.labelled
    assert len(report.recordings) == 12 and report.speakers == () and report.recordings_per_speaker == {}
    output = tmp_path / "calls.ckpt"
    result = run("adapt", "-c", tiny_checkpoint, "-d", unlabelled, "-o", output)
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"fitted center on 12 recordings (too few recordings for a covariance (12, 50 needed): "
                             f"center removes the domain's mean embedding); wrote {output}\n")
    assert load_model(output).adaptation.speakers is None


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ERROR_CASES = {
    "missing checkpoint": (lambda d, fsdd, flat: ["-c", d / "absent.ckpt"], "absent.ckpt: no such checkpoint file"),
    "missing data": (lambda d, fsdd, flat: ["-d", d / "nowhere"], "nowhere: no such file or folder"),
    "no usable recordings": (
        lambda d, fsdd, flat: ["-d", write_text(d / "gone.csv", f"path,speaker\n{d / 'x.wav'},a\n")],
        "gone.csv: no usable recordings: e.g. gone.csv:2: no such file",
    ),
    "whiten on too few recordings": (
        lambda d, fsdd, flat: ["-d", flat, "--method", "whiten"],
        "cannot fit whiten: 12 recordings, at least 50 needed to estimate a covariance",
    ),
    "wccn on too few recordings": (
        lambda d, fsdd, flat: ["-d", write_list(d / "few.csv", fsdd, SPEAKERS[:3], (0, 1), (0, 1)),
                               "--method", "wccn"],
        "cannot fit wccn: 9 within-speaker degrees of freedom",
    ),
    "wccn without labels": (
        lambda d, fsdd, flat: ["-d", flat, "--method", "wccn"], "cannot fit wccn: no speaker labels",
    ),
    "upstream file in place": (
        lambda d, fsdd, flat: ["-o", None],
        "is a 3D-Speaker state_dict, which cannot hold an adaptation; give an output file",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_bad_input_is_one_line_and_exit_1(case, tmp_path, fsdd_dir, unlabelled, domain, tiny_checkpoint):
    build, expected = ERROR_CASES[case]
    overrides = build(tmp_path, fsdd_dir, unlabelled)
    args = {"-c": tiny_checkpoint, "-d": domain, "-o": tmp_path / "out.ckpt"} | dict(zip(overrides[::2], overrides[1::2]))
    result = run("adapt", *[x for pair in args.items() if pair[1] is not None for x in pair])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert not (tmp_path / "out.ckpt").exists()


def test_wccn_with_unlabelled_is_a_usage_error(domain, tiny_checkpoint, tmp_path):
    result = run("adapt", "-c", tiny_checkpoint, "-d", domain, "--unlabelled", "--method", "wccn", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "wccn needs speaker labels, which --unlabelled ignores" in result.stderr


# ---------------------------------------------------------------- where it applies


def test_embedder_from_checkpoint_applies_it(adapted, tiny_checkpoint, clip):
    loaded = load_model(adapted[1])
    embedder = Embedder.from_checkpoint(adapted[1])
    assert embedder.adaptation.method == "wccn"
    bare = Embedder.from_checkpoint(tiny_checkpoint).embed(clip).vector
    found = embedder.embed(clip).vector
    np.testing.assert_allclose(found, loaded.adaptation.apply(bare), atol=1e-5)
    assert cosine(found, bare) < 0.99  # the adaptation changed the embedding, not just its rounding
    unadapted = Embedder.from_checkpoint(adapted[1], adapted=False)
    assert unadapted.adaptation is None
    np.testing.assert_allclose(unadapted.embed(clip).vector, bare, atol=1e-6)
    assert loaded.model.__class__.__name__ == "ERes2NetV2"  # training and state_dict users get the bare network


def test_eval_measures_the_adapted_model(adapted, fsdd_dir, tmp_path):
    heldout = write_list(tmp_path / "heldout.csv", fsdd_dir, SPEAKERS[:4], (5, 6, 7), (2,))
    result = run("eval", "-c", adapted[1], "-d", heldout, "-o", tmp_path / "report")
    assert result.exit_code == 0, result.output
    # The table's title wraps at spaces to the table's width.
    assert f"{adapted[1]} (with its wccn adaptation) on {heldout}" in " ".join(result.stdout.split())
    scores = [line.split("\t") for line in (tmp_path / "report" / "scores.tsv").read_text().splitlines()[1:]]
    recordings = scan(heldout).recordings
    adapted_vectors = embed_recordings(Embedder.from_checkpoint(adapted[1]), recordings)
    bare_vectors = embed_recordings(Embedder.from_checkpoint(adapted[1], adapted=False), recordings)
    enrol, test, _, score = scores[0]
    assert float(score) == pytest.approx(float(adapted_vectors[enrol] @ adapted_vectors[test]), abs=1e-5)
    assert abs(float(score) - float(bare_vectors[enrol] @ bare_vectors[test])) > 1e-3


def test_export_puts_the_adaptation_in_the_graph_and_metadata(adapted, exported, clip):
    onnx_embedder = OnnxEmbedder.from_file(exported, engine="onnxruntime", threads=1)
    metadata = onnx_embedder.metadata
    assert {k: v for k, v in metadata.items() if k.startswith("spkft_adaptation")} == {
        "spkft_adaptation": "wccn", "spkft_adaptation_recordings": "60", "spkft_adaptation_speakers": "6",
        "spkft_adaptation_shrinkage": repr(DEFAULT_SHRINKAGE), "spkft_adaptation_source": "csv:domain0/domain.csv"}
    assert metadata["output_dim"] == "192" and onnx_embedder.embedding_dim == 192
    expected = Embedder.from_checkpoint(adapted[1]).embed(clip).vector
    assert cosine(onnx_embedder.embed(clip).vector, expected) >= MIN_COSINE
    features = np.random.default_rng(0).standard_normal((2, 150, 80)).astype(np.float32)
    np.testing.assert_allclose(onnx_embedder.embed_batch(features),
                               Embedder.from_checkpoint(adapted[1]).embed_batch(features), atol=1e-5)


def test_embed_with_the_export_equals_embed_with_the_adapted_checkpoint(adapted, exported, clip, fsdd_dir):
    files = [clip, fsdd_dir / "3_nicolas_45.wav"]
    from_model = run("embed", *files, "--model", exported, "--engine", "onnxruntime", "--precision", "fp32")
    from_checkpoint = run("embed", *files, "--checkpoint", adapted[1])
    assert from_model.exit_code == 0 and from_checkpoint.exit_code == 0, from_model.output + from_checkpoint.output
    for a, b in zip(from_model.stdout.splitlines(), from_checkpoint.stdout.splitlines()):
        assert cosine(np.array(json.loads(a)["embedding"]), np.array(json.loads(b)["embedding"])) >= MIN_COSINE
    verify = run("verify", *files, "--checkpoint", adapted[1], "--json")
    vectors = [np.array(json.loads(line)["embedding"]) for line in from_checkpoint.stdout.splitlines()]
    assert json.loads(verify.stdout)["score"] == pytest.approx(cosine(*vectors), abs=1e-5)


def test_3dspeaker_export_writes_the_bare_network_with_a_warning(adapted, tiny_checkpoint, tmp_path):
    output = tmp_path / "pretrained_adapted.ckpt"
    result = run("export", "-c", adapted[1], "-o", output, "--format", "3dspeaker")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"warning: {adapted[1]}'s wccn adaptation is not in the 3D-Speaker format (a bare state_dict): "
        "these weights embed without it; export --format onnx to keep it"]
    written, original = torch.load(output, weights_only=True), torch.load(tiny_checkpoint, weights_only=True)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in written)


def test_served_embedding_equals_spkft_embed_of_the_adapted_checkpoint(adapted, exported, clip, tmp_path):
    config = ServerConfig(model=exported, port=0, enroll_db=tmp_path / "e.sqlite", engine="onnxruntime",
                          precision="fp32")
    server = create_server(config)
    server.start()
    try:
        server.load(OnnxEmbedder.from_file(exported, engine="onnxruntime", precision="fp32", threads=1))
        with SpeakerClient(server.address) as client:
            served = np.array(client.embed(clip).embedding)
            info = client.info()
    finally:
        server.drain(0)
    local = run("embed", clip, "--checkpoint", adapted[1])
    assert local.exit_code == 0, local.output
    assert cosine(served, np.array(json.loads(local.stdout)["embedding"])) >= MIN_COSINE
    assert info.metadata["spkft_adaptation"] == "wccn" and info.metadata["spkft_adaptation_speakers"] == "6"
    assert info.embedding_dim == 192


# ---------------------------------------------------------------- fine-tuning from an adapted checkpoint


def test_fine_tuning_from_an_adapted_checkpoint_leaves_the_adaptation_behind(fsdd_dir, tmp_path):
    args = {"m_channels": 8, "num_blocks": [1, 1, 1, 1]}
    torch.manual_seed(0)
    model = build_model("eres2netv2", **args)
    rng = np.random.default_rng(0)
    adaptation, _ = fit_adaptation(rng.standard_normal((20, 192)), None, method="center")
    init = tmp_path / "adapted-init.ckpt"
    torch.save(embedding_checkpoint(model, "eres2netv2", adaptation=adaptation.to_dict()), init)
    assert load_model(init).adaptation is not None

    train, val = write_closed_set(fsdd_dir, tmp_path, train_takes=2, val_takes=(40,), val_digits=3)
    config = load_config(None, {
        "data.train": train, "data.val": val, "model.init": init, "model.variant": "eres2netv2",
        "run.epochs": 1, "run.batch_size": 8, "run.steps_per_epoch": 1, "run.patience": None,
        "run.output_dir": tmp_path / "run", "run.precision": "fp32", "run.channels_last": False,
        "augment.crop_seconds": 0.5,
    })
    finished = Trainer(config).run()
    assert finished.reason == "completed"
    for name in ("last.ckpt", "best.ckpt"):
        assert "adaptation" not in read_checkpoint(tmp_path / "run" / name)
        assert load_model(tmp_path / "run" / name).adaptation is None
    # The wizard says so when this checkpoint is chosen as the starting point.
    check = model_info(init, None, {}).check
    assert check.endswith("; its center adaptation is left out of fine-tuning "
                          "(fit a new one on the fine-tuned model with spkft adapt)")
