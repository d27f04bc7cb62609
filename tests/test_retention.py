"""Keeping what the pretrained model knew while fine-tuning: rehearsal batches, distillation toward
the starting model's embeddings, and how recipes and ``auto`` choose between them."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from spkft.core.checkpoint import read_checkpoint
from spkft.core.errors import SpkftError
from spkft.core.model import build_model
from spkft.core.train import EpochEnded, Trainer, load_config
from spkft.core.train.dataset import MixedEpochSampler
from spkft.core.train.recipes import DISTILL_WEIGHT, REHEARSAL_FRACTION, pick_recipe, recipe_values, resolve_recipe
from spkft.core.train.recipes import DataSummary
from spkft.core.train.trainer import REHEARSAL_PREFIX, distillation_loss

from data_helpers import write_closed_set

TINY = {"model.variant": "eres2netv2", "model.args": {"m_channels": 8, "num_blocks": [1, 1, 1, 1]}}


@pytest.fixture(scope="module")
def fsdd_lists(fsdd_dir, tmp_path_factory):
    return write_closed_set(fsdd_dir, tmp_path_factory.mktemp("fsdd"), train_takes=4, val_takes=(40, 41), val_digits=4)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A starting checkpoint of the tiny network, as fine-tuning loads one."""
    from spkft.core.checkpoint import embedding_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base.ckpt"
    torch.save(embedding_checkpoint(build_model("eres2netv2", m_channels=8, num_blocks=[1, 1, 1, 1]), "eres2netv2"), path)
    return path


@pytest.fixture(scope="module")
def rehearsal_list(librispeech_dir, tmp_path_factory):
    """Five LibriSpeech speakers, each one recording: a base domain to rehearse."""
    lines = (librispeech_dir / "manifest.csv").read_text().splitlines()[1:6]
    path = tmp_path_factory.mktemp("rehearsal") / "rehearsal.csv"
    path.write_text("path,speaker\n" + "".join(f"{librispeech_dir / line.split(',')[0]},{line.split(',')[1]}\n"
                                               for line in lines))
    return path


def config(tmp_path, train, val, **overrides):
    values = {
        "data.train": train, "data.val": val, **TINY,
        "run.epochs": 1, "run.batch_size": 8, "run.steps_per_epoch": 2, "run.patience": None,
        "run.output_dir": tmp_path / "run", "run.precision": "fp32", "run.channels_last": False,
        "run.num_workers": 0, "augment.crop_seconds": 0.5, "optim.lr": 0.05,
    }
    return load_config(None, values | overrides)


# ------------------------------------------------------------------------------------ rehearsal
@pytest.mark.parametrize("fraction, batch, expected", [(0.25, 32, 8), (0.5, 6, 3), (0.01, 8, 1), (0.99, 8, 7)])
def test_every_batch_holds_the_configured_share_of_rehearsed_items(fraction, batch, expected):
    own, extra = 40, 100
    sampler = MixedEpochSampler(own, extra, fraction, batch, batches_per_rank=12, seed=3)
    assert MixedEpochSampler.rehearsed_per_batch(fraction, batch) == expected
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler) == 12 * batch
        batches = [order[i:i + batch] for i in range(0, len(order), batch)]
        assert [sum(i >= own for i in b) for b in batches] == [expected] * 12
        assert all(0 <= i < own + extra for i in order)
    # The user's items are walked through whole before any repeats.
    counts = Counter(i for i in order if i < own)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_ranks_deal_whole_batches_and_share_no_crop():
    per_rank = [list(MixedEpochSampler(50, 50, 0.25, 8, batches_per_rank=4, seed=1, rank=r, world=2)) for r in (0, 1)]
    for order in per_rank:
        assert [sum(i >= 50 for i in order[k:k + 8]) for k in range(0, 32, 8)] == [2, 2, 2, 2]
    assert not set(per_rank[0]) & set(per_rank[1])


