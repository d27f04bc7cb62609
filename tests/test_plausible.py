"""Valid but implausible training values: each warned about with its reason, never refused."""

from __future__ import annotations

import pytest

from spkft.core.train import load_config
from spkft.core.train.memory import BatchSuggestion
from spkft.core.train.plausible import data_batch, implausible

PRETRAINED = {"model.init": "eres2netv2_w24s4ep4"}


@pytest.mark.parametrize("overrides, expected", [
    ({"optim.optimizer": "adamw", "optim.lr": 5.0}, "far above AdamW's usual range"),
    ({"optim.optimizer": "sgd", "optim.lr": 0.05} | PRETRAINED, "erases what the checkpoint knows"),
    ({"optim.optimizer": "sgd", "optim.lr": 5.0}, "over 5 times the 0.2"),
    ({"optim.optimizer": "adamw", "optim.lr": 1e-8}, "barely move"),
])
def test_an_implausible_learning_rate_is_warned_about(overrides, expected):
    warnings = implausible(load_config(None, overrides))
    assert list(warnings) == ["optim.lr"] and expected in warnings["optim.lr"]


@pytest.mark.parametrize("overrides", [
    {"optim.optimizer": "adamw", "optim.lr": 1e-3} | PRETRAINED,
    {"optim.optimizer": "sgd", "optim.lr": 0.2},
    {"optim.optimizer": "sgd", "optim.lr": 0.01} | PRETRAINED,
])
def test_the_recipes_learning_rates_pass(overrides):
    assert implausible(load_config(None, overrides)) == {}


def test_a_batch_is_checked_against_the_data_and_the_memory():
    config = load_config(None, {"run.batch_size": 99_999})
    warning = implausible(config, training_recordings=48)["run.batch_size"]
    assert "99999 crops per step from 48 training recordings" in warning and "8 fits the data" in warning
    memory = BatchSuggestion(batch_size=64, free_bytes=16 * 2**30, bytes_per_crop=67 * 2**20, state_bytes=2**30)
    warning = implausible(config, memory=memory)["run.batch_size"]
    assert "need about 6543.9 GiB and 16.0 GiB is free" in warning
    assert implausible(load_config(None, {"run.batch_size": 8}), 48, memory) == {}


def test_the_data_batch_leaves_four_steps_per_pass():
    assert [data_batch(n) for n in (3, 16, 48, 1000, 100_000)] == [2, 4, 8, 128, 16384]
