"""Fine-tuning recipes: named presets of the config's own knobs, and ``auto``, which picks one from the data.

A recipe is data, not a code path: it fills in the knobs a config leaves unset (which stages
freeze, the head-only phase, the encoder's learning-rate scale, the learning rate, epochs, the
margin schedule, L2-SP, dropout and label smoothing). Anything the user sets explicitly wins.

- ``linear-probe``: only the embedding layer (``seg_1``) and the new head learn, held back by
  dropout and label smoothing. For a handful of speakers or minutes: too little to retrain
  convolutions without memorising them.
- ``partial``: the early stages (stem, layer1, layer2) stay exactly as pretrained and the rest
  adapts, for when the pretrained low-level filters must not move at all.
- ``full``: every stage adapts; from a fresh network it is plain training from scratch.

Pretrained recipes train the new head alone for one epoch (its random start would otherwise pull
the encoder off course), then the unfrozen stages with it, under AdamW with warmup and a cosine
decay and a margin that rises over two epochs; they stop after five epochs without a better
validation EER.
Every pretrained recipe holds the encoder near its starting point with L2-SP (Li et al., 2018), and
holds what it knew of its old domain in one of two ways, chosen by what the user gave:
- ``data.rehearsal`` given (recordings of a general or base-domain corpus): a share of every batch
  is drawn from them, their speakers extra classes of the head, so the old task stays trained;
- none given: every crop's embedding is pulled toward the starting model's embedding of the same
  crop (``freeze.distill``; learning without forgetting, Li and Hoiem, 2016), which needs no data
  beyond the user's own.
The numbers were set from
``benchmarks/domain_adaptation.py``, which measures each recipe on a new domain and on the
pretraining domain; README gives its figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from spkft.core.data import ScanReport, scan, split_speakers
from spkft.core.records import Recording
from spkft.core.train.config import ConfigError, TrainConfig

RECIPES = ("linear-probe", "partial", "full")
RECIPE_CHOICES = ("auto", *RECIPES)

# Fine-tuning a pretrained network: shared by every pretrained recipe. AdamW at half the
# from-scratch rate, every unfrozen stage at the head's rate and a light L2-SP pull: measured on a
# new domain (benchmarks/domain_adaptation.py), SGD at upstream's 1/20 with the encoder at a tenth
# of it barely moved the network in the few hundred steps a small data set gives.
_PRETRAINED_COMMON: dict[str, Any] = {
    "freeze.head_only_epochs": 1,
    "freeze.backbone_lr_scale": 1.0,
    "freeze.l2_sp": 0.001,
    "freeze.distill": 0.0,  # set by recipe_values: the distillation weight, or 0 where rehearsal holds the old domain
    "head.margin": 0.2,
    "head.margin_schedule": "linear",
    "head.margin_warmup_epochs": 2,
    "optim.optimizer": "adamw",
    "optim.lr": 0.001,
    "optim.weight_decay": 1.0e-4,
    "optim.warmup_epochs": 0.5,
    "optim.schedule": "cosine",
    "run.epochs": 20,
    "run.patience": 5,  # a few held-out speakers give a noisy EER: allow it a few epochs to improve
}

_PRETRAINED: dict[str, dict[str, Any]] = {
    "linear-probe": _PRETRAINED_COMMON | {
        "freeze.stages": "encoder",
        "head.stats_dropout": 0.3,  # the one layer that learns must not lean on a few of its inputs
        "head.label_smoothing": 0.1,  # a handful of speakers make the head over-confident at once
    },
    "partial": _PRETRAINED_COMMON | {
        "freeze.stages": "early",
        "head.stats_dropout": 0.1,
        "head.label_smoothing": 0.1,
    },
    "full": _PRETRAINED_COMMON | {
        "freeze.stages": "none",
        "head.stats_dropout": 0.0,
        "head.label_smoothing": 0.0,
    },
}

# ``full`` from a fresh network: training from scratch, as README's LibriSpeech run does.
_FROM_SCRATCH: dict[str, Any] = {
    "freeze.stages": "none",
    "freeze.head_only_epochs": 0,
    "freeze.backbone_lr_scale": 1.0,
    "freeze.l2_sp": 0.0,
    "freeze.distill": 0.0,
    "head.margin": 0.2,
    "head.margin_schedule": "linear",
    "head.margin_warmup_epochs": 4,
    "head.stats_dropout": 0.0,
    "head.label_smoothing": 0.0,
    "optim.optimizer": "adamw",
    "optim.lr": 0.002,
    "optim.weight_decay": 1.0e-4,
    "optim.warmup_epochs": 0.5,
    "optim.schedule": "cosine",
    "run.epochs": 16,
    "run.patience": None,
}

# Where ``auto`` moves from linear-probe to full: training speakers and minutes of audio. Below
# them there is too little to learn features from without forgetting the old domain. Measured in
# benchmarks/domain_adaptation.py (4 training speakers, 7 minutes): every stage adapting gave the
# lowest target-domain EER; rehearsing the base's speakers kept both base corpora within 3 % of the
# base, but distillation, or nothing, let their EER rise by 14-110 %, where the embedding layer
# alone kept them within 11 %. So without rehearsal, every stage adapts only from 8 speakers.
FULL_MIN_SPEAKERS = 8
FULL_MIN_SPEAKERS_REHEARSED = 4
FULL_MIN_HOURS = 0.05

# Holding the old domain (benchmarks/domain_adaptation.py): the weight of the pull toward the
# starting model's embeddings when there is nothing to rehearse, and the share of every batch
# rehearsed when there is.
DISTILL_WEIGHT = 10.0
REHEARSAL_FRACTION = 0.25


def recipe_values(name: str, pretrained: bool, rehearsal: bool = False) -> dict[str, Any]:
    """The knobs (dotted config keys) that recipe ``name`` sets, for a pretrained or a fresh network;
    ``rehearsal``: whether the config gives base-domain recordings to rehearse (``data.rehearsal``)."""
    if name not in RECIPES:
        raise ConfigError([f"recipe: unknown recipe {name!r}; choose one of: {', '.join(RECIPE_CHOICES)}"])
    if pretrained:
        values = dict(_PRETRAINED[name])
        if rehearsal:
            values["data.rehearsal_fraction"] = REHEARSAL_FRACTION
        else:
            values["freeze.distill"] = DISTILL_WEIGHT
        return values
    if name != "full":
        raise ConfigError([f"recipe: {name} fine-tunes a pretrained network: set model.init, or use recipe full"])
    return dict(_FROM_SCRATCH)


@dataclass(frozen=True)
class DataSummary:
    """What ``auto`` looks at: the training data's size, as a scan found it."""

    speakers: int
    recordings: int
    hours: float

    @classmethod
    def of(cls, recordings: Sequence[Recording]) -> DataSummary:
        seconds = sum(r.duration_seconds or 0.0 for r in recordings)
        return cls(len({r.speaker for r in recordings}), len(recordings), seconds / 3600.0)

    def describe(self) -> str:
        minutes = self.hours * 60
        amount = f"{self.hours:.1f} h" if minutes >= 90 else f"{minutes:.0f} min" if minutes >= 1 else "under 1 min"
        return f"{self.speakers} speakers, {amount}"