def test_rehearsed_speakers_are_extra_classes_of_the_head_in_every_batch(tmp_path, fsdd_lists, tiny_base,
                                                                         rehearsal_list):
    trainer = Trainer(config(tmp_path, *fsdd_lists, **{"model.init": tiny_base, "data.rehearsal": rehearsal_list,
                                                        "data.rehearsal_fraction": 0.25}))
    trainer.setup()
    own = len(trainer.speakers)
    assert own == 6 and len(trainer.rehearsal_speakers) == 5
    assert all(s.startswith(REHEARSAL_PREFIX) for s in trainer.rehearsal_speakers)
    assert trainer.head.weight.shape[0] == own + 5
    # Each rehearsed speaker's row starts at the starting model's embedding of the speaker, at the
    # length of the user's randomly started rows.
    from spkft.core.checkpoint import load_model
    from spkft.core.embedding import Embedder
    from spkft.core.evaluate import embed_recordings

    lengths = trainer.head.weight.detach().norm(dim=1)
    assert torch.allclose(lengths[own:], lengths[:own].mean(), rtol=1e-4)
    first = [dataclasses.replace(r, stop_seconds=min(r.stop_seconds or 99.0, 4.0)) for r in trainer.rehearsed]
    vectors = embed_recordings(Embedder(load_model(tiny_base).model), first)
    for row, recording in zip(trainer.head.weight.detach()[own:], first):  # one recording per speaker here
        assert torch.nn.functional.cosine_similarity(row, torch.from_numpy(vectors[recording.utt_id]), dim=0) > 0.999
    for features, labels in trainer.loader:
        assert features.shape[0] == 8
        assert int((labels >= own).sum()) == 2  # 25 % of 8
        assert labels.max() < own + 5
    trainer.train()
    saved = read_checkpoint(tmp_path / "run" / "best.ckpt")
    assert saved["speakers"] == trainer.speakers  # the user's speakers: eval's warning compares against these
    assert saved["rehearsal_speakers"] == trainer.rehearsal_speakers
    trainer.cleanup()


# --------------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("frozen", ["none", "early", "encoder"])
def test_the_distillation_term_is_zero_at_the_starting_weights_and_grows_as_they_move(tmp_path, fsdd_lists, tiny_base,
                                                                                      frozen):
    trainer = Trainer(config(tmp_path, *fsdd_lists, **{"model.init": tiny_base, "freeze.distill": 1.0,
                                                        "freeze.stages": frozen}))
    trainer.setup()
    trainer._set_train_mode(head_only=False)  # as every step of the encoder's phase runs them
    model, teacher = trainer.model, trainer.teacher
    statistics = [b.clone() for b in teacher.buffers() if b.is_floating_point()]  # running means and variances
    features = torch.randn(4, 60, 80)
    with torch.no_grad():
        assert distillation_loss(model(features), teacher(features)).item() == pytest.approx(0.0, abs=1e-6)
        losses = []
        direction = [torch.randn_like(p) for p in model.parameters()]
        for step in (0.002, 0.01, 0.05):
            for p, d in zip(model.parameters(), direction):
                p.add_(step * d)
            losses.append(distillation_loss(model(features), teacher(features)).item())
    assert 0 < losses[0] < losses[1] < losses[2]
    # The starting model is never trained, and its running statistics never move.
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip((b for b in teacher.buffers() if b.is_floating_point()), statistics))
    assert distillation_loss(torch.ones(2, 3), 5 * torch.ones(2, 3)).item() == pytest.approx(0.0, abs=1e-6)
    trainer.cleanup()


def test_distillation_holds_the_embeddings_nearer_the_starting_model(tmp_path, fsdd_lists, tiny_base):
    def drift(weight: float) -> float:
        run = tmp_path / f"distill-{weight}"
        trainer = Trainer(config(run, *fsdd_lists, **{"model.init": tiny_base, "freeze.distill": weight,
                                                       "run.steps_per_epoch": 4}))
        trainer.setup()
        start = Trainer._frozen_copy(trainer.model).eval()
        trainer.train()
        trainer.model.eval()
        torch.manual_seed(1)
        features = torch.randn(6, 80, 80)
        with torch.no_grad():
            moved = distillation_loss(trainer.model(features), start(features)).item()
        trainer.cleanup()
        assert (trainer.teacher is not None) == (weight > 0)
        return moved

    assert drift(100.0) < drift(0.0)


