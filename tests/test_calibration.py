"""Calibration: the fitted map gives LLRs that mean what they say, and the measures of what it costs."""

from __future__ import annotations

import numpy as np
import pytest

from spkft.core.calibration import (
    Calibration,
    act_dcf,
    bayes_threshold,
    cllr,
    fit_calibration,
    min_cllr,
    probability,
)
from spkft.core.errors import CheckpointError, EvaluationError
from spkft.core.metrics import min_dcf


def gaussian_trials(rng, targets=4000, non_targets=40000, separation=2.0):
    """Scores N(+s/2, 1) for same-speaker and N(-s/2, 1) for different-speaker trials: the true LLR is s * score."""
    scores = np.concatenate([rng.normal(separation / 2, 1, targets), rng.normal(-separation / 2, 1, non_targets)])
    labels = np.concatenate([np.ones(targets, bool), np.zeros(non_targets, bool)])
    return scores, labels


def test_fitted_llrs_match_the_empirical_odds():
    rng = np.random.default_rng(0)
    raw, labels = gaussian_trials(rng)
    scores = 0.1 * raw + 0.3  # a cosine-like range, off-centre: the map must undo both
    calibration = fit_calibration(scores, labels, "cosine")
    assert calibration.scale == pytest.approx(20.0, rel=0.05)  # true LLR = 2 * raw = 20 * (score - 0.3)
    assert calibration.offset == pytest.approx(-6.0, abs=0.3)
    llr = calibration.llr(scores)
    # In each LLR bin, the odds of same-speaker trials (corrected for their share) are exp(llr).
    prior_odds = labels.sum() / (~labels).sum()
    for low, high in [(-3, -2), (-1, 0), (0, 1), (2, 3)]:
        inside = (llr >= low) & (llr < high)
        odds = labels[inside].sum() / (~labels[inside]).sum() / prior_odds
        assert np.log(odds) == pytest.approx(llr[inside].mean(), abs=0.2)


def test_cllr_of_calibrated_llrs_is_near_its_minimum_and_miscalibration_shows():
    rng = np.random.default_rng(1)
    scores, labels = gaussian_trials(rng)
    calibrated = fit_calibration(scores, labels, "cosine").llr(scores)
    assert cllr(calibrated, labels) < 1
    assert cllr(calibrated, labels) - min_cllr(scores, labels) < 0.02
    assert min_cllr(scores, labels) <= cllr(calibrated, labels) + 1e-9
    assert cllr(calibrated + 3, labels) > cllr(calibrated, labels) + 0.1  # shifted: miscalibrated
    assert cllr(np.zeros(len(labels)), labels) == pytest.approx(1.0)  # "no idea" costs one bit


@pytest.mark.parametrize("p_target", [0.01, 0.05])
def test_actual_dcf_of_calibrated_llrs_is_near_min_dcf(p_target):
    rng = np.random.default_rng(2)
    scores, labels = gaussian_trials(rng, targets=20000, non_targets=200000)
    llr = fit_calibration(scores, labels, "cosine").llr(scores)
    best, _ = min_dcf(scores, labels, p_target=p_target)
    assert act_dcf(llr, labels, p_target) <= best * 1.05
    assert act_dcf(llr + 4, labels, p_target) > best * 1.3  # miscalibrated LLRs decide worse


def test_durations_enter_the_map_when_given():
    rng = np.random.default_rng(3)
    n = 30000
    labels = rng.random(n) < 0.2
    seconds = rng.uniform(1, 20, size=(n, 2))
    # Short recordings separate less: the score's mean difference grows with the shorter side.
    reliability = np.log(seconds.min(axis=1))
    scores = np.where(labels, 0.5 * reliability, -0.5 * reliability) + rng.normal(size=n)
    plain = fit_calibration(scores, labels, "cosine")
    aware = fit_calibration(scores, labels, "cosine", seconds[:, 0], seconds[:, 1])
    assert aware.quality is not None and plain.quality is None
    assert cllr(aware.llr(scores, seconds[:, 0], seconds[:, 1]), labels) <= cllr(plain.llr(scores), labels) + 1e-6
    with pytest.raises(EvaluationError, match="durations"):
        aware.llr(scores)
    # An enrolled speaker of unknown length counts as the longer side: the test side's length decides.
    np.testing.assert_allclose(aware.llr(scores, None, seconds[:, 1]),
                               aware.llr(scores, np.full(n, 1e6), seconds[:, 1]))


def test_decisions_probabilities_and_round_trip():
    assert bayes_threshold(0.5) == pytest.approx(0.0)
    assert bayes_threshold(0.01) == pytest.approx(np.log(99))
    assert probability(0.0, 0.5) == pytest.approx(0.5)
    assert probability(np.log(99), 0.01) == pytest.approx(0.5)
    with pytest.raises(EvaluationError, match="prior"):
        bayes_threshold(1.0)
    calibration = Calibration(2.0, -1.0, 0.1, "plda", 1000, "val")
    assert Calibration.from_dict(calibration.to_dict()) == calibration
    with pytest.raises(CheckpointError, match="malformed calibration"):
        Calibration.from_dict(calibration.to_dict() | {"scale": -1.0})


def test_scores_that_do_not_separate_are_refused():
    rng = np.random.default_rng(4)
    labels = rng.random(2000) < 0.3
    with pytest.raises(EvaluationError, match="do not separate"):
        fit_calibration(np.where(labels, -1.0, 1.0) + rng.normal(0, 0.1, 2000), labels, "cosine")
    with pytest.raises(EvaluationError, match="at least 10"):
        fit_calibration(np.arange(20.0), np.arange(20) < 3, "cosine")