@dataclass(frozen=True)
class RecipeChoice:
    """A recipe and, in one line, why it was chosen."""

    name: str
    reason: str
    auto: bool  # picked by ``auto`` rather than named by the user

    def line(self) -> str:
        return f"recipe {self.name}" + (f" (auto): {self.reason}" if self.auto else f": {self.reason}")


def pick_recipe(data: DataSummary, pretrained: bool, rehearsal: bool = False) -> RecipeChoice:
    """``auto``: the recipe for this much training data, and the one-line reason; ``rehearsal``:
    whether base-domain recordings to rehearse were given."""
    size = data.describe()
    if not pretrained:
        return RecipeChoice("full", f"{size}, no pretrained model: every stage trains from scratch", True)
    hold = (f"{REHEARSAL_FRACTION:.0%} of every batch rehearsed from data.rehearsal" if rehearsal else
            "embeddings held toward the pretrained model's (no data.rehearsal to rehearse)")
    if data.speakers < (FULL_MIN_SPEAKERS_REHEARSED if rehearsal else FULL_MIN_SPEAKERS) or data.hours < FULL_MIN_HOURS:
        return RecipeChoice("linear-probe", f"{size}: too little to retrain convolutions without memorising "
                            f"these speakers and forgetting others; only the embedding layer adapts, {hold}", True)
    return RecipeChoice("full", f"{size}: every stage adapts, {hold}", True)


