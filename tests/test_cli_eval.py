"""``spkft eval`` end to end on real speech (FSDD digits) with the tiny reference checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spkft.core.checkpoint import embedding_checkpoint, load_model
from spkft.core.data import make_trials, read_trials, scan, write_trials
from spkft.core.embedding import Embedder
from spkft.core.evaluate import evaluate
from spkft.core.metrics import compute_metrics
from spkft.core.records import Trial
from spkft.tui.cli import app
from spkft.tui.cli.evaluate import _default_report_dir

runner = CliRunner()
SPEAKERS = ("george", "jackson", "lucas", "nicolas")
COHORT_SPEAKERS = ("theo", "yweweler")
REPORT_FILES = ("metrics.json", "scores.tsv", "det.png", "scores.png")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_list(path: Path, fsdd_dir: Path, speakers, digits) -> Path:
    rows = [f"{fsdd_dir / f'{d}_{s}_{d}.wav'},{s}" for s in speakers for d in digits]
    path.write_text("path,speaker\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, fsdd_dir) -> Path:
    """4 speakers x 3 recordings: 12 target and 54 non-target pairs."""
    return write_list(tmp_path_factory.mktemp("data") / "heldout.csv", fsdd_dir, SPEAKERS, (0, 1, 2))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, fsdd_dir) -> Path:
    return write_list(tmp_path_factory.mktemp("cohort") / "cohort.csv", fsdd_dir, COHORT_SPEAKERS, (3, 4))


@pytest.fixture(scope="module")
def baseline_checkpoint(reference_dir) -> Path:
    return reference_dir / "tiny_w26s2ep2_m8.ckpt"


def run(*args):
    return runner.invoke(app, ["eval", *(str(a) for a in args)])


def run_json(*args) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # nothing but the one object on stdout


def report_trials(directory: Path) -> tuple[list[Trial], np.ndarray]:
    """The trials and scores a report's scores.tsv lists."""
    rows = [line.split("\t") for line in (directory / "scores.tsv").read_text().splitlines()[1:]]
    return [Trial(e, t, label == "target") for e, t, label, _ in rows], np.array([float(r[3]) for r in rows])


