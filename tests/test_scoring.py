"""Cosine trial scoring and AS-norm against plain per-trial loops."""

import numpy as np
import pytest

from spkft.core import scoring
from spkft.core.errors import EvaluationError
from spkft.core.records import Trial
from spkft.core.scoring import as_norm, cohort_statistics, score_trials, trial_labels

DIM = 16


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    x = rng.normal(size=(count, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 12)
    embeddings = {f"utt{i}": v for i, v in enumerate(vectors)}
    pairs = rng.integers(0, 12, size=(60, 2))
    trials = [Trial(f"utt{a}", f"utt{b}", bool(a % 3 == b % 3)) for a, b in pairs]
    return rng, embeddings, trials


def test_scores_are_the_cosines_in_trial_order(data):
    _, embeddings, trials = data
    expected = [float(np.dot(embeddings[t.enrol], embeddings[t.test])) for t in trials]
    scores = score_trials(embeddings, trials)
    assert scores.dtype == np.float64 and scores.shape == (len(trials),)
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_chunked_scoring_equals_one_pass(data, monkeypatch):
    _, embeddings, trials = data
    whole = score_trials(embeddings, trials)
    monkeypatch.setattr(scoring, "_CHUNK_ELEMENTS", 7 * DIM)  # seven trials at a time
    np.testing.assert_array_equal(score_trials(embeddings, trials), whole)


def test_a_recording_against_itself_scores_one_at_most():
    v = np.full(DIM, 1 / np.sqrt(DIM), dtype=np.float32)
    scores = score_trials({"a": v, "b": -v}, [Trial("a", "a", True), Trial("a", "b", False)])
    assert scores[0] <= 1.0 and scores[0] == pytest.approx(1.0)
    assert scores[1] >= -1.0 and scores[1] == pytest.approx(-1.0)


def test_trial_labels():
    trials = [Trial("a", "b", True), Trial("a", "c", False)]
    np.testing.assert_array_equal(trial_labels(trials), [True, False])


def test_missing_embeddings_are_named(data):
    _, embeddings, trials = data
    with pytest.raises(EvaluationError, match="1 utterances in the trials have no embedding: ghost"):
        score_trials(embeddings, [*trials, Trial("utt0", "ghost", False)])


def test_unnormalised_embeddings_are_refused(data):
    _, embeddings, trials = data
    stretched = {k: 2 * v for k, v in embeddings.items()}
    with pytest.raises(EvaluationError, match="not L2-normalised"):
        score_trials(stretched, trials)


def test_no_trials_is_refused(data):
    with pytest.raises(EvaluationError, match="no trials"):
        score_trials(data[1], [])


def loop_as_norm(scores, embeddings, trials, cohort, top_k):
    """AS-norm written out trial by trial, straight from the paper's formula."""
    out = []
    for s, trial in zip(scores, trials, strict=True):
        normalised = 0.0
        for utt in (trial.enrol, trial.test):
            top = np.sort(cohort @ embeddings[utt])[::-1][:top_k].astype(np.float64)
            normalised += (s - top.mean()) / top.std()
        out.append(normalised / 2)
    return np.array(out)


@pytest.mark.parametrize("top_k", [2, 5, 20])
def test_as_norm_matches_a_direct_loop(data, top_k):
    rng, embeddings, trials = data
    cohort = unit_rows(rng, 20)
    scores = score_trials(embeddings, trials)
    expected = loop_as_norm(scores, embeddings, trials, cohort, top_k)
    np.testing.assert_allclose(as_norm(scores, embeddings, trials, cohort, top_k), expected, rtol=1e-4, atol=1e-5)


def test_as_norm_top_k_beyond_the_cohort_uses_all_of_it(data):
    rng, embeddings, trials = data
    cohort = unit_rows(rng, 20)
    scores = score_trials(embeddings, trials)
    np.testing.assert_allclose(
        as_norm(scores, embeddings, trials, cohort, top_k=300), as_norm(scores, embeddings, trials, cohort, top_k=20)
    )


def test_chunked_cohort_statistics_equal_one_pass(data, monkeypatch):
    rng, embeddings, _ = data
    vectors, cohort = np.stack(list(embeddings.values())), unit_rows(rng, 20)
    mean, std = cohort_statistics(vectors, cohort, 5)
    monkeypatch.setattr(scoring, "_CHUNK_ELEMENTS", 3 * 20)  # three vectors at a time
    chunked = cohort_statistics(vectors, cohort, 5)
    # Equal to float32 rounding: a chunk's matrix product may sum in another order than the whole one's.
    np.testing.assert_allclose(chunked[0], mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(chunked[1], std, rtol=1e-6, atol=1e-7)


def test_as_norm_refuses_bad_inputs(data):
    rng, embeddings, trials = data
    scores = score_trials(embeddings, trials)
    cohort = unit_rows(rng, 20)
    with pytest.raises(EvaluationError, match="top_k >= 2"):
        as_norm(scores, embeddings, trials, cohort, top_k=1)
    with pytest.raises(EvaluationError, match="8 dimensions, embeddings 16"):
        as_norm(scores, embeddings, trials, cohort[:, :8], top_k=5)
    with pytest.raises(EvaluationError, match="cohort vectors are not L2-normalised"):
        as_norm(scores, embeddings, trials, 3 * cohort, top_k=5)
    with pytest.raises(EvaluationError, match="60 trials but scores of shape"):
        as_norm(scores[:-1], embeddings, trials, cohort, top_k=5)
