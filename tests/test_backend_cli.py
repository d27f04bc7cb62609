"""PLDA and calibration through the command line: ``spkft adapt --method plda``, ``spkft calibrate``,
and ``spkft eval`` scoring and measuring with what the checkpoint carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spkft.core.checkpoint import load_model, read_checkpoint
from spkft.core.data import scan
from spkft.core.embedding import Embedder
from spkft.core.evaluate import embed_recordings
from spkft.core.plda import adapt_plda, fit_plda
from spkft.tui.cli import app

from data_helpers import write_fsdd_list

runner = CliRunner()
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def lists(fsdd_dir, tmp_path_factory):
    """Labelled recordings to fit on, unlabelled ones to adapt to, and others to evaluate on."""
    folder = tmp_path_factory.mktemp("lists")
    unlabelled = folder / "calls"
    unlabelled.mkdir()
    for path in sorted(fsdd_dir.glob("*_theo_3*.wav"))[:12]:
        (unlabelled / path.name).symlink_to(path)
    return (write_fsdd_list(folder / "train.csv", fsdd_dir, SPEAKERS, range(5), (0, 1)), unlabelled,
            write_fsdd_list(folder / "heldout.csv", fsdd_dir, SPEAKERS, range(5), (40, 41)))


@pytest.fixture(scope="module")
def plda_checkpoint(lists, tiny_checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("plda") / "plda.ckpt"
    result = run("adapt", "-c", tiny_checkpoint, "-d", lists[0], "--backend", "plda", "--adapt-data", lists[1],
                 "-o", output)
    return result, output


def test_adapt_fits_plda_on_the_bare_network_and_adapts_it(plda_checkpoint, lists, tiny_checkpoint):
    result, output = plda_checkpoint
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"fitted plda (5 dims) on 60 recordings of 6 speakers, adapted on 12 unlabelled "
                             f"recordings; wrote {output}\n")
    embedder = Embedder.from_checkpoint(tiny_checkpoint)

    def vectors(source):
        recordings = scan(source, allow_unlabelled=True).recordings
        found = embed_recordings(embedder, recordings)
        return np.stack([found[r.utt_id] for r in recordings]), [r.speaker for r in recordings]

    x, speakers = vectors(lists[0])
    expected = adapt_plda(fit_plda(x, speakers), vectors(lists[1])[0])
    stored = load_model(output).plda
    np.testing.assert_allclose(stored.llr(x[:8], x[8:16]), expected.llr(x[:8], x[8:16]), rtol=1e-4, atol=1e-3)
    assert load_model(output).adaptation is None and read_checkpoint(output)["plda"]["method"] == "plda"


def test_eval_scores_by_plda_and_refuses_a_cosine_cohort(plda_checkpoint, lists, tmp_path):
    output = plda_checkpoint[1]
    result = run("eval", "-c", output, "-d", lists[2], "--json", "-o", tmp_path / "report")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["scores"] == "plda" and "calibration" not in record
    refused = run("eval", "-c", output, "-d", lists[2], "--cohort", lists[0])
    assert refused.exit_code == 1 and "AS-norm" in refused.stderr and "Traceback" not in refused.output


def test_calibrate_stores_a_map_and_eval_reports_what_it_costs(plda_checkpoint, lists, tmp_path):
    calibrated = tmp_path / "calibrated.ckpt"
    result = run("calibrate", "-c", plda_checkpoint[1], "-d", lists[2], "-o", calibrated, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["calibration"]["scores"] == "plda" and record["calibration"]["quality"] is not None
    assert record["llr_threshold"] == pytest.approx(np.log(99))
    assert record["measures"]["min_cllr"] <= record["measures"]["cllr"] + 1e-9
    assert load_model(calibrated).calibration.trials == record["calibration"]["trials"]
    evaluated = json.loads(run("eval", "-c", calibrated, "-d", lists[2], "--json", "-o", tmp_path / "r").stdout)
    assert evaluated["calibration"]["cllr"] == pytest.approx(record["measures"]["cllr"], rel=1e-6)
    assert set(evaluated["calibration"]["act_dcf"]) == {"0.01", "0.05"}
    # Human output: one line on the map, one on its cost, one on the decision it makes.
    lines = run("calibrate", "-c", calibrated, "-d", lists[2], "--no-durations").stdout.splitlines()
    assert lines[0].startswith("fitted a map of plda scores to LLRs") and lines[0].endswith("replacing its calibration")
    assert "Cllr" in lines[1] and "accepts when the evidence favours the same speaker at least 99:1" in lines[2]
    # A new backend makes the calibration stale: refitting drops it.
    run("adapt", "-c", calibrated, "-d", lists[0], "--method", "wccn")
    stored = read_checkpoint(calibrated)
    assert "calibration" not in stored and "plda" not in stored and stored["adaptation"]["method"] == "wccn"


@pytest.mark.parametrize("extra, message", [
    (("--backend", "plda", "--unlabelled"), "--adapt-data"),
    (("--method", "wccn", "--adapt-data", "."), "only plda"),
    (("--method", "plda",), "plda needs --data"),
])
def test_impossible_plda_requests_are_one_clear_line(extra, message, tiny_checkpoint, lists):
    args = ["adapt", "-c", tiny_checkpoint, *extra]
    if "--unlabelled" in extra or "wccn" in extra:
        args += ["-d", lists[0]]
    result = run(*args)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_adapting_a_checkpoint_without_plda_asks_for_data(tiny_checkpoint, lists, tmp_path):
    result = run("adapt", "-c", tiny_checkpoint, "--method", "plda", "--adapt-data", lists[1], "-o", tmp_path / "x")
    assert result.exit_code == 1 and "carries no PLDA to adapt" in result.stderr
