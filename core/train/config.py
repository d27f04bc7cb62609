"""The fine-tuning run's configuration: one validated schema, loaded from YAML and overridden by flags.

Every field has a description; validation reports every problem at once and refuses unknown
keys, so a typo never silently falls back to a default. Defaults follow fine-tuning practice
for ERes2NetV2: a learning rate of 1/10-1/100 of upstream's 0.2, few epochs, a margin that
rises from 0 while the new head settles, and early stopping on validation EER.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from spkft.core.catalogue import released
from spkft.core.errors import SpkftError
from spkft.core.model import DEFAULT_VARIANT, VARIANTS, model_config

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "layer3_ds", "fuse34", "seg_1")
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "early": ("stem", "layer1", "layer2"),
    "encoder": tuple(s for s in STAGES if s != "seg_1"),
}


class ConfigError(SpkftError):
    """A configuration with one or more problems; the message lists all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in the configuration: " + "; ".join(problems)
        )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: Optional[Path] = Field(None, description="Training data: a CSV, a folder of speaker folders or a Kaldi data dir.")
    val: Optional[Path] = Field(None, description="Validation data; when absent, speakers are held out from `train`.")
    val_speakers: Union[int, float] = Field(
        0.1, gt=0, description="Speakers held out for validation when `val` is absent: a count, or a fraction below 1."
    )
    trials: Optional[Path] = Field(None, description="Validation trial list (Kaldi/3D-Speaker); generated when absent.")
    test: Optional[Path] = Field(None, description="Test data, never trained on nor used to pick the best epoch.")
    test_speakers: Union[int, float] = Field(
        0, ge=0, description="Speakers held out for testing when `test` is absent: a count, or a fraction below 1; 0 = none."
    )
    min_recordings_per_speaker: int = Field(1, ge=1, description="Speakers with fewer good recordings are excluded.")
    segment_seconds: float = Field(
        4.0, gt=0, description="Validation recordings are cut into segments this long, so one-file speakers have target trials."
    )
    max_trials: int = Field(20000, ge=10, description="Cap on generated validation trials (seeded sample).")
    rehearsal: Optional[Path] = Field(
        None, description="Labelled recordings of the domain the starting model knows (any multi-speaker corpus), "
                          "rehearsed while fine-tuning so it is not forgotten; their speakers are extra classes "
                          "of the head.")
    rehearsal_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of every batch drawn from data.rehearsal.")


