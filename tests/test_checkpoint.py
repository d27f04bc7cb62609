from __future__ import annotations

import numpy as np
import pytest
import torch

from spkft.core.checkpoint import embedding_checkpoint, infer_config, load_model
from spkft.core.errors import CheckpointError
from spkft.core.model import VARIANTS, build_model

TINY = {"tiny_w26s2ep2_m8": "eres2netv2", "tiny_w24s4ep4_m8": "eres2netv2_w24s4ep4"}


def expected_output(reference_dir, name):
    features = torch.from_numpy(np.load(reference_dir / f"{name}.input.npy"))
    return features, np.load(reference_dir / f"{name}.expected.npy")


@pytest.mark.parametrize("name", sorted(TINY))
def test_upstream_tiny_checkpoints_load_with_inferred_variant(name, reference_dir):
    loaded = load_model(reference_dir / f"{name}.ckpt")
    assert loaded.variant == TINY[name]
    assert loaded.config.m_channels == 8
    assert not loaded.model.training
    features, expected = expected_output(reference_dir, name)
    with torch.no_grad():
        assert np.abs(loaded.model(features).numpy() - expected).max() < 1e-4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_size_variants_are_inferred_from_shapes(variant):
    name, config = infer_config(build_model(variant).state_dict())
    assert name == variant
    assert config == VARIANTS[variant]


def test_module_prefix_is_stripped(reference_dir, tmp_path):
    state = torch.load(reference_dir / "tiny_w24s4ep4_m8.ckpt", weights_only=True)
    path = tmp_path / "ddp.ckpt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    loaded = load_model(path)
    features, expected = expected_output(reference_dir, "tiny_w24s4ep4_m8")
    with torch.no_grad():
        assert np.abs(loaded.model(features).numpy() - expected).max() < 1e-4


def test_spkft_checkpoint_round_trip(tmp_path):
    model = build_model("eres2netv2", m_channels=8, embedding_size=32).eval()
    path = tmp_path / "spkft.ckpt"
    torch.save(embedding_checkpoint(model, "eres2netv2", epoch=3), path)
    loaded = load_model(path)
    assert loaded.variant == "eres2netv2"
    assert loaded.config == model.config
    assert loaded.checkpoint["epoch"] == 3
    x = torch.randn(2, 30, 80)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_named_variant_takes_sizes_from_the_file(reference_dir):
    loaded = load_model(reference_dir / "tiny_w24s4ep4_m8.ckpt", variant="eres2netv2_w24s4ep4")
    assert loaded.config.m_channels == 8


def test_wrong_variant_names_the_offending_keys(reference_dir):
    with pytest.raises(CheckpointError) as info:
        load_model(reference_dir / "tiny_w24s4ep4_m8.ckpt", variant="eres2netv2")
    message = str(info.value)
    assert "does not fit ERes2NetV2 variant 'eres2netv2'" in message
    assert "layer1.0.conv1.weight (12, 8, 1, 1) vs model (6, 8, 1, 1)" in message
    assert "unexpected: layer1.0.convs.2.weight" in message


def test_missing_keys_are_named(reference_dir, tmp_path):
    state = torch.load(reference_dir / "tiny_w26s2ep2_m8.ckpt", weights_only=True)
    del state["fuse34.local_att.0.bias"]
    path = tmp_path / "cut.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing: fuse34\.local_att\.0\.bias"):
        load_model(path)


class Payload:
    """Stands for arbitrary pickled code that weights_only loading must refuse."""


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a PyTorch checkpoint"),
        (b"path,speaker\nx.wav,a\n", "not a PyTorch checkpoint"),
        (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    ],
)
def test_non_checkpoint_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "object.ckpt"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load.*Payload"):
        load_model(path)


def test_other_containers_and_missing_files(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="found list"):
        load_model(tmp_path / "list.ckpt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="missing key 'conv1.weight'"):
        load_model(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "absent.ckpt")


def test_a_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file$"):
        load_model(tmp_path)
    (tmp_path / "best.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"a run folder's best checkpoint is {tmp_path / 'best.ckpt'}$"):
        load_model(tmp_path)
