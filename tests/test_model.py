from __future__ import annotations

import numpy as np
import pytest
import torch

from spkft.core.errors import InputTooShortError
from spkft.core.model import MIN_FRAMES, VARIANTS, build_model, count_parameters, model_config

FIXTURES = {"eres2netv2": "tiny_w26s2ep2_m8", "eres2netv2_w24s4ep4": "tiny_w24s4ep4_m8"}
PARAMS = {"eres2netv2": 17_859_632, "eres2netv2_w24s4ep4": 53_513_632}


def read_keys(path):
    rows = []
    for line in path.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        rows.append((name, tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype))
    return rows


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_keys_shapes_and_dtypes_equal_upstream(variant, reference_dir):
    model = build_model(variant)
    ours = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    assert ours == read_keys(reference_dir / f"{variant}.keys.tsv")
    assert count_parameters(model) == PARAMS[variant]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reproduces_upstream_outputs(variant, reference_dir):
    name = FIXTURES[variant]
    model = build_model(variant, m_channels=8).eval()
    state = torch.load(reference_dir / f"{name}.ckpt", weights_only=True)
    model.load_state_dict(state, strict=True)
    features = torch.from_numpy(np.load(reference_dir / f"{name}.input.npy"))
    expected = np.load(reference_dir / f"{name}.expected.npy")
    with torch.no_grad():
        output = model(features).numpy()
    assert output.shape == expected.shape == (2, 192)
    assert np.abs(output - expected).max() < 1e-4


def test_any_constructor_argument_can_be_overridden():
    config = model_config("eres2netv2_w24s4ep4", m_channels=8, embedding_size=64, num_blocks=[1, 1, 1, 1])
    assert (config.baseWidth, config.scale, config.expansion) == (24, 4, 4)
    model = build_model("eres2netv2_w24s4ep4", m_channels=8, embedding_size=64, num_blocks=[1, 1, 1, 1]).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 50, 80)).shape == (3, 64)


def test_unknown_variant_and_argument_are_named():
    with pytest.raises(ValueError, match="eres2netv3"):
        model_config("eres2netv3")
    with pytest.raises(ValueError, match="m_chanels"):
        model_config("eres2netv2", m_chanels=8)


def test_two_embedding_layers_variant_builds_and_runs():
    model = build_model("eres2netv2", m_channels=8, two_emb_layer=True).eval()
    assert "seg_2.weight" in model.state_dict()
    with torch.no_grad():
        assert model(torch.randn(2, 20, 80)).shape == (2, 192)


def test_inputs_under_nine_frames_are_rejected_not_nan():
    model = build_model("eres2netv2", m_channels=8).eval()
    with torch.no_grad():
        with pytest.raises(InputTooShortError, match="at least 9"):
            model(torch.randn(1, MIN_FRAMES - 1, 80))
        out = model(torch.randn(1, MIN_FRAMES, 80))
    assert torch.isfinite(out).all()


def test_wrong_feature_shape_is_a_clear_error():
    model = build_model("eres2netv2", m_channels=8).eval()
    with pytest.raises(ValueError, match=r"\[batch, frames, 80\]"):
        model(torch.randn(1, 40, 64))
