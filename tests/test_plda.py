"""PLDA: the two-covariance fit, its log-likelihood ratio, the bilinear form and unlabelled adaptation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spkft.core.errors import AdaptationError, CheckpointError
from spkft.core.plda import Plda, adapt_plda, fit_plda, fit_two_covariance


def random_covariance(rng, k, scale):
    a = rng.normal(size=(k, k))
    return scale * (a @ a.T / k + 0.2 * np.eye(k))


def gaussian_speakers(rng, speakers, per_speaker, between, within, mean=None):
    k = len(between)
    mean = np.zeros(k) if mean is None else mean
    centres = rng.multivariate_normal(mean, between, size=speakers)
    x = np.concatenate([rng.multivariate_normal(c, within, size=per_speaker) for c in centres])
    labels = [f"s{i}" for i in range(speakers) for _ in range(per_speaker)]
    return x, labels


def covariances(plda: Plda) -> tuple[np.ndarray, np.ndarray]:
    """(between, within) in the model's space, from the scoring transform and psi."""
    back = np.linalg.inv(plda.transform)
    return back @ np.diag(plda.psi) @ back.T, back @ back.T


def log_normal(z, mean, covariance):
    d = z - mean
    _, logdet = np.linalg.slogdet(covariance)
    return -0.5 * (logdet + d @ np.linalg.solve(covariance, d) + len(z) * np.log(2 * np.pi))


@pytest.fixture(scope="module")
def embeddings_and_labels():
    """Speakers in 24 dimensions, unit-normalised as an embedder gives them."""
    rng = np.random.default_rng(0)
    x, labels = gaussian_speakers(rng, 60, 6, random_covariance(rng, 24, 1.0), random_covariance(rng, 24, 0.3),
                                  mean=rng.normal(size=24) * 2)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_em_recovers_the_generating_covariances():
    rng = np.random.default_rng(1)
    between, within = random_covariance(rng, 3, 2.0), random_covariance(rng, 3, 0.5)
    x, labels = gaussian_speakers(rng, 1500, 6, between, within, mean=np.array([1.0, -2.0, 0.5]))
    # Uneven speakers: drop some recordings so counts differ, which the EM must handle.
    keep = np.array([i % 6 < 6 - (i // 6) % 4 for i in range(len(x))])
    mean, fitted_between, fitted_within = fit_two_covariance(x[keep], [l for l, k in zip(labels, keep) if k])
    assert np.linalg.norm(fitted_within - within) / np.linalg.norm(within) < 0.05
    assert np.linalg.norm(fitted_between - between) / np.linalg.norm(between) < 0.12
    np.testing.assert_allclose(mean, [1.0, -2.0, 0.5], atol=0.15)


def test_llr_equals_the_direct_gaussian_computation(embeddings_and_labels):
    x, labels = embeddings_and_labels
    plda = fit_plda(x, labels, lda_dim=8)
    between, within = covariances(plda)
    total = between + within
    y = plda.preprocess(x[:6])
    for a, b in [(0, 1), (0, 5), (2, 3), (4, 4)]:
        z = np.concatenate([y[a], y[b]])
        means = np.concatenate([plda.mean, plda.mean])
        same = np.block([[total, between], [between, total]])
        different = np.block([[total, np.zeros_like(total)], [np.zeros_like(total), total]])
        direct = log_normal(z, means, same) - log_normal(z, means, different)
        assert plda.llr(x[[a]], x[[b]])[0] == pytest.approx(direct, abs=1e-8)


def test_llr_separates_speakers_and_is_symmetric(embeddings_and_labels):
    x, labels = embeddings_and_labels
    plda = fit_plda(x, labels)
    scores = plda.llr_matrix(x, x)
    np.testing.assert_allclose(scores, scores.T, atol=1e-4)  # the enrolled side is kept in float32
    same = np.equal.outer(labels, labels)
    off_diagonal = ~np.eye(len(x), dtype=bool)
    assert scores[same & off_diagonal].mean() > 0 > scores[~same].mean()


def test_identify_terms_equal_brute_force_scoring(embeddings_and_labels):
    x, labels = embeddings_and_labels
    plda = fit_plda(x, labels, lda_dim=16)
    enrolled, queries = x[:40], x[40:50]
    weights, terms = plda.enrolled_terms(enrolled)
    for query in queries:
        projected, own = plda.query_terms(query)
        fast = weights @ projected + terms + own
        brute = plda.llr(enrolled, np.repeat(query[None, :], len(enrolled), axis=0))
        np.testing.assert_allclose(fast, brute, rtol=1e-4, atol=1e-3)


def test_unlabelled_adaptation_moves_mean_and_covariances_as_the_formula_says(embeddings_and_labels):
    x, labels = embeddings_and_labels
    plda = fit_plda(x, labels, lda_dim=6)
    rng = np.random.default_rng(2)
    # In-domain recordings: the training ones shifted and stretched along one direction.
    shifted = x + 0.05 + rng.normal(size=(len(x), 1)) * 0.3 * rng.normal(size=(1, x.shape[1]))
    adapted = adapt_plda(plda, shifted, source="in-domain")
    y = plda.preprocess(shifted)
    np.testing.assert_allclose(adapted.mean, y.mean(axis=0), atol=1e-12)
    assert adapted.adapted_recordings == len(x) and adapted.lda is plda.lda

    between, within = covariances(plda)
    new_between, new_within = covariances(adapted)
    # The excess splits 30:70 between within- and between-speaker covariance, direction by direction.
    np.testing.assert_allclose((new_within - within) * 0.7, (new_between - between) * 0.3, atol=1e-8)
    # Where the in-domain data varies more than the model expects, the adapted total matches it.
    offset = y.mean(axis=0) - plda.mean
    variance = np.cov(y, rowvar=False, bias=True) + np.outer(offset, offset)
    whiten = plda.transform / np.sqrt(1 + plda.psi)[:, None]
    values, directions = np.linalg.eigh(whiten @ variance @ whiten.T)
    adapted_total = whiten @ (new_between + new_within) @ whiten.T
    for value, direction in zip(values, directions.T):
        expected = max(value, 1.0)
        assert direction @ adapted_total @ direction == pytest.approx(expected, rel=1e-6)
    assert values.max() > 1.5  # the stretch made at least one direction exceed the model


def test_round_trip_through_a_checkpoint_entry(embeddings_and_labels, tmp_path):
    x, labels = embeddings_and_labels
    plda = adapt_plda(fit_plda(x, labels, source="train.csv"), x[:50], source="mine/")
    torch.save({"plda": plda.to_dict()}, tmp_path / "p.ckpt")
    restored = Plda.from_dict(torch.load(tmp_path / "p.ckpt", weights_only=True)["plda"])
    np.testing.assert_array_equal(restored.llr(x[:5], x[5:10]), plda.llr(x[:5], x[5:10]))
    assert (restored.source, restored.adapted_source, restored.adapted_recordings) == ("train.csv", "mine/", 50)
    broken = plda.to_dict() | {"psi": torch.tensor([float("nan")] * plda.dim, dtype=torch.float64)}
    with pytest.raises(CheckpointError, match="malformed PLDA record"):
        Plda.from_dict(broken)


@pytest.mark.parametrize("labels, message", [
    (None, "no speaker labels"),
    (["a", "b", "a", "b"], "2 speaker"),
    (["a", "b", "c", "d"], "0 speaker"),
])
def test_too_little_to_fit_is_a_clear_error(labels, message):
    x = np.random.default_rng(3).normal(size=(4, 8))
    with pytest.raises(AdaptationError, match=message):
        fit_plda(x, labels if labels is not None else None)
