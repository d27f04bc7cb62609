"""Verification metrics against figures worked out by hand on tiny trial sets."""

import json
from statistics import NormalDist

import numpy as np
import pytest

from spkft.core.errors import EvaluationError, SpkftError
from spkft.core.metrics import (
    FarOperatingPoint,
    VerificationMetrics,
    accuracy,
    compute_metrics,
    det_curve,
    eer,
    error_rates,
    min_dcf,
    threshold_at_far,
)

# Three target and four non-target trials. Sorted: .1n .2n .3t .4n .7n .8t .9t.
# Operating points (threshold: FAR, FRR), accepting score >= threshold:
#   .1: 4/4, 0    .2: 3/4, 0    .3: 2/4, 0    .4: 2/4, 1/3    .7: 1/4, 1/3
#   .8: 0, 1/3    .9: 0, 2/3    reject all: 0, 1
SCORES = np.array([0.9, 0.8, 0.3, 0.7, 0.4, 0.2, 0.1])
LABELS = np.array([True, True, True, False, False, False, False])


def test_det_curve_lists_every_operating_point():
    far, frr, thresholds = det_curve(SCORES, LABELS)
    np.testing.assert_allclose(far, [1, 0.75, 0.5, 0.5, 0.25, 0, 0, 0])
    np.testing.assert_allclose(frr, [0, 0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(thresholds[:-1], [0.1, 0.2, 0.3, 0.4, 0.7, 0.8, 0.9])
    assert thresholds[-1] > 0.9 and thresholds[-1] == np.nextafter(0.9, 1)


def test_eer_where_far_falls_across_a_flat_frr():
    # FRR - FAR turns non-negative between .4 (FAR 1/2) and .7 (FAR 1/4), where FRR stays 1/3.
    # FAR = 1/2 - alpha/4 meets 1/3 at alpha = 2/3, so EER = 1/3, threshold .4 + 2/3 * .3 = .6.
    value, threshold = eer(SCORES, LABELS)
    assert value == pytest.approx(1 / 3)
    assert threshold == pytest.approx(0.6)


def test_eer_where_both_rates_change():
    # Targets {0, 2}, non-target {1}. Points: 0: (FAR 1, FRR 0), 1: (1, 1/2), 2: (0, 1/2).
    # Between 1 and 2, FAR = 1 - alpha meets FRR = 1/2 at alpha = 1/2: EER 1/2 at threshold 1.5.
    value, threshold = eer([2.0, 0.0, 1.0], [1, 1, 0])
    assert value == pytest.approx(0.5)
    assert threshold == pytest.approx(1.5)


def test_perfect_separation_has_zero_error():
    # Targets {3, 4}, non-targets {1, 2}: at threshold 3 both rates are 0.
    scores, labels = [3.0, 4.0, 1.0, 2.0], [True, True, False, False]
    assert eer(scores, labels) == pytest.approx((0.0, 3.0))
    assert min_dcf(scores, labels) == (0.0, 3.0)
    assert accuracy(scores, labels, 3.0) == 1.0


def test_fully_inverted_scores_are_always_wrong():
    # Every target below every non-target: at any threshold FAR + FRR >= 1, EER 1 at threshold 3
    # (FAR 1 while FRR climbs to 1), and no threshold beats doing nothing, so minDCF is 1.
    scores, labels = [1.0, 2.0, 3.0, 4.0], [True, True, False, False]
    assert eer(scores, labels) == pytest.approx((1.0, 3.0))
    assert min_dcf(scores, labels)[0] == pytest.approx(1.0)
    assert accuracy(scores, labels, 2.5) == 0.0
    # With p_target 1/2 accepting all (FAR 1) and rejecting all (FRR 1) cost the same; the tie
    # goes to the lower threshold, 1.
    assert min_dcf(scores, labels, p_target=0.5) == (1.0, 1.0)


def test_tied_scores_are_decided_together():
    # Targets {1, 1}, non-targets {1, 0}. Points: 0: (FAR 1, FRR 0), 1: (1/2, 0), reject all: (0, 1).
    # No threshold splits the three 1s: FAR = 1/2 - alpha/2 meets FRR = alpha at alpha = 1/3.
    scores, labels = [1.0, 1.0, 1.0, 0.0], [1, 1, 0, 0]
    value, threshold = eer(scores, labels)
    assert value == pytest.approx(1 / 3)
    assert threshold == pytest.approx(1.0)
    # At 1 all three tied trials are accepted: the tied non-target is a false accept.
    assert error_rates(scores, labels, 1.0) == (0.5, 0.0)
    assert accuracy(scores, labels, 1.0) == 0.75
    np.testing.assert_allclose(det_curve(scores, labels)[0], [1, 0.5, 0])


def test_min_dcf_by_hand():
    # p_target 1/2, unit costs: DCF / 0.5 = FRR + FAR, lowest at .8: 1/3 + 0.
    assert min_dcf(SCORES, LABELS, p_target=0.5) == (pytest.approx(1 / 3), 0.8)
    # Default p_target 0.01: DCF / 0.01 = FRR + 99 FAR; any accepted non-target costs 99/4, so the
    # best is again .8: 1/3.
    assert min_dcf(SCORES, LABELS) == (pytest.approx(1 / 3), 0.8)
    # A miss ten times dearer: DCF / 0.5 = 10 FRR + FAR, lowest at .3 (no miss yet): FAR 1/2.
    assert min_dcf(SCORES, LABELS, p_target=0.5, c_miss=10) == (pytest.approx(0.5), 0.3)


def test_min_dcf_matches_a_brute_force_search():
    rng = np.random.default_rng(1)
    labels = rng.random(400) < 0.2
    # Rounded to create ties between targets and non-targets.
    scores = np.round(np.where(labels, rng.normal(1, 1, 400), rng.normal(0, 1, 400)), 1)
    p, c_miss, c_fa = 0.05, 2.0, 1.0
    best = min(
        c_miss * p * np.mean(scores[labels] < t) + c_fa * (1 - p) * np.mean(scores[~labels] >= t)
        for t in [*np.unique(scores), np.inf]
    ) / min(c_miss * p, c_fa * (1 - p))
    assert min_dcf(scores, labels, p, c_miss, c_fa)[0] == pytest.approx(best)


def test_eer_of_two_gaussians_approaches_theory():
    # Unit-variance Gaussians d apart cross at d/2: EER = Phi(-d/2) = Phi(-1) ~ 0.1587 for d = 2.
    rng = np.random.default_rng(2)
    labels = rng.random(200_000) < 0.5
    scores = rng.normal(0, 1, labels.size) + 2.0 * labels
    value, threshold = eer(scores, labels)
    assert value == pytest.approx(NormalDist().cdf(-1.0), abs=0.004)
    assert threshold == pytest.approx(1.0, abs=0.02)


def test_threshold_at_far_by_hand():
    assert threshold_at_far(SCORES, LABELS, 0.25) == (0.7, 0.25, pytest.approx(1 / 3))
    # FAR moves in steps of 1/4: asking for 0.3 gets the 1/4 point, the lowest threshold under it.
    assert threshold_at_far(SCORES, LABELS, 0.3) == (0.7, 0.25, pytest.approx(1 / 3))
    assert threshold_at_far(SCORES, LABELS, 0.5) == (0.3, 0.5, 0.0)
    assert threshold_at_far(SCORES, LABELS, 0.0) == (0.8, 0.0, pytest.approx(1 / 3))
    assert threshold_at_far(SCORES, LABELS, 1.0) == (0.1, 1.0, 0.0)


def test_threshold_at_zero_far_past_a_top_scoring_nontarget():
    # The highest score is a non-target: only rejecting everything gives FAR 0.
    threshold, far, frr = threshold_at_far([0.0, 1.0], [True, False], 0.0)
    assert threshold > 1.0 and np.isfinite(threshold)
    assert (far, frr) == (0.0, 1.0)


def test_error_rates_and_accuracy_at_a_threshold():
    # At .6: accepted .7n .8t .9t. False accepts 1/4, false rejects 1/3 (.3t), correct 2 + 3 of 7.
    assert error_rates(SCORES, LABELS, 0.6) == (0.25, pytest.approx(1 / 3))
    assert accuracy(SCORES, LABELS, 0.6) == pytest.approx(5 / 7)
    # A score equal to the threshold is accepted.
    assert error_rates(SCORES, LABELS, 0.8) == (0.0, pytest.approx(1 / 3))
    assert error_rates(SCORES, LABELS, np.nextafter(0.8, 1)) == (0.0, pytest.approx(2 / 3))


def test_integer_labels_are_the_same_as_booleans():
    assert eer(SCORES, LABELS.astype(int)) == eer(SCORES, LABELS)


def test_compute_metrics_gathers_every_figure():
    metrics = compute_metrics(SCORES, LABELS, p_target=0.5, fars=(0.25, 0.0))
    assert metrics.eer == pytest.approx(1 / 3) and metrics.eer_threshold == pytest.approx(0.6)
    assert (metrics.min_dcf, metrics.min_dcf_threshold) == (pytest.approx(1 / 3), 0.8)
    assert metrics.at_far == {
        0.25: FarOperatingPoint(0.7, 0.25, pytest.approx(1 / 3)),
        0.0: FarOperatingPoint(0.8, 0.0, pytest.approx(1 / 3)),
    }
    # Accuracy defaults to the EER threshold .6.
    assert metrics.threshold == pytest.approx(0.6)
    assert (metrics.accuracy, metrics.far, metrics.frr) == (pytest.approx(5 / 7), 0.25, pytest.approx(1 / 3))
    assert (metrics.target_trials, metrics.nontarget_trials) == (3, 4)

    chosen = compute_metrics(SCORES, LABELS, threshold=0.35)
    # At .35: accepted .4n .7n .8t .9t; the .3 target is missed.
    assert (chosen.threshold, chosen.far, chosen.frr) == (0.35, 0.5, pytest.approx(1 / 3))
    assert chosen.accuracy == pytest.approx(4 / 7)


def test_metrics_survive_a_json_round_trip():
    metrics = compute_metrics(SCORES, LABELS)
    record = json.loads(json.dumps(metrics.to_dict()))
    assert set(record["at_far"]) == {"0.01", "0.001"}
    assert VerificationMetrics.from_dict(record) == metrics
    with pytest.raises(EvaluationError, match="not a spkft metrics record"):
        VerificationMetrics.from_dict({"eer": 0.1})


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, 0.2], [False, False], "no target trials"),
        ([0.1, 0.2], [1, 1], "no non-target trials"),
        ([], [], "no target trials"),
        ([0.1, np.nan, 0.3], [1, 0, 0], "1 of 3 scores are NaN or infinite"),
        ([0.1, np.inf], [1, 0], "NaN or infinite"),
        ([0.1, 0.2, 0.3], [1, 0], "equally long"),
        ([0.1, 0.2], [2, 0], "0/1"),
    ],
)
def test_unusable_trials_are_refused(scores, labels, message):
    for measure in (eer, min_dcf, det_curve, compute_metrics):
        with pytest.raises(EvaluationError, match=message) as caught:
            measure(scores, labels)
        # Callers may catch either spkft's base error or the ValueError it also is.
        assert isinstance(caught.value, ValueError) and isinstance(caught.value, SpkftError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"p_target": 0.0}, "p_target"), ({"p_target": 1.0}, "p_target"), ({"c_miss": 0.0}, "positive")],
)
def test_bad_costs_are_refused(kwargs, message):
    with pytest.raises(EvaluationError, match=message):
        min_dcf(SCORES, LABELS, **kwargs)


@pytest.mark.parametrize("far", [-0.1, 1.5])
def test_impossible_far_is_refused(far):
    with pytest.raises(EvaluationError, match="false accept rate"):
        threshold_at_far(SCORES, LABELS, far)