def assert_same_metrics(actual: dict, expected: dict) -> None:
    assert set(expected) <= set(actual)
    for key, value in expected.items():
        if key == "at_far":
            assert actual[key].keys() == value.keys()
            for far, point in value.items():
                assert actual[key][far] == pytest.approx(point, rel=1e-9, abs=1e-12)
        else:
            assert actual[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_json_metrics_match_evaluate_and_report_is_written(tmp_path, heldout, tiny_checkpoint):
    report_dir = tmp_path / "report"
    result = run("-c", tiny_checkpoint, "-d", heldout, "-o", report_dir, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no progress bar and nothing to note with --json on clean data
    payload = json.loads(result.stdout)
    assert payload["report_dir"] == str(report_dir)
    assert all((report_dir / name).stat().st_size > 0 for name in REPORT_FILES)
    stored = json.loads((report_dir / "metrics.json").read_text())
    assert stored == {k: v for k, v in payload.items() if k != "report_dir"}
    assert "baseline" not in payload and "comparison" not in payload

    trials, scores = report_trials(report_dir)
    # Every same-speaker pair, and non-targets up to their half of the cap rather than one per target.
    assert sum(t.target for t in trials) == 12 and sum(not t.target for t in trials) == 54
    expected = evaluate(Embedder.from_checkpoint(tiny_checkpoint), scan(heldout).recordings, trials)
    assert_same_metrics(payload, expected.metrics.to_dict())
    assert np.abs(scores - expected.scores).max() < 1e-6
    assert payload["threshold"] == payload["eer_threshold"] and payload["p_target"] == 0.01


def test_generated_trials_follow_seed_and_cap(tmp_path, heldout, tiny_checkpoint):
    payload = run_json("-c", tiny_checkpoint, "-d", heldout, "-o", tmp_path / "r", "--max-trials", 10, "--seed", 7)
    trials, _ = report_trials(tmp_path / "r")
    assert (payload["target_trials"], payload["nontarget_trials"]) == (5, 5)
    assert trials == make_trials(scan(heldout).recordings, seed=7, max_target=5, nontarget_per_target=None,
                                 max_nontarget=5)


def test_human_output_with_baseline_lands_beside_the_checkpoint(tmp_path, heldout, tiny_checkpoint,
                                                                 baseline_checkpoint):
    checkpoint = tmp_path / "run" / "best.ckpt"
    checkpoint.parent.mkdir()
    shutil.copy(tiny_checkpoint, checkpoint)
    result = run("-c", checkpoint, "-d", heldout, "--baseline", baseline_checkpoint)
    assert result.exit_code == 0, result.output
    report_dir = tmp_path / "run" / "eval-heldout"
    assert all((report_dir / name).is_file() for name in REPORT_FILES)
    stored = json.loads((report_dir / "metrics.json").read_text())
    out = result.stdout
    assert f"{100 * stored['eer']:.2f} %" in out and f"{stored['min_dcf']:.4f}" in out
    assert "before / after" in out and "verdict" in out
    assert f"{100 * stored['baseline']['eer']:.2f} %" in out
    assert f"{100 * stored['comparison']['eer']['delta']:+.2f} pp" in out
    assert out.rstrip().endswith(f"report written to {report_dir}")
    assert "Traceback" not in result.output


def test_baseline_is_measured_on_the_same_trials(tmp_path, heldout, tiny_checkpoint, baseline_checkpoint):
    payload = run_json("-c", tiny_checkpoint, "-d", heldout, "--baseline", baseline_checkpoint,
                       "-o", tmp_path / "r")
    trials, _ = report_trials(tmp_path / "r")
    expected = evaluate(Embedder.from_checkpoint(baseline_checkpoint), scan(heldout).recordings, trials)
    assert_same_metrics(payload["baseline"], expected.metrics.to_dict())
    assert payload["baseline"]["eer"] != payload["eer"]  # really another model
    comparison = payload["comparison"]
    pairs = {"eer": ("eer",), "min_dcf": ("min_dcf",), "accuracy": ("accuracy",),
             "frr@far=0.01": ("at_far", "0.01", "frr"), "frr@far=0.001": ("at_far", "0.001", "frr")}
    assert set(comparison) == set(pairs)
    for name, path in pairs.items():
        before, after = payload["baseline"], payload
        for key in path:
            before, after = before[key], after[key]
        row = comparison[name]
        assert (row["baseline"], row["candidate"]) == (before, after)
        assert row["delta"] == pytest.approx(after - before, abs=1e-12)
        low, high = row["interval_95"]  # a paired bootstrap over these trials
        assert low <= row["delta"] <= high
        gained = after - before if name == "accuracy" else before - after
        assert row["verdict"] == ("within noise" if low <= 0 <= high else "better" if gained > 0 else "worse")
        assert row["improved"] == (row["verdict"] == "better")


def test_trials_file_round_trip(tmp_path, heldout, tiny_checkpoint):
    made = make_trials(scan(heldout).recordings, seed=3)
    chosen = [t for t in made if t.target][:5] + [t for t in made if not t.target][:7]
    trials_file = write_trials(chosen, tmp_path / "trials.txt")
    payload = run_json("-c", tiny_checkpoint, "-d", heldout, "--trials", trials_file, "-o", tmp_path / "r")
    used, _ = report_trials(tmp_path / "r")
    assert used == chosen
    assert (payload["target_trials"], payload["nontarget_trials"]) == (5, 7)
    expected = evaluate(Embedder.from_checkpoint(tiny_checkpoint), scan(heldout).recordings, read_trials(trials_file))
    assert_same_metrics(payload, expected.metrics.to_dict())


def test_cohort_as_norms_the_scores(tmp_path, heldout, cohort, tiny_checkpoint):
    run_json("-c", tiny_checkpoint, "-d", heldout, "-o", tmp_path / "plain")
    payload = run_json("-c", tiny_checkpoint, "-d", heldout, "--cohort", cohort, "--top-k", 2, "-o", tmp_path / "norm")
    trials, plain = report_trials(tmp_path / "plain")
    assert report_trials(tmp_path / "norm")[0] == trials
    normed = report_trials(tmp_path / "norm")[1]
    assert np.abs(normed - plain).max() > 0.1
    embedder = Embedder.from_checkpoint(tiny_checkpoint)
    expected = evaluate(embedder, scan(heldout).recordings, trials, cohort=scan(cohort).recordings, top_k=2)
    assert np.abs(normed - expected.scores).max() < 1e-5
    assert_same_metrics(payload, expected.metrics.to_dict())


def test_p_target_and_threshold_apply(tmp_path, heldout, tiny_checkpoint):
    payload = run_json("-c", tiny_checkpoint, "-d", heldout, "--p-target", 0.2, "--threshold", 0.99, "-o", tmp_path)
    trials, _ = report_trials(tmp_path)
    scores = evaluate(Embedder.from_checkpoint(tiny_checkpoint), scan(heldout).recordings, trials).scores
    expected = compute_metrics(scores, np.array([t.target for t in trials]), p_target=0.2, threshold=0.99)
    assert payload["p_target"] == 0.2 and payload["threshold"] == 0.99
    assert_same_metrics(payload, expected.to_dict())
    result = run("-c", tiny_checkpoint, "-d", heldout, "--p-target", 1)
    assert result.exit_code == 2 and "strictly between 0 and 1" in result.stderr


def test_excluded_rows_are_noted_not_fatal(tmp_path, fsdd_dir, heldout, tiny_checkpoint):
    data = tmp_path / "with-gaps.csv"
    data.write_text(heldout.read_text() + f"{fsdd_dir / 'absent.wav'},theo\n")
    result = run("-c", tiny_checkpoint, "-d", data, "-o", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["target_trials"] == 12
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "1 row(s) excluded (missing 1)" in lines[0] and "with-gaps.csv:14" in lines[0]


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ERROR_CASES = {
    "missing checkpoint": (lambda d, ckpt, fsdd: ["-c", d / "absent.ckpt"], "absent.ckpt: no such checkpoint file"),
    "missing data": (lambda d, ckpt, fsdd: ["-d", d / "nowhere"], "nowhere: no such file or folder"),
    "bad trials line": (
        lambda d, ckpt, fsdd: ["--trials", write_text(d / "t.txt", "a b target\na b maybe\n")],
        "t.txt:2: expected",
    ),
    "trials naming unknown ids": (
        lambda d, ckpt, fsdd: ["--trials", write_text(d / "t.txt", "ghost1 ghost2 target\nghost1 ghost3 nontarget\n")],
        "not in the data: ghost1, ghost2, ghost3",
    ),
    "trials without non-targets": (
        lambda d, ckpt, fsdd: ["--trials", write_text(d / "t.txt", "a b target\n")],
        "no different-speaker trial",
    ),
    "single speaker": (
        lambda d, ckpt, fsdd: ["-d", write_list(d / "one.csv", fsdd, ("george",), (0, 1, 2))],
        "all recordings come from one speaker",
    ),
    "no usable recordings": (
        lambda d, ckpt, fsdd: ["-d", write_text(d / "gone.csv", f"path,speaker\n{d / 'x.wav'},a\n{d / 'y.wav'},b\n")],
        "no usable recordings in the data",
    ),
    "one-speaker cohort": (
        lambda d, ckpt, fsdd: ["--cohort", write_list(d / "c.csv", fsdd, ("theo",), (3, 4))],
        "an AS-norm cohort needs at least 2 speakers",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_bad_input_is_one_line_and_exit_1(case, tmp_path, heldout, fsdd_dir, tiny_checkpoint):
    build, expected = ERROR_CASES[case]
    overrides = build(tmp_path, tiny_checkpoint, fsdd_dir)
    args = {"-c": tiny_checkpoint, "-d": heldout} | dict(zip(overrides[::2], overrides[1::2]))
    result = run(*[x for pair in args.items() for x in pair], "-o", tmp_path / "report")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stdout == "" and "Traceback" not in result.output
    assert not (tmp_path / "report").exists()


def test_default_report_dir_is_named_after_the_data(tmp_path):
    checkpoint = tmp_path / "run" / "best.ckpt"
    (tmp_path / "voxceleb1" / "kaldi").mkdir(parents=True)
    assert _default_report_dir(checkpoint, tmp_path / "voxceleb1") == tmp_path / "run" / "eval-voxceleb1"
    assert _default_report_dir(checkpoint, tmp_path / "voxceleb1" / "manifest.csv") == tmp_path / "run" / "eval-voxceleb1"
    assert _default_report_dir(checkpoint, tmp_path / "voxceleb1" / "kaldi" / "wav.scp") == tmp_path / "run" / "eval-kaldi"
    assert _default_report_dir(checkpoint, tmp_path / "voxceleb1" / "test.csv") == tmp_path / "run" / "eval-test"


@pytest.mark.parametrize("as_json", [False, True], ids=["tables", "json"])
def test_progress_shows_on_a_terminal_unless_json(as_json, tmp_path, heldout, tiny_checkpoint):
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}  # rich then treats stderr as a terminal
    args = ["eval", "-c", str(tiny_checkpoint), "-d", str(heldout), "-o", str(tmp_path)] + (["--json"] if as_json else [])
    result = runner.invoke(app, args, env=terminal)
    assert result.exit_code == 0, result.output
    if as_json:
        assert result.stderr == ""
    else:
        assert "embedding (candidate)" in result.stderr and "12/12" in result.stderr


def test_a_checkpoint_trained_on_evaluated_speakers_is_warned_about(tmp_path, heldout, tiny_checkpoint):
    loaded = load_model(tiny_checkpoint)
    trained = tmp_path / "trained.ckpt"
    # A model trained on a pool knows its speakers as corpus/speaker; the corpus evaluated alone names them bare.
    torch.save(embedding_checkpoint(loaded.model, loaded.variant,
                                    speakers=[SPEAKERS[1], f"corpus/{SPEAKERS[0]}", "someone", "corpus/other"]),
               trained)
    result = run("-c", trained, "-d", heldout, "--baseline", tiny_checkpoint, "-o", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    first, second = sorted(SPEAKERS[:2])
    assert warnings == [f"warning: {trained} was trained on 2 of the {len(SPEAKERS)} speakers evaluated "
                        f"({first}, {second}): its figures flatter it; evaluate on speakers it has not been "
                        "trained on"]
