"""Progress events of a fine-tuning run, and the interface that receives them.

The trainer knows nothing of terminals: it hands each event to a sink, a plain callable. The
command line turns them into a progress bar, the wizard into messages, tests into a list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union


@dataclass(frozen=True)
class RunStarted:
    run_dir: str
    epochs: int
    steps_per_epoch: int
    start_epoch: int
    train_recordings: int
    train_speakers: int
    num_classes: int
    val_trials: int
    device: str
    precision: str
    world_size: int
    parameters: list[str] = field(default_factory=list)  # the trainable/frozen table, one line per stage
    recipe: str | None = None  # the recipe applied and why, in one line


@dataclass(frozen=True)
class Validated:
    """The starting model's validation result (epoch 0), before any training step."""

    epoch: int
    val_eer: float
    val_min_dcf: float


@dataclass(frozen=True)
class PhaseStarted:
    epoch: int
    description: str


@dataclass(frozen=True)
class StepEnded:
    epoch: int
    step: int  # within the epoch, from 1
    steps: int  # in the epoch
    global_step: int
    loss: float
    accuracy: float
    lr: float
    margin: float
    eta_seconds: float  # of the whole run


@dataclass(frozen=True)
class EpochEnded:
    epoch: int  # from 1
    epochs: int
    train_loss: float
    train_accuracy: float
    val_eer: float
    val_min_dcf: float
    best_eer: float
    best_epoch: int
    is_best: bool
    epochs_without_improvement: int
    patience: int | None
    seconds: float


@dataclass(frozen=True)
class RunFinished:
    reason: Literal["completed", "early_stopped", "cancelled"]
    run_dir: str
    initial_eer: float  # validation EER of the starting model
    best_epoch: int
    best_eer: float
    best_checkpoint: str | None
    report: dict[str, Any] | None = None  # final evaluation of the best model, when it ran
    # Checkpoint averaging (run.average_last / run.average_best), when the run asked for it:
    average: str | None = None  # which epochs were averaged, e.g. "last 3" or "best 3"
    average_epochs: tuple[int, ...] = ()
    average_checkpoint: str | None = None
    average_eer: float | None = None  # validation EER of the averaged weights
    average_skipped: str | None = None  # why no average was made although one was asked for


Event = Union[RunStarted, Validated, PhaseStarted, StepEnded, EpochEnded, RunFinished]
EventSink = Callable[[Event], None]


def ignore(event: Event) -> None:
    """A sink that drops every event."""
