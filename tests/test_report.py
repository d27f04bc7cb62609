"""The evaluation report folder and the before/after comparison."""

import json
import time
from statistics import NormalDist

import numpy as np
import pytest

from spkft.core.errors import EvaluationError
from spkft.core.metrics import FarOperatingPoint, VerificationMetrics, bootstrap_differences, compute_metrics
from spkft.core.records import Trial
from spkft.core.report import Baseline, _probit, compare_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic(count: int, separation: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.random(count) < 0.1
    labels[:2] = True, False  # never without either kind, however small
    scores = rng.normal(0.0, 0.1, count) + separation * labels
    trials = [Trial(f"enrol{i}", f"test{i}", bool(t)) for i, t in enumerate(labels)]
    return scores, labels, trials


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000  # a drawn plot, not an empty canvas


def test_report_holds_metrics_scores_and_plots(tmp_path):
    scores, labels, trials = synthetic(500, 0.3)
    metrics = compute_metrics(scores, labels)
    files = write_report(tmp_path / "run" / "report", metrics, scores, labels, trials)

    assert files.directory == tmp_path / "run" / "report"
    assert json.loads(files.metrics.read_text()) == metrics.to_dict()
    lines = files.scores.read_text().splitlines()
    assert lines[0] == "enrol\ttest\tlabel\tscore"
    assert len(lines) == 501
    enrol, test, label, score = lines[1].split("\t")
    assert (enrol, test, label) == ("enrol0", "test0", "target")
    assert float(score) == pytest.approx(scores[0], abs=1e-6)
    assert lines[2].split("\t")[2] == "nontarget"
    assert_png(files.det_plot)
    assert_png(files.score_plot)


def test_report_with_a_baseline_compares_the_two(tmp_path):
    scores, labels, trials = synthetic(500, 0.4)
    before = scores - 0.25 * labels  # the same trials, less separated
    candidate, baseline = compute_metrics(scores, labels), compute_metrics(before, labels)
    assert candidate.eer < baseline.eer

    files = write_report(tmp_path, candidate, scores, labels, trials, Baseline(baseline, before, labels, "pretrained"))
    record = json.loads(files.metrics.read_text())
    assert record["eer"] == candidate.eer
    assert record["baseline"] == baseline.to_dict()
    assert record["comparison"]["eer"]["improved"] is True
    assert record["comparison"]["eer"]["delta"] == pytest.approx(candidate.eer - baseline.eer)
    assert_png(files.det_plot)
    assert_png(files.score_plot)


def metrics_with(eer: float, accuracy: float, frr_at: dict[float, float]) -> VerificationMetrics:
    return VerificationMetrics(
        eer=eer,
        eer_threshold=0.3,
        min_dcf=2 * eer,
        min_dcf_threshold=0.5,
        p_target=0.01,
        c_miss=1.0,
        c_fa=1.0,
        at_far={far: FarOperatingPoint(0.6, far, frr) for far, frr in frr_at.items()},
        threshold=0.3,
        accuracy=accuracy,
        far=eer,
        frr=eer,
        target_trials=10,
        nontarget_trials=90,
    )


def test_comparison_by_hand():
    baseline = metrics_with(0.10, 0.90, {0.01: 0.40, 0.001: 0.0})
    candidate = metrics_with(0.05, 0.85, {0.01: 0.20, 0.001: 0.1, 0.05: 0.1})
    table = compare_metrics(baseline, candidate)
    # FRR only at the FARs both measured, the looser one first.
    assert list(table) == ["eer", "min_dcf", "frr@far=0.01", "frr@far=0.001", "accuracy"]
    assert table["eer"] == {
        "baseline": 0.10,
        "candidate": 0.05,
        "delta": pytest.approx(-0.05),
        "relative_delta": pytest.approx(-0.5),
        "interval_95": None,
        "verdict": "better",
        "improved": True,
    }
    assert table["min_dcf"]["delta"] == pytest.approx(-0.1)
    assert table["frr@far=0.01"]["improved"] is True
    # Rising from a baseline of 0: worse, and no relative change to speak of.
    assert table["frr@far=0.001"]["improved"] is False
    assert table["frr@far=0.001"]["relative_delta"] is None
    # Accuracy is the one figure where higher is better.
    assert table["accuracy"]["improved"] is False
    assert table["accuracy"]["delta"] == pytest.approx(-0.05)
    json.dumps(table)  # printable as JSON by the CLI without conversion


def test_a_change_inside_its_bootstrap_interval_is_within_noise():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(300, bool), np.zeros(3000, bool)]
    clean = np.where(labels, rng.normal(0.6, 0.15, labels.size), rng.normal(0.1, 0.15, labels.size))
    jitter = clean + rng.normal(0, 0.01, labels.size)  # the same system, give or take rounding
    better = np.where(labels, clean + 0.15, clean)  # targets moved well clear of non-targets
    base = compute_metrics(clean, labels)
    for scores, verdict in ((jitter, "within noise"), (better, "better")):
        metrics = compute_metrics(scores, labels)
        intervals = bootstrap_differences(clean, scores, labels, base, metrics)
        row = compare_metrics(base, metrics, intervals)["eer"]
        low, high = row["interval_95"]
        assert low <= row["delta"] <= high
        assert row["verdict"] == verdict and row["improved"] is (verdict == "better")
    worse = compare_metrics(compute_metrics(better, labels), base,
                            bootstrap_differences(better, clean, labels, compute_metrics(better, labels), base))
    assert worse["eer"]["verdict"] == "worse" and worse["accuracy"]["verdict"] == "worse"


def test_labels_must_agree_with_the_trials(tmp_path):
    scores, labels, trials = synthetic(50, 0.3)
    metrics = compute_metrics(scores, labels)
    with pytest.raises(EvaluationError, match="disagree"):
        write_report(tmp_path, metrics, scores, ~labels, trials)
    with pytest.raises(EvaluationError, match="49 trials but 50 scores"):
        write_report(tmp_path, metrics, scores, labels, trials[:-1])
    assert not (tmp_path / "metrics.json").exists()


def test_an_unusable_baseline_fails_before_writing(tmp_path):
    scores, labels, trials = synthetic(50, 0.3)
    metrics = compute_metrics(scores, labels)
    only_targets = Baseline(metrics, scores, np.ones_like(labels))
    with pytest.raises(EvaluationError, match="no non-target trials"):
        write_report(tmp_path / "report", metrics, scores, labels, trials, only_targets)
    assert not (tmp_path / "report").exists()


def test_probit_matches_the_normal_quantile():
    p = np.r_[1e-9, 1e-5, 0.001, 0.02425, 0.1, 0.5, 0.9, 0.97575, 0.999, 1 - 1e-9]
    expected = [NormalDist().inv_cdf(x) for x in p]
    np.testing.assert_allclose(_probit(p), expected, rtol=1e-8, atol=1e-9)


def test_a_hundred_thousand_trials_report_quickly(tmp_path):
    scores, labels, trials = synthetic(100_000, 0.3)
    metrics = compute_metrics(scores, labels)
    baseline = Baseline(compute_metrics(scores - 0.1 * labels, labels), scores - 0.1 * labels, labels)
    write_report(tmp_path / "warm-up", metrics, scores[:1000], labels[:1000], trials[:1000])
    start = time.perf_counter()
    write_report(tmp_path / "big", metrics, scores, labels, trials, baseline)
    # The target is under a second; the margin absorbs a slow or busy test machine.
    assert time.perf_counter() - start < 3.0
