"""Backend adaptation maths on synthetic embeddings: each method against a by-hand numpy version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spkft.core.adaptation import (
    DEFAULT_SHRINKAGE,
    MIN_COVARIANCE_SAMPLES,
    MIN_MEAN_RECORDINGS,
    Adaptation,
    AdaptedModel,
    choose_method,
    fit_adaptation,
    resolve_method,
)
from spkft.core.errors import AdaptationError, CheckpointError
from spkft.core.model import build_model

DIM = 24


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def domain(speakers: int, per_speaker: int, dim: int = DIM, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Normalised embeddings of a shifted, stretched domain: speaker centres plus session noise."""
    rng = np.random.default_rng(seed)
    offset = 2.0 * rng.standard_normal(dim)  # the domain's mean direction
    stretch = np.linspace(0.2, 3.0, dim)  # unequal variance across directions
    centres = rng.standard_normal((speakers, dim))
    rows = [offset + centres[s] + 0.5 * stretch * rng.standard_normal(dim)
            for s in range(speakers) for _ in range(per_speaker)]
    labels = [f"spk{s}" for s in range(speakers) for _ in range(per_speaker)]
    return unit(np.array(rows)).astype(np.float32), labels


def inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    """By SVD, not eigh: an independent route to the symmetric inverse square root."""
    u, s, _ = np.linalg.svd(matrix)
    return u @ np.diag(s ** -0.5) @ u.T