def describe(name: str, pretrained: bool, rehearsal: bool = False) -> str:
    """One line on what recipe ``name`` does."""
    return _describe(recipe_values(name, pretrained, rehearsal), pretrained)


def _describe(values: dict[str, Any], pretrained: bool) -> str:
    frozen = values["freeze.stages"] if isinstance(values["freeze.stages"], str) else "custom"
    what = {"encoder": "only the embedding layer (seg_1) and the head learn",
            "early": "stem, layer1 and layer2 stay as pretrained; the later stages adapt",
            "none": "every stage adapts" if pretrained else "every stage trains from scratch",
            "custom": f"stages {', '.join(values['freeze.stages']) or 'none'} frozen"}[frozen]
    extras = []
    if values["freeze.head_only_epochs"]:
        extras.append(f"{values['freeze.head_only_epochs']} head-only epoch")
    if values["freeze.backbone_lr_scale"] < 1 and frozen != "encoder":
        extras.append(f"encoder at {values['freeze.backbone_lr_scale']:g}x lr")
    if values["freeze.l2_sp"]:
        extras.append(f"L2-SP {values['freeze.l2_sp']:g}")
    if values.get("data.rehearsal_fraction"):
        extras.append(f"{values['data.rehearsal_fraction']:.0%} of every batch rehearsed")
    if values["freeze.distill"]:
        extras.append(f"distillation {values['freeze.distill']:g}")
    extras.append(f"{values['optim.optimizer']} lr {values['optim.lr']:g}, {values['run.epochs']} epochs")
    return f"{what}; " + ", ".join(extras)


def training_data(config: TrainConfig, report: ScanReport) -> DataSummary:
    """The recordings a run of ``config`` will train on: the scanned source less its held-out speakers."""
    data = config.data
    split = split_speakers(report.recordings, val=0 if data.val is not None else data.val_speakers,
                           test=0 if data.test is not None else data.test_speakers, seed=config.run.seed)
    return DataSummary.of(split.train)


def apply_recipe(config: TrainConfig, name: str) -> TrainConfig:
    """``config`` with recipe ``name``'s knobs filled in wherever the config leaves them unset."""
    # Section by section: a value assigned in a section (config.optim.lr = ...) leaves the section
    # itself unset on the config, and a dump of the whole config would drop everything in it.
    explicit = {name: section.model_dump(mode="json", exclude_unset=True)
                for name, section in config if isinstance(section, BaseModel)}
    for dotted, value in recipe_values(name, pretrained=config.model.init is not None,
                                       rehearsal=config.data.rehearsal is not None).items():
        section, key = dotted.split(".")
        explicit.setdefault(section, {}).setdefault(key, value)
    explicit["recipe"] = name
    return TrainConfig.model_validate(explicit)


def resolve_recipe(config: TrainConfig, report: ScanReport | None = None) -> tuple[TrainConfig, RecipeChoice | None]:
    """Apply the config's recipe, picking it from the training data first when it is ``auto``.

    ``report`` is the scan of ``data.train``; for ``auto`` it is made here when not given. A config
    without a recipe comes back unchanged. Applying the same recipe again changes nothing.
    """
    if config.recipe is None:
        return config, None
    pretrained = config.model.init is not None
    rehearsal = config.data.rehearsal is not None
    if config.recipe == "auto":
        if config.data.train is None:
            raise ConfigError(["recipe: auto picks from the training data: set data.train"])
        if report is None:
            report = scan(config.data.train, min_recordings_per_speaker=config.data.min_recordings_per_speaker)
        choice = pick_recipe(training_data(config, report), pretrained, rehearsal)
        return apply_recipe(config, choice.name), choice
    resolved = apply_recipe(config, config.recipe)
    # Described as it will run: values the user set in place of the recipe's are the ones shown.
    values = {key: getattr(getattr(resolved, key.split(".")[0]), key.split(".")[1])
              for key in recipe_values(config.recipe, pretrained, rehearsal)}
    return resolved, RecipeChoice(config.recipe, _describe(values, pretrained), False)
