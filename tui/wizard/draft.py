"""The one model every step of the wizard reads and edits: the run's config as it is being built,
and what the steps have learnt so far (the scan, the model, the run, the evaluation).

Steps write into it as the user chooses, so going back and forth never loses a choice; a step
shown again is drawn from it. Values are validated by the config schema on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from spkft.core.data import ScanReport, Split, split_speakers
from spkft.core.errors import DataError
from spkft.core.evaluate import Evaluation
from spkft.core.export import ExportResult, QuantizedModel
from spkft.core.quantize import EerRoseError
from spkft.core.model import ERes2NetV2
from spkft.core.report import Baseline
from spkft.core.train import EpochEnded, Event, PhaseStarted, RunFinished, RunStarted, StepEnded, TrainConfig, Validated
from spkft.core.train.config import ConfigError
from spkft.core.train.memory import BatchSuggestion
from spkft.core.train.recipes import RECIPES, RecipeChoice, describe, pick_recipe, recipe_values, training_data
from spkft.serve.server import SpeakerServer

AUTO = "auto"
CUSTOM = "custom"  # step 3's choice of no recipe: the user's own values
# Every knob some recipe sets: changing one by hand leaves the recipe for custom.
RECIPE_KEYS = frozenset(recipe_values("full", pretrained=False)).union(
    *(recipe_values(name, pretrained=True, rehearsal=rehearsal) for name in RECIPES for rehearsal in (False, True)))


def problem_of(error: ValidationError) -> str:
    """The first problem of a validation error, in the schema's words."""
    return error.errors()[0]["msg"].removeprefix("Value error, ")


@dataclass(frozen=True)
class ModelInfo:
    """The model chosen in step 2, as loaded or built."""

    model: ERes2NetV2
    variant: str
    parameters: int
    stage_parameters: dict[str, int]  # stage -> parameter count, in the order of the network
    check: str  # one line saying how it was loaded
    choice: str  # what was asked for (a checkpoint path, or a fresh variant and its arguments)


@dataclass(frozen=True)
class Estimate:
    """Time per epoch, measured on a few real training steps."""

    step_seconds: float
    validation_seconds: float
    steps_per_epoch: int
    epochs: int
    train_recordings: int
    val_trials: int
    basis: dict[str, Any]  # the config it was measured for, but for where the run writes

    @property
    def epoch_seconds(self) -> float:
        return self.step_seconds * self.steps_per_epoch + self.validation_seconds


@dataclass
class TrainingLog:
    """Every event of the current run, in order; the training step draws itself from it.

    The trainer's thread appends, the UI thread reads: appending to a list is atomic.
    """

    run_dir: Path
    events: list[Event] = field(default_factory=list)

    def _all(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def started(self) -> RunStarted | None:
        return next(reversed(self._all(RunStarted)), None)

    @property
    def initial(self) -> Validated | None:
        return next(iter(self._all(Validated)), None)

    @property
    def phase(self) -> PhaseStarted | None:
        return next(reversed(self._all(PhaseStarted)), None)

    @property
    def steps(self) -> list[StepEnded]:
        return self._all(StepEnded)

    @property
    def epochs(self) -> list[EpochEnded]:
        return self._all(EpochEnded)

    @property
    def finished(self) -> RunFinished | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, RunFinished) else None


@dataclass(frozen=True)
class Comparison:
    """Step 7's measurement of the fine-tuned model, and of the starting model on the same trials."""

    data: str  # which recordings were scored, in words
    checkpoint: Path
    candidate: Evaluation
    baseline: Baseline | None
    report_dir: Path
    # The calibration fitted on the validation speakers and stored with the checkpoint, in words
    # (what it costs on the test trials, the decision it makes), or why there is none.
    calibration: str = ""
    calibrated: bool = False