# ---------------------------------------------------------------------------------- the recipes
def test_recipes_hold_the_old_domain_by_rehearsal_when_given_else_by_distillation():
    for name in ("linear-probe", "partial", "full"):
        plain = recipe_values(name, pretrained=True)
        assert plain["freeze.distill"] == DISTILL_WEIGHT and "data.rehearsal_fraction" not in plain
        rehearsing = recipe_values(name, pretrained=True, rehearsal=True)
        assert rehearsing["freeze.distill"] == 0 and rehearsing["data.rehearsal_fraction"] == REHEARSAL_FRACTION
    assert recipe_values("full", pretrained=False)["freeze.distill"] == 0


def test_auto_says_which_way_it_holds_the_old_domain_and_why():
    data = DataSummary(speakers=12, recordings=300, hours=0.4)
    without = pick_recipe(data, pretrained=True)
    given = pick_recipe(data, pretrained=True, rehearsal=True)
    assert without.name == given.name == "full"
    assert "no data.rehearsal" in without.line() and "held toward the pretrained model" in without.line()
    assert f"{REHEARSAL_FRACTION:.0%} of every batch rehearsed from data.rehearsal" in given.line()
    assert "rehears" not in pick_recipe(data, pretrained=False).line()
    small = pick_recipe(DataSummary(speakers=3, recordings=30, hours=0.02), pretrained=True, rehearsal=True)
    assert small.name == "linear-probe" and "rehearsed" in small.reason


def test_auto_resolves_to_the_knobs_of_what_was_given(fsdd_lists, tiny_base, rehearsal_list, tmp_path):
    train, val = fsdd_lists
    base = {"data.train": train, "data.val": val, "model.init": tiny_base, "recipe": "auto"}
    plain, choice = resolve_recipe(load_config(None, base))
    assert plain.freeze.distill == DISTILL_WEIGHT and plain.data.rehearsal is None
    assert "held toward" in choice.reason
    rehearsing, choice = resolve_recipe(load_config(None, base | {"data.rehearsal": rehearsal_list}))
    assert rehearsing.freeze.distill == 0 and rehearsing.data.rehearsal_fraction == REHEARSAL_FRACTION
    assert "rehearsed" in choice.reason
    mine, _ = resolve_recipe(load_config(None, base | {"freeze.distill": 2.5}))
    assert mine.freeze.distill == 2.5  # a value the user sets wins over the recipe's
    with pytest.raises(Exception, match="freeze.distill pulls toward a pretrained model's embeddings"):
        load_config(None, {"freeze.distill": 1.0})
    with pytest.raises(Exception, match="data.rehearsal: .* does not exist"):
        from spkft.core.train import check_paths
        check_paths(load_config(None, base | {"data.rehearsal": tmp_path / "nowhere"}))


# ------------------------------------------------------------------------------- config, resume
def test_the_knobs_round_trip_through_the_runs_config_and_resume(tmp_path, fsdd_lists, tiny_base, rehearsal_list):
    overrides = {"model.init": tiny_base, "data.rehearsal": rehearsal_list, "data.rehearsal_fraction": 0.5,
                 "freeze.distill": 3.0, "run.epochs": 2}
    stop = __import__("threading").Event()

    def stop_after_first_epoch(event):
        if isinstance(event, EpochEnded):
            stop.set()

    cut = config(tmp_path, *fsdd_lists, **overrides)
    assert Trainer(cut, sink=stop_after_first_epoch, stop=stop).run().reason == "cancelled"
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved == cut
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data"]["rehearsal_fraction"] == 0.5 and stored["freeze"]["distill"] == 3.0
    assert stored["data"]["rehearsal"] == str(rehearsal_list)
    resumed = Trainer(saved, resume=True)
    resumed.setup()
    assert resumed.start_epoch == 1 and resumed.teacher is not None
    assert resumed.sampler.extra_per_batch == 4
    finished = resumed.train()
    resumed.cleanup()
    assert finished.reason == "completed"
    # Resuming with other rehearsed speakers would train another head: refused.
    fewer = tmp_path / "fewer.csv"
    fewer.write_text("\n".join(rehearsal_list.read_text().splitlines()[:4]) + "\n")
    other = load_config(tmp_path / "run" / "config.yaml", {"data.rehearsal": fewer})
    trainer = Trainer(other, resume=True)
    with pytest.raises(SpkftError, match="rehearsed speakers"):
        trainer.setup()
    trainer.cleanup()
