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
from spkft.core.export import ExportResult
from spkft.core.model import ERes2NetV2
from spkft.core.report import Baseline
from spkft.core.train import EpochEnded, Event, PhaseStarted, RunFinished, RunStarted, StepEnded, TrainConfig, Validated
from spkft.core.train.memory import BatchSuggestion
from spkft.serve.server import SpeakerServer


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


@dataclass
class Draft:
    """The wizard's state: the config being built and everything learnt along the way."""

    config: TrainConfig = field(default_factory=TrainConfig)
    scan: ScanReport | None = None
    scanned: str | None = None  # the source text the scan was made of
    fresh_model: bool = False  # step 2 builds a fresh network rather than loading model.init
    model: ModelInfo | None = None
    batch: BatchSuggestion | None = None
    suggested: bool = False  # step 4's defaults for this data and model were filled in
    estimate: Estimate | None = None
    resume: bool | None = None  # set by step 5: start (False) or resume (True) a run on entering step 6
    training: TrainingLog | None = None
    evaluation: Comparison | None = None
    exported: ExportResult | None = None
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
