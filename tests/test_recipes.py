"""Fine-tuning recipes: presets of the config's knobs, and auto's choice from the data."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spkft.core.records import Recording
from spkft.core.train import ConfigError, Trainer, load_config
from spkft.core.train.recipes import (
    RECIPES,
    DataSummary,
    apply_recipe,
    pick_recipe,
    recipe_values,
    resolve_recipe,
)
from spkft.tui.cli import app
from tests.data_helpers import write_wav

# What each recipe is documented to do, in the knobs that define it.
DOCUMENTED = {
    "linear-probe": {"freeze.stages": "encoder", "freeze.head_only_epochs": 1, "head.label_smoothing": 0.1},
    "partial": {"freeze.stages": "early", "freeze.head_only_epochs": 1, "optim.optimizer": "adamw"},
    "full": {"freeze.stages": "none", "freeze.head_only_epochs": 1, "optim.optimizer": "adamw",
             "head.stats_dropout": 0.0},
}


def _get(config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


@pytest.fixture
def pretrained(tmp_path, tiny_checkpoint):
    return {"data.train": str(tmp_path), "model.init": str(tiny_checkpoint)}


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_resolves_to_its_documented_knobs(name, pretrained):
    config, choice = resolve_recipe(load_config(None, pretrained | {"recipe": name}))
    assert choice.name == name and not choice.auto
    assert config.recipe == name
    for dotted, value in recipe_values(name, pretrained=True).items():
        assert _get(config, dotted) == value, dotted
    for dotted, value in DOCUMENTED[name].items():
        assert _get(config, dotted) == value, dotted
    assert config.freeze.l2_sp > 0  # every pretrained recipe holds the encoder near where it started


def test_the_recipes_differ_in_what_they_let_change(pretrained):
    frozen = {name: resolve_recipe(load_config(None, pretrained | {"recipe": name}))[0].freeze.frozen_stages()
              for name in RECIPES}
    assert len(frozen["linear-probe"]) > len(frozen["partial"]) > len(frozen["full"]) == 0


def test_what_the_user_sets_wins_over_the_recipe(pretrained):
    config, _ = resolve_recipe(load_config(None, pretrained | {"recipe": "partial", "optim.lr": 0.003,
                                                               "freeze.stages": ["stem"]}))
    assert config.optim.lr == 0.003
    assert config.freeze.stages == ["stem"]
    assert config.freeze.l2_sp == recipe_values("partial", True)["freeze.l2_sp"]


def test_a_recipe_in_a_yaml_file_is_applied_the_same(tmp_path, tiny_checkpoint):
    path = tmp_path / "c.yaml"
    path.write_text(f"recipe: linear-probe\nmodel:\n  init: {tiny_checkpoint}\noptim:\n  lr: 0.02\n")
    config, _ = resolve_recipe(load_config(path))
    assert config.freeze.stages == "encoder" and config.optim.lr == 0.02


def test_applying_a_recipe_again_changes_nothing(pretrained):
    once, _ = resolve_recipe(load_config(None, pretrained | {"recipe": "full"}))
    twice, _ = resolve_recipe(once)
    assert twice == once
    # a saved run config read back resolves to itself, as resuming needs
    assert resolve_recipe(load_config(None, once.model_dump(mode="json")))[0] == once


def test_no_recipe_leaves_the_config_alone(pretrained):
    config = load_config(None, pretrained)
    assert resolve_recipe(config) == (config, None)


def test_a_fresh_network_trains_from_scratch_under_full_and_refuses_the_others(tmp_path):
    config, _ = resolve_recipe(load_config(None, {"data.train": str(tmp_path), "recipe": "full"}))
    assert config.freeze.frozen_stages() == () and config.freeze.head_only_epochs == 0
    assert config.freeze.l2_sp == 0
    for name in ("linear-probe", "partial"):
        with pytest.raises(ConfigError, match=f"recipe: {name} fine-tunes a pretrained network"):
            resolve_recipe(load_config(None, {"data.train": str(tmp_path), "recipe": name}))


def test_an_unknown_recipe_is_one_config_problem():
    with pytest.raises(ConfigError, match="recipe: Input should be 'auto'"):
        load_config(None, {"recipe": "everything"})
    with pytest.raises(ConfigError, match="unknown recipe"):
        apply_recipe(load_config(None), "everything")


@pytest.mark.parametrize(("speakers", "hours", "pretrained", "expected"), [
    (2, 0.5, True, "linear-probe"),      # small: too few speakers, however long each
    (3, 20.0, True, "linear-probe"),
    (300, 0.04, True, "linear-probe"),   # small: many speakers, a couple of minutes in all
    (4, 0.05, True, "linear-probe"),     # the benchmark's size: without rehearsal, full forgot the old domain
    (8, 0.05, True, "full"),             # medium
    (16, 0.5, True, "full"),
    (5000, 2000.0, True, "full"),        # large
    (2, 0.01, False, "full"),            # nothing pretrained to keep
    (5000, 2000.0, False, "full"),
])
def test_auto_picks_by_the_size_of_the_training_data(speakers, hours, pretrained, expected):
    choice = pick_recipe(DataSummary(speakers, speakers * 10, hours), pretrained)
    assert choice.name == expected and choice.auto
    assert choice.reason.startswith(f"{speakers} speakers, ")
    assert "\n" not in choice.line() and choice.line().startswith(f"recipe {expected} (auto): ")


@pytest.mark.parametrize(("speakers", "expected"), [(3, "linear-probe"), (4, "full"), (8, "full")])
def test_with_recordings_to_rehearse_auto_tunes_every_stage_from_fewer_speakers(speakers, expected):
    # Rehearsal holds the old domain where distillation did not (benchmarks/domain_adaptation.py).
    assert pick_recipe(DataSummary(speakers, speakers * 10, 0.5), True, rehearsal=True).name == expected
    assert pick_recipe(DataSummary(speakers, speakers * 10, 0.5), True).name == ("full" if speakers >= 8 else
                                                                                "linear-probe")


def test_the_summary_counts_speakers_recordings_and_hours():
    recordings = [Recording(f"u{i}", "x.wav", f"s{i % 3}", duration_seconds=60.0) for i in range(9)]
    summary = DataSummary.of(recordings)
    assert (summary.speakers, summary.recordings) == (3, 9)
    assert summary.hours == pytest.approx(9 / 60)
    assert summary.describe() == "3 speakers, 9 min"


def _speaker_folders(root, speakers: int, files: int):
    for s in range(speakers):
        for f in range(files):
            write_wav(root / f"spk{s:02d}" / f"{f}.wav", seconds=0.5, frequency=150 + 40 * s + 5 * f)
    return root


def test_auto_counts_only_the_speakers_left_for_training(tmp_path, tiny_checkpoint):
    data = _speaker_folders(tmp_path / "data", speakers=6, files=3)
    config = load_config(None, {"recipe": "auto", "data.train": str(data), "model.init": str(tiny_checkpoint),
                                "data.val_speakers": 2})
    resolved, choice = resolve_recipe(config)
    assert choice.name == "linear-probe"
    assert choice.reason.startswith("4 speakers, under 1 min")
    assert resolved.recipe == "linear-probe" and resolved.freeze.stages == "encoder"


def test_the_trainer_applies_the_recipe_before_anything_runs(tmp_path, tiny_checkpoint):
    data = _speaker_folders(tmp_path / "data", speakers=4, files=2)
    config = load_config(None, {"recipe": "auto", "data.train": str(data), "model.init": str(tiny_checkpoint),
                                "run.output_dir": str(tmp_path / "run")})
    trainer = Trainer(config)
    assert trainer.config.recipe == "linear-probe"
    assert trainer.config.freeze.stages == "encoder"
    assert trainer.recipe.line().startswith("recipe linear-probe (auto): ")


def test_print_config_shows_the_choice_and_the_resolved_values(tmp_path, tiny_checkpoint):
    data = _speaker_folders(tmp_path / "data", speakers=4, files=2)
    result = CliRunner().invoke(app, ["train", "--train", str(data), "--init", str(tiny_checkpoint),
                                      "--recipe", "auto", "--print-config"])
    assert result.exit_code == 0, result.output
    first, *rest = result.output.splitlines()
    assert first.startswith("# recipe linear-probe (auto): 2 speakers")
    assert "recipe: linear-probe" in rest
    assert "  stages: encoder" in rest


def test_a_recipe_that_cannot_apply_is_one_line_and_exit_1(tmp_path):
    data = _speaker_folders(tmp_path / "data", speakers=3, files=2)
    result = CliRunner().invoke(app, ["train", "--train", str(data), "--recipe", "partial", "--print-config"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "recipe: partial fine-tunes a pretrained network" in result.output


def test_a_named_recipe_is_described_as_it_will_run(pretrained):
    _, choice = resolve_recipe(load_config(None, pretrained | {"recipe": "partial", "run.epochs": 5,
                                                               "freeze.stages": ["stem"]}))
    assert "5 epochs" in choice.reason and "stages stem frozen" in choice.reason
    _, plain = resolve_recipe(load_config(None, pretrained | {"recipe": "partial"}))
    assert f"{recipe_values('partial', True)['run.epochs']} epochs" in plain.reason
    assert plain.reason.startswith("stem, layer1 and layer2 stay as pretrained")