def shrunk(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    target = np.trace(covariance) / len(covariance)
    return (1 - shrinkage) * covariance + shrinkage * target * np.eye(len(covariance))


def by_hand(method: str, x: np.ndarray, labels: list[str], shrinkage: float) -> np.ndarray:
    """Adapted, normalised embeddings computed from the textbook definitions in float64."""
    x = unit(x.astype(np.float64))
    centred = x - x.mean(axis=0)
    if method == "center":
        return unit(centred)
    if method == "whiten":
        covariance = np.cov(x, rowvar=False)
    else:
        groups = {s: x[[i for i, t in enumerate(labels) if t == s]] for s in set(labels)}
        repeated = [g for g in groups.values() if len(g) >= 2]
        covariance = sum(np.cov(g, rowvar=False) * (len(g) - 1) for g in repeated)
        covariance /= sum(len(g) - 1 for g in repeated)
    return unit(centred @ inverse_sqrt(shrunk(covariance, shrinkage)))


@pytest.mark.parametrize("method", ["center", "whiten", "wccn"])
@pytest.mark.parametrize("shrinkage", [0.0, DEFAULT_SHRINKAGE, 0.7])
def test_scores_change_exactly_as_computed_by_hand(method, shrinkage):
    x, labels = domain(speakers=6, per_speaker=20)
    adaptation, _ = fit_adaptation(x, labels, method=method, shrinkage=shrinkage)
    adapted = adaptation.apply(x)
    expected = by_hand(method, x, labels, shrinkage)
    assert adapted.shape == x.shape and adapted.dtype == np.float32
    np.testing.assert_allclose(adapted, expected, atol=2e-5)
    scores, expected_scores = adapted @ adapted.T, expected @ expected.T
    np.testing.assert_allclose(scores, expected_scores, atol=2e-5)
    # The adaptation matters: the domain's offset made every raw pair look alike.
    assert np.abs(scores - x @ x.T).max() > 0.3
    assert adaptation.recordings == 120 and adaptation.speakers == 6 and adaptation.shrinkage == shrinkage


def test_without_shrinkage_whitening_makes_the_covariance_the_identity():
    x, labels = domain(speakers=6, per_speaker=20)
    whiten, _ = fit_adaptation(x, None, method="whiten", shrinkage=0.0)
    y = (unit(x) - whiten.mean) @ whiten.transform
    covariance = np.cov(y, rowvar=False)
    np.testing.assert_allclose(covariance / covariance.diagonal().mean(), np.eye(DIM), atol=1e-4)
    wccn, _ = fit_adaptation(x, labels, method="wccn", shrinkage=0.0)
    y = (unit(x) - wccn.mean) @ wccn.transform
    within = sum(np.cov(y[i : i + 20], rowvar=False) for i in range(0, 120, 20))
    np.testing.assert_allclose(within / within.diagonal().mean(), np.eye(DIM), atol=1e-4)
    np.testing.assert_allclose(wccn.transform, wccn.transform.T, atol=1e-6)  # symmetric


def test_full_shrinkage_is_centring_and_center_is_the_identity():
    x, labels = domain(speakers=6, per_speaker=20)
    center, _ = fit_adaptation(x, labels, method="center")
    assert np.array_equal(center.transform, np.eye(DIM, dtype=np.float32))
    np.testing.assert_allclose(center.mean, unit(x.astype(np.float64)).mean(axis=0), atol=1e-7)
    for method in ("whiten", "wccn"):
        adaptation, _ = fit_adaptation(x, labels, method=method, shrinkage=1.0)
        np.testing.assert_allclose(adaptation.transform, np.eye(DIM), atol=1e-6)
        np.testing.assert_allclose(adaptation.apply(x), center.apply(x), atol=1e-6)


def test_a_few_hundred_embeddings_in_192_dims_need_shrinkage():
    x, labels = domain(speakers=6, per_speaker=20, dim=192)  # 120 recordings: a rank-119 covariance
    with pytest.raises(AdaptationError, match=r"total covariance is singular \(rank 119 of 192\); use a shrinkage"):
        fit_adaptation(x, None, method="whiten", shrinkage=0.0)
    adaptation, _ = fit_adaptation(x, labels, method="whiten")
    assert adaptation.transform.shape == (192, 192) and np.isfinite(adaptation.transform).all()
    np.testing.assert_allclose(adaptation.apply(x), by_hand("whiten", x, labels, DEFAULT_SHRINKAGE), atol=2e-5)


def test_input_scale_does_not_matter_and_dimension_is_kept():
    x, labels = domain(speakers=6, per_speaker=20)
    adaptation, _ = fit_adaptation(x, labels)
    np.testing.assert_allclose(adaptation.apply(3.0 * x[:5]), adaptation.apply(x[:5]), atol=1e-6)
    assert adaptation.apply(x[0]).shape == (DIM,)
    with pytest.raises(ValueError, match="dimension 23"):
        adaptation.apply(x[:, :23])


@pytest.mark.parametrize("embeddings, shrinkage, message", [
    (np.tile(unit(np.ones(DIM)), (60, 1)), 0.5, "do not vary"),
    (domain(6, 10)[0], 1.5, r"shrinkage must lie in \[0, 1\]"),
    (np.full((60, DIM), np.nan), 0.2, "NaN"),
], ids=["identical embeddings", "shrinkage above 1", "NaN"])
def test_unusable_inputs_are_clear_errors(embeddings, shrinkage, message):
    with pytest.raises(AdaptationError, match=message):
        fit_adaptation(embeddings, None, method="whiten", shrinkage=shrinkage)


def speakers(*counts: int) -> list[str]:
    return [f"s{i}" for i, n in enumerate(counts) for _ in range(n)]


# recordings, labels -> auto's pick, words its reason must hold
AUTO_CASES = [
    (60, speakers(*[10] * 6), "wccn", "labels: wccn suppresses within-speaker variation"),
    (56, speakers(28, 28), "wccn", "labels: wccn"),
    (300, speakers(*[2] * 50, *[1] * 200), "wccn", "labels: wccn"),  # 50 within-speaker degrees of freedom
    (60, None, "whiten", "no labels: whiten evens out the domain's variation"),
    (60, speakers(*[1] * 60), "whiten", "labels too few for wccn (0 speaker(s) with 2 or more recordings"),
    (60, speakers(60), "whiten", "labels too few for wccn (1 speaker(s) with 2 or more recordings"),
    (50, speakers(*[5] * 10), "whiten", "labels too few for wccn (40 within-speaker degrees of freedom"),
    (49, None, "center", "too few recordings for a covariance (49, 50 needed): center removes"),
    (49, speakers(*[7] * 7), "center", "too few recordings for a covariance"),
    (10, None, "center", "center removes the domain's mean embedding"),
]


@pytest.mark.parametrize("recordings, labels, method, reason", AUTO_CASES)
def test_auto_picks_the_strongest_method_the_data_supports(recordings, labels, method, reason):
    picked, why = choose_method(recordings, labels)
    assert picked == method and reason in why
    assert "\n" not in why


def test_auto_refuses_fewer_recordings_than_a_mean_needs():
    with pytest.raises(AdaptationError, match=f"9 recording\\(s\\), at least {MIN_MEAN_RECORDINGS} needed"):
        choose_method(9, None)


@pytest.mark.parametrize("method, recordings, labels, message", [
    ("whiten", 49, None, f"cannot fit whiten: 49 recordings, at least {MIN_COVARIANCE_SAMPLES} needed"),
    ("wccn", 60, None, "cannot fit wccn: no speaker labels"),
    ("wccn", 12, speakers(4, 4, 4), "cannot fit wccn: 9 within-speaker degrees of freedom"),
    ("wccn", 60, speakers(59, 1), "cannot fit wccn: 1 speaker(s) with 2 or more recordings, at least 2 needed"),
    ("center", 3, None, "cannot fit center: 3 recording(s), at least 10 needed"),
    ("lda", 60, None, "unknown adaptation method 'lda'"),
])
def test_an_explicit_method_the_data_cannot_support_is_refused(method, recordings, labels, message):
    with pytest.raises(AdaptationError) as caught:
        resolve_method(method, recordings, labels)
    assert message in str(caught.value)


def test_explicit_methods_say_they_were_asked_for():
    assert resolve_method("center", 10, None) == ("center", "asked for: center removes the domain's mean embedding")


def test_checkpoint_dict_round_trip_through_a_weights_only_load(tmp_path):
    x, labels = domain(speakers=6, per_speaker=20)
    adaptation, _ = fit_adaptation(x, labels, method="wccn", source="csv:data/list.csv")
    torch.save({"adaptation": adaptation.to_dict()}, tmp_path / "a.ckpt")
    loaded = Adaptation.from_dict(torch.load(tmp_path / "a.ckpt", weights_only=True)["adaptation"])
    assert (loaded.method, loaded.recordings, loaded.speakers, loaded.shrinkage, loaded.source) == (
        "wccn", 120, 6, DEFAULT_SHRINKAGE, "csv:data/list.csv")
    assert np.array_equal(loaded.mean, adaptation.mean) and np.array_equal(loaded.transform, adaptation.transform)
    unlabelled, _ = fit_adaptation(x, None, method="center")
    assert Adaptation.from_dict(unlabelled.to_dict()).speakers is None
    assert unlabelled.describe() == "center on 120 recordings" and loaded.describe() == "wccn on 120 recordings of 6 speakers"


@pytest.mark.parametrize("damage", [
    lambda record: record.pop("transform"),
    lambda record: record.update(method="lda"),
    lambda record: record.update(transform=record["transform"][:3]),
    lambda record: record.update(mean=[0.0] * DIM),
], ids=["missing transform", "unknown method", "wrong shape", "not a tensor"])
def test_a_malformed_record_is_a_checkpoint_error(damage):
    record = fit_adaptation(*domain(6, 10), method="center")[0].to_dict()
    damage(record)
    with pytest.raises(CheckpointError, match="malformed adaptation record"):
        Adaptation.from_dict(record)


def test_adapted_model_is_the_model_then_the_adaptation():
    torch.manual_seed(0)
    model = build_model("eres2netv2", m_channels=8, num_blocks=(1, 1, 1, 1)).eval()
    x, labels = domain(speakers=6, per_speaker=20, dim=192)
    adaptation, _ = fit_adaptation(x, labels, method="wccn")
    wrapped = AdaptedModel(model, adaptation).eval()
    assert wrapped.config is model.config and wrapped.embedding_size == 192
    features = torch.randn(3, 120, 80)
    with torch.inference_mode():
        bare, adapted = model(features).numpy(), wrapped(features).numpy()
    np.testing.assert_allclose(unit(adapted), adaptation.apply(bare), atol=1e-5)
    with pytest.raises(CheckpointError, match="adaptation is for 24-dim embeddings"):
        AdaptedModel(model, fit_adaptation(*domain(6, 10), method="center")[0])
