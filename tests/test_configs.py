"""The training config: every problem reported at once, unknown keys, overrides, paths; and the
example configs in configs/, each loaded, checked and printed back through ``spkft train``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from spkft.core.train import ConfigError, TrainConfig, check_paths, load_config
from spkft.core.train.recipes import apply_recipe, resolve_recipe
from spkft.tui.cli import app
from tests.data_helpers import write_wav

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))
PRETRAINED = Path("eres2netv2_w24s4ep4")  # a released model, by name
UPSTREAM_LR = 0.2  # 3D-Speaker's learning rate when training ERes2NetV2 from scratch
SCRATCH_ADAMW_LR = 0.002  # configs/librispeech-small.yaml's, from scratch
runner = CliRunner()


def written(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems_of(*args) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(*args)
    error = caught.value
    assert str(error).startswith(f"{len(error.problems)} problem(s) in the configuration: ")
    assert "\n" not in str(error)
    return error.problems


# ------------------------------------------------------------------------------ the schema
def test_every_problem_is_reported_at_once(tmp_path):
    path = written(tmp_path, "optim:\n  lr: -1\nrun:\n  epochs: 0\nhead:\n  margin: 1.5\nfreeze:\n  stages: erly\n")
    problems = problems_of(path)
    assert len(problems) == 4
    assert sorted(p.split(":")[0] for p in problems) == ["freeze.stages", "head.margin", "optim.lr", "run.epochs"]
    assert "expected a preset (none, early, encoder) or a list of stages, got 'erly'" in " ".join(problems)


def test_file_and_override_problems_are_reported_together(tmp_path):
    path = written(tmp_path, "augment:\n  noise_snr_db: [15, 0]\n"
                             "model:\n  variant: eres2netv3\n  args: {m_chanels: 8}\n")
    problems = problems_of(path, {"run.seed": -1})
    assert sorted(problems) == [
        "augment.noise_snr_db: the low SNR must not exceed the high one",
        "model.args: unknown model argument(s) m_chanels; valid ones: baseWidth, embedding_size, expansion, "
        "feat_dim, m_channels, num_blocks, scale, two_emb_layer",
        "model.variant: unknown variant 'eres2netv3'; choose one of: eres2netv2, eres2netv2_w24s4ep4",
        "run.seed: Input should be greater than or equal to 0",
    ]


def test_unknown_keys_are_refused_at_any_depth_with_their_path(tmp_path):
    path = written(tmp_path, "trainer: {}\noptim:\n  lrr: 0.1\naugment:\n  crop_secs: 2\n")
    assert sorted(problems_of(path, {"run.epoch": 3})) == [
        "augment.crop_secs: unknown key", "optim.lrr: unknown key", "run.epoch: unknown key", "trainer: unknown key",
    ]


def test_an_unknown_model_argument_is_refused_at_load_time():
    assert problems_of(None, {"model.args": {"m_chanels": 8}})[0].startswith(
        "model.args: unknown model argument(s) m_chanels;")
    config = load_config(None, {"model.variant": "eres2netv2", "model.args": {"m_channels": 8}})
    assert config.model.args == {"m_channels": 8}


def test_invalid_yaml_is_one_line(tmp_path):
    problems = problems_of(written(tmp_path, "data:\n  train: [unclosed\nrun: {epochs: 3}\n"))
    assert len(problems) == 1 and "config.yaml: not valid YAML (" in problems[0]


@pytest.mark.parametrize("text, kind", [("- data\n- run\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_a_config_that_is_not_a_mapping_is_one_line(tmp_path, text, kind):
    assert problems_of(written(tmp_path, text)) == [
        f"{tmp_path / 'config.yaml'}: expected a mapping of sections, found {kind}"]


def test_an_empty_file_means_the_defaults_and_a_missing_one_is_an_error(tmp_path):
    assert load_config(written(tmp_path, "# nothing set\n")) == TrainConfig()
    problems = problems_of(tmp_path / "absent.yaml")
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'absent.yaml'}: cannot read")


def test_a_preset_or_a_list_of_stages_is_frozen():
    assert load_config(None, {"freeze.stages": "early"}).freeze.frozen_stages() == ("stem", "layer1", "layer2")
    assert load_config(None, {"freeze.stages": ["stem", "fuse34"]}).freeze.frozen_stages() == ("stem", "fuse34")
    assert problems_of(None, {"freeze.stages": ["stem", "layer9"]}) == [
        "freeze.stages: unknown stage(s) layer9; stages are "
        "stem, layer1, layer2, layer3, layer4, layer3_ds, fuse34, seg_1"]


def test_the_head_only_phase_must_leave_epochs_for_the_encoder():
    problems = problems_of(None, {"freeze.head_only_epochs": 3, "run.epochs": 3})
    assert len(problems) == 1 and "freeze.head_only_epochs must be below run.epochs" in problems[0]
    assert load_config(None, {"freeze.head_only_epochs": 2, "run.epochs": 3}).freeze.head_only_epochs == 2


def test_dotted_overrides_win_over_the_file(tmp_path):
    path = written(tmp_path, "optim:\n  lr: 0.05\n  optimizer: adamw\nrun:\n  epochs: 4\n  seed: 1\n")
    config = load_config(path, {"optim.lr": 0.002, "run.seed": 9, "run.epochs": None, "head.margin": 0.3})
    assert (config.optim.lr, config.run.seed, config.head.margin) == (0.002, 9, 0.3)
    assert (config.optim.optimizer, config.run.epochs) == ("adamw", 4)  # untouched, and None overrides nothing
    assert problems_of(path, {"optim.lr.peak": 1.0}) == ["optim.lr.peak: lr is not a section"]


def test_check_paths_lists_every_missing_path_together(tmp_path):
    names = {"data.train": "train.csv", "data.val": "val.csv", "data.trials": "trials.txt",
             "model.init": "model.ckpt", "augment.noise_dir": "noise", "augment.rir_dir": "rirs"}
    config = load_config(None, {key: tmp_path / name for key, name in names.items()})
    with pytest.raises(ConfigError) as caught:
        check_paths(config)
    assert caught.value.problems == [f"{key}: {tmp_path / name} does not exist" for key, name in names.items()]

    with pytest.raises(ConfigError) as caught:
        check_paths(load_config(None, {"model.init": tmp_path / "model.ckpt"}))
    assert caught.value.problems == ["data.train: no training data given",
                                     f"model.init: {tmp_path / 'model.ckpt'} does not exist"]

    for name in ("train.csv", "val.csv", "trials.txt", "model.ckpt"):
        (tmp_path / name).write_text("")
    (tmp_path / "noise").mkdir()
    (tmp_path / "rirs").mkdir()
    check_paths(config)


# ------------------------------------------------------------------------------ the examples
# A few values that say what each example is for, once its recipe is applied; every file in
# configs/ must be listed here.
EXPECTED = {
    "librispeech-small.yaml": {  # the README's run on the shared LibriSpeech set
        "recipe": None,
        "data.train": Path("../shared/data/librispeech-train-clean-100-251spk/manifest.csv"),
        "data.val_speakers": 30, "model.init": None, "model.variant": "eres2netv2", "model.args": {"m_channels": 8},
        "freeze.stages": "none", "optim.optimizer": "adamw", "optim.lr": 0.002, "run.epochs": 16,
    },
    "demo-base.yaml": {  # the bundled spkft_demo_base: two pooled corpora, speakers of both held out
        "recipe": None,
        "data.train": Path("configs/demo-base-sources.csv"),
        "data.val_speakers": 30, "data.test_speakers": 60, "model.init": None, "model.variant": "eres2netv2",
        "model.args": {"m_channels": 8}, "freeze.stages": "none", "optim.optimizer": "adamw", "optim.lr": 0.002,
    },
    "finetune-w24s4ep4.yaml": {  # auto, resolved here as it resolves for tens of speakers
        "recipe": "partial",
        "data.train": Path("data/train.csv"), "model.init": PRETRAINED, "model.variant": "eres2netv2_w24s4ep4",
        "freeze.stages": "early", "freeze.head_only_epochs": 1, "freeze.l2_sp": 0.001,
        "head.margin": 0.2, "head.margin_schedule": "linear", "run.batch_size": 64,
    },
    "small-data.yaml": {
        "recipe": "linear-probe",
        "data.train": Path("data/train.csv"), "model.init": PRETRAINED, "freeze.stages": "encoder",
        "data.val_speakers": 4, "augment.crop_seconds": 2.0,
    },
    "augmented.yaml": {
        "recipe": "partial",
        "model.init": PRETRAINED, "augment.noise_dir": Path("data/musan/noise"), "augment.rir_dir": Path("data/rirs"),
        "augment.noise_snr_db": (0.0, 15.0), "augment.speed_perturb": True, "freeze.head_only_epochs": 1,
        "run.epochs": 12,
    },
}


def setting(config: TrainConfig, dotted: str):
    if "." not in dotted:
        return getattr(config, dotted)
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def resolved(path: Path) -> TrainConfig:
    """An example as a run would resolve it; ``auto`` (which scans data.train, a placeholder here)
    as it resolves for tens of speakers."""
    config = load_config(path)
    if config.recipe == "auto":
        return apply_recipe(config, "partial")
    return resolve_recipe(config)[0]


def test_every_example_config_is_checked():
    assert {path.name for path in EXAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid_and_says_what_it_is_for(path):
    config = resolved(path)  # the schema only: the data paths are placeholders
    assert {key: setting(config, key) for key in EXPECTED[path.name]} == EXPECTED[path.name]
    if config.model.init is not None:
        # Fine-tuning learns slower than training from scratch (upstream: SGD at 0.2; README's
        # LibriSpeech run: AdamW at 2e-3) and stops early.
        assert config.optim.lr <= (UPSTREAM_LR / 10 if config.optim.optimizer == "sgd" else SCRATCH_ADAMW_LR / 2)
        assert config.run.patience is not None
        assert config.model.variant == "eres2netv2_w24s4ep4"
    if config.freeze.l2_sp > 0:
        assert config.model.init is not None, "L2-SP pulls toward pretrained weights, so it needs model.init"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_print_config_gives_back_the_same_config(path, tmp_path):
    arguments = ["train", "--config", str(path), "--print-config"]
    overrides = {}
    if load_config(path).recipe == "auto":  # auto scans the training data: give it some
        for speaker in range(3):
            write_wav(tmp_path / "data" / f"s{speaker}" / "a.wav", seconds=0.5)
            write_wav(tmp_path / "data" / f"s{speaker}" / "b.wav", seconds=0.5, frequency=330.0)
        arguments += ["--train", str(tmp_path / "data")]
        overrides = {"data.train": tmp_path / "data"}
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert set(yaml.safe_load(result.stdout)) == {"recipe", "data", "model", "augment", "head", "freeze", "optim", "run"}
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert load_config(printed) == resolve_recipe(load_config(path, overrides))[0]
    if load_config(path).recipe is not None:
        assert result.stdout.startswith("# recipe ")


# ------------------------------------------------------------------------------ hostile configs
@pytest.mark.parametrize("args, message", [
    ("{m_channels: 0}", "m_channels must be a whole number of at least 1, got 0"),
    ("{m_channels: -8}", "m_channels must be a whole number of at least 1, got -8"),
    ("{m_channels: 2}", "m_channels x baseWidth must be at least 64"),
    ("{num_blocks: [3, 0, 6, 3]}", "num_blocks must be 4 whole numbers of at least 1"),
    ("{embedding_size: true}", "embedding_size must be a whole number"),
])
def test_a_model_that_cannot_be_built_is_refused_before_training(tmp_path, args, message):
    problems = problems_of(written(tmp_path, f"model:\n  variant: eres2netv2\n  args: {args}\n"))
    assert len(problems) == 1 and problems[0].startswith("model.args: ") and message in problems[0]


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    problems = problems_of(written(tmp_path, "run:\n  epochs: 3\n  epochs: 4\n"))
    assert len(problems) == 1 and "the key 'epochs' is given twice" in problems[0] and "line 3" in problems[0]
    problems = problems_of(written(tmp_path, "run:\n  epochs: 3\nrun:\n  seed: 1\n"))
    assert "the key 'run' is given twice" in problems[0]


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("optim:\n  lr: 0.01  # café\n".encode("latin-1"))
    problems = problems_of(path)
    assert problems == [f"{path}: not UTF-8 text (the byte at offset 24 cannot be decoded); save it as UTF-8"]


def test_a_yaml_tag_in_a_model_argument_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    result = runner.invoke(app, ["train", "--model-arg", f"m_channels=!!python/object/apply:os.system ['touch {marker}']",
                                 "--print-config"])
    assert result.exit_code == 1 and not marker.exists()
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: 1 problem(s) in the configuration: ")
    assert "--model-arg" in result.stderr and "not a plain YAML value" in result.stderr