@dataclass
class Draft:
    """The wizard's state: the config being built and everything learnt along the way."""

    config: TrainConfig = field(default_factory=TrainConfig)
    scan: ScanReport | None = None
    scanned: str | None = None  # the source text the scan was made of
    fresh_model: bool = False  # step 2 builds a fresh network rather than loading model.init
    recipe: str | None = None  # step 3's choice: auto, a recipe or custom; None until step 3 makes it
    picked: RecipeChoice | None = None  # auto's pick and why, while the choice is auto
    model: ModelInfo | None = None
    batch: BatchSuggestion | None = None
    suggested: bool = False  # step 4's defaults for this data and model were filled in
    estimate: Estimate | None = None
    resume: bool | None = None  # set by step 5: start (False) or resume (True) a run on entering step 6
    training: TrainingLog | None = None
    evaluation: Comparison | None = None
    exported: ExportResult | None = None
    int8: QuantizedModel | EerRoseError | None = None  # step 8's int8 model, or why it was refused
    server: SpeakerServer | None = None  # running from step 8 until stopped or the wizard ends

    @classmethod
    def from_config(cls, config: TrainConfig) -> Draft:
        """A draft that starts from a saved config: a config naming a variant but no checkpoint builds a fresh model."""
        return cls(config=config, fresh_model=config.model.init is None and config.model.variant is not None)

    def section(self, key: str) -> BaseModel:
        return getattr(self.config, key.split(".", 1)[0])

    def get(self, key: str) -> Any:
        """The value of a dotted config key such as ``optim.lr``."""
        return getattr(self.section(key), key.split(".", 1)[1])

    def set(self, key: str, value: Any) -> None:
        """Set a dotted config key; raises pydantic's ValidationError for a value the schema refuses."""
        setattr(self.section(key), key.split(".", 1)[1], value)

    def validated(self, key: str, value: Any) -> Any:
        """``value`` as ``key`` would hold it (``"0.1"`` becomes 0.1); nothing is changed.

        Raises pydantic's ValidationError for a value the schema refuses.
        """
        trial = self.section(key).model_copy()
        name = key.split(".", 1)[1]
        setattr(trial, name, value)
        return getattr(trial, name)

    def check(self, key: str, value: Any) -> str | None:
        """Why ``value`` cannot be given to ``key``, or None when it can (nothing is changed)."""
        try:
            self.validated(key, value)
        except ValidationError as error:
            return problem_of(error)
        return None

    def is_explicit(self, key: str) -> bool:
        """Whether ``key`` was given by a loaded config or the user, rather than left at its default."""
        return key.split(".", 1)[1] in self.section(key).model_fields_set

    def edit(self, key: str, value: Any) -> bool:
        """Set ``key`` to a value the user chose; whether that changed it.

        Changing a knob that the recipe in force set makes the choice custom; every value stays as it is.
        """
        if value == self.get(key):
            return False
        self.set(key, value)
        if key in RECIPE_KEYS and self.config.recipe is not None:
            self.choose_recipe(CUSTOM)
        return True

    @property
    def pretrained(self) -> bool:
        return self.config.model.init is not None

    @property
    def rehearsal(self) -> bool:
        """Whether base-domain recordings to rehearse are given (``data.rehearsal``)."""
        return self.config.data.rehearsal is not None

    def auto_pick(self) -> RecipeChoice:
        """The recipe auto picks for the scanned recordings less the held-out speakers, and why."""
        return pick_recipe(training_data(self.config, self.scan), self.pretrained, self.rehearsal)

    def recipe_refused(self, choice: str) -> bool:
        """Whether ``choice`` cannot be used with this model (a pretrained-only recipe on a fresh network)."""
        if choice in (AUTO, CUSTOM):
            return False
        try:
            recipe_values(choice, self.pretrained, self.rehearsal)
        except ConfigError:
            return True
        return False

    def choose_recipe(self, choice: str) -> None:
        """Step 3's choice: a recipe sets every knob it owns; custom leaves them as they are.

        The config names the recipe itself, auto's pick for auto, so that a saved config runs the
        same even if auto would pick otherwise on other data.
        """
        self.recipe = choice
        self.picked = self.auto_pick() if choice == AUTO else None
        if choice == CUSTOM:
            self._name_recipe(None)
            return
        name = self.picked.name if self.picked is not None else choice
        for key, value in recipe_values(name, self.pretrained, self.rehearsal).items():
            self.set(key, value)
        self._name_recipe(name)

    def settle_recipe(self) -> str | None:
        """Make step 3's choice current for the data and model; says why when it had to change.

        Auto picks again and a recipe sets its knobs again, as steps 1 and 2 may have changed the
        data or the model since. The first time, the choice comes from the config: see
        :meth:`_first_recipe`.
        """
        if self.recipe is None:
            self.recipe = self._first_recipe()
        note = None
        if self.recipe_refused(self.recipe):
            note = f"{self.recipe} fine-tunes a pretrained checkpoint and the model is fresh: auto chosen instead."
            self.recipe = AUTO
        self.choose_recipe(self.recipe)
        return note

    def _first_recipe(self) -> str:
        """The choice a config makes: its recipe, as ``spkft train`` applies it, or custom, or auto.

        Values a config sets win over its recipe's, as in ``spkft train``; where one differs, the
        choice is custom, holding the recipe's values but for those. A config that sets knobs of
        its own and names no recipe is custom; one with neither (a new wizard) starts on auto.
        """
        named = self.config.recipe
        if named is None:
            return CUSTOM if any(self.is_explicit(key) for key in RECIPE_KEYS) else AUTO
        name = self.auto_pick().name if named == AUTO else named
        if self.recipe_refused(name):
            return named
        values = recipe_values(name, self.pretrained, self.rehearsal)
        if all(self.get(key) == value for key, value in values.items() if self.is_explicit(key)):
            return named
        for key, value in values.items():
            if not self.is_explicit(key):
                self.set(key, value)
        return CUSTOM

    def _name_recipe(self, name: str | None) -> None:
        # Assigning to the config itself would check the whole config, which may be half-edited
        # (head-only epochs typed before epochs); a recipe's name needs no check.
        self.config = self.config.model_copy(update={"recipe": name})

    def recipe_line(self) -> str:
        """The recipe in force and why, in one line."""
        if self.recipe in (None, CUSTOM):
            return "custom: your own values"
        if self.picked is not None:
            return f"auto → {self.picked.name}: {self.picked.reason}"
        return f"{self.recipe}: {describe(self.recipe, self.pretrained, self.rehearsal)}"

    def split(self) -> Split:
        """How the scanned recordings are held out; raises DataError when the choice cannot work."""
        data = self.config.data
        return split_speakers(self.scan.recordings, val=0 if data.val else data.val_speakers,
                              test=0 if data.test else data.test_speakers, seed=self.config.run.seed)

    @property
    def train_speakers(self) -> int | None:
        """Speakers the head will classify, from the scan and the hold-out choice; None when unknown."""
        if self.scan is None:
            return None
        try:
            return len(Split.speakers_of(self.split().train))
        except DataError:
            return None