class ModelConfig(_Section):
    init: Optional[Path] = Field(
        None, description="Pretrained checkpoint to fine-tune: a file, or a released model's name (spkft models list); "
                          "a fresh model when absent.")
    variant: Optional[str] = Field(
        None, description=f"Model variant ({', '.join(VARIANTS)}); default: the checkpoint's, or {DEFAULT_VARIANT}."
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Constructor overrides, e.g. {m_channels: 8}.")

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value not in VARIANTS:
            raise ValueError(f"unknown variant {value!r}; choose one of: {', '.join(VARIANTS)}")
        return value

    @field_validator("args")
    @classmethod
    def _known_args(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # A field check, so a bad variant and bad args are reported together, each under its own key.
        model_config(info.data.get("variant") or DEFAULT_VARIANT, **value)  # raises ValueError naming bad keys
        return value


class AugmentConfig(_Section):
    crop_seconds: float = Field(3.0, gt=0.2, le=30, description="Length of the random training crops, in seconds.")
    dither: float = Field(0.0, ge=0, description="Kaldi dither in training only (upstream: 0).")
    noise_dir: Optional[Path] = Field(None, description="Folder of noise recordings (MUSAN-style) added to crops.")
    noise_prob: float = Field(0.5, ge=0, le=1, description="Probability of adding noise to a crop.")
    noise_snr_db: tuple[float, float] = Field((0.0, 15.0), description="SNR range (dB) of added noise.")
    rir_dir: Optional[Path] = Field(None, description="Folder of room impulse responses convolved with crops.")
    rir_prob: float = Field(0.3, ge=0, le=1, description="Probability of reverberating a crop.")
    speed_perturb: bool = Field(False, description="Speed 0.9/1.0/1.1, each speed a class of its own (as upstream).")

    @field_validator("noise_snr_db")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError("the low SNR must not exceed the high one")
        return value


class HeadConfig(_Section):
    scale: float = Field(32.0, gt=0, description="Cosine logit scale s of the additive angular margin head.")
    margin: float = Field(0.2, ge=0, lt=1, description="Final additive angular margin m (radians).")
    margin_schedule: Literal["constant", "linear"] = Field("linear", description="Constant margin, or rising from 0.")
    margin_warmup_epochs: int = Field(2, ge=0, description="Epochs over which a linear margin rises to `margin`.")
    stats_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the pooled statistics (small data sets).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the classification loss.")


class FreezeConfig(_Section):
    stages: Union[Literal["none", "early", "encoder"], list[str]] = Field(
        "none", description=f"Frozen stages: a preset (none, early, encoder) or a list of {', '.join(STAGES)}."
    )
    head_only_epochs: int = Field(0, ge=0, description="Phase 1: train only the new head for this many epochs.")
    backbone_lr_scale: float = Field(1.0, gt=0, le=1, description="Learning-rate multiplier of the embedding model.")
    l2_sp: float = Field(0.0, ge=0, description="Weight of the L2-SP pull toward the pretrained weights.")
    distill: float = Field(
        0.0, ge=0, description="Weight of the pull of every crop's embedding toward the pretrained model's "
                               "(learning without forgetting: 1 - cosine, averaged over the batch).")

    @field_validator("stages", mode="before")
    @classmethod
    def _preset_or_list(cls, value):
        # Checked before the union, which would report one bad value once per member, under internal names.
        if not isinstance(value, (str, list, tuple)) or (isinstance(value, str) and value not in FREEZE_PRESETS):
            raise ValueError(f"expected a preset ({', '.join(FREEZE_PRESETS)}) or a list of stages, got {value!r}")
        return value

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value):
        if isinstance(value, list):
            unknown = [s for s in value if s not in STAGES]
            if unknown:
                raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
        return value

    def frozen_stages(self) -> tuple[str, ...]:
        return FREEZE_PRESETS[self.stages] if isinstance(self.stages, str) else tuple(self.stages)


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD with momentum, or AdamW.")
    lr: float = Field(0.01, gt=0, le=10, description="Peak learning rate (fine-tuning: 1/10-1/100 of upstream's 0.2).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum for SGD.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule after warmup (per step).")
    warmup_epochs: float = Field(0.5, ge=0, description="Linear warmup length in epochs.")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Cosine floor as a fraction of the peak.")
    grad_clip: Optional[float] = Field(5.0, gt=0, description="Clip the gradient norm at this value; null = off.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")


class RunConfig(_Section):
    epochs: int = Field(10, ge=1, description="Maximum number of epochs.")
    batch_size: int = Field(32, ge=1, description="Crops per micro-batch (per process under DDP).")
    steps_per_epoch: Optional[int] = Field(
        None, ge=1, description="Optimiser steps per epoch; default: one pass over the training recordings."
    )
    patience: Optional[int] = Field(3, ge=1, description="Stop after this many epochs without a better validation EER.")
    seed: int = Field(0, ge=0, description="Seed of every random choice (crops, augmentation, splits, init).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CPUs with BF16 and on CUDA, fp32 otherwise."
    )
    channels_last: Union[Literal["auto"], bool] = Field(
        "auto", description="channels_last memory format for the convolutions; auto: on CUDA, and on the CPU for "
                            "networks of m_channels 64 and up (narrower ones train slower in it)."
    )
    num_workers: int = Field(
        1, ge=0, description="DataLoader worker processes; one keeps crop decoding and fbank off the training threads."
    )
    output_dir: Path = Field(Path("runs/spkft"), description="Run directory (config, metrics, checkpoints, report).")
    average_last: int = Field(
        0, ge=0, description="At the end, average the weights of the last N epochs into average.ckpt; 0 = off."
    )
    average_best: int = Field(
        0, ge=0, description="At the end, average the weights of the N epochs with the best validation EER "
                             "into average.ckpt; 0 = off."
    )

    @field_validator("average_last", "average_best")
    @classmethod
    def _several_epochs(cls, value: int) -> int:
        if value == 1:
            raise ValueError("must be 0 (off) or at least 2: the average of 1 epoch is that epoch, "
                             "already kept as best.ckpt or last.ckpt")
        return value

    @model_validator(mode="after")
    def _one_average(self) -> RunConfig:
        if self.average_last and self.average_best:
            raise ValueError("average_last and average_best cannot both be set: choose which epochs to average")
        return self


class TrainConfig(_Section):
    recipe: Optional[Literal["auto", "linear-probe", "partial", "full"]] = Field(
        None, description="A fine-tuning recipe filling in every knob left unset; auto picks one from the training data."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.freeze.head_only_epochs >= self.run.epochs and self.run.epochs > 1:
            raise ValueError("freeze.head_only_epochs must be below run.epochs, or the encoder is never tuned")
        if self.freeze.l2_sp > 0 and self.model.init is None:
            raise ValueError("freeze.l2_sp pulls toward pretrained weights: it needs model.init")
        if self.data.rehearsal is not None and self.run.batch_size < 2:
            raise ValueError("data.rehearsal mixes the user's crops and rehearsed ones in every batch: "
                             "run.batch_size must be at least 2")
        if self.freeze.distill > 0 and self.model.init is None:
            raise ValueError("freeze.distill pulls toward a pretrained model's embeddings: it needs model.init")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{where}: {message}")
    return problems


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {key} is not a section"])
    node[leaf] = value


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong with a YAML text, in one line."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{error.problem or error.context}{where}"
    return str(error).splitlines()[0]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply dotted-key overrides, validate all at once."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.load(path.read_bytes().decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 (a safe loader)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: not UTF-8 text (the byte at offset {exc.start} cannot be decoded); save it as UTF-8"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML ({yaml_problem(exc)})"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{path}: expected a mapping of sections, found {type(loaded).__name__}"])
        tree = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, dotted, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def check_paths(config: TrainConfig) -> None:
    """Problems a config can only show against the file system, all reported at once."""
    problems = []
    if config.data.train is None:
        problems.append("data.train: no training data given")
    for name, value in (("data.train", config.data.train), ("data.val", config.data.val),
                        ("data.trials", config.data.trials), ("data.test", config.data.test),
                        ("data.rehearsal", config.data.rehearsal),
                        ("model.init", config.model.init),
                        ("augment.noise_dir", config.augment.noise_dir), ("augment.rir_dir", config.augment.rir_dir)):
        if value is not None and not Path(value).exists() and not (name == "model.init" and released(value)):
            problems.append(f"{name}: {value} does not exist")
    if problems:
        raise ConfigError(problems)
