"""Fine-tuning: config, data pipeline, head, freezing, and the run itself."""

from spkft.core.train.config import ConfigError, TrainConfig, check_paths, load_config
from spkft.core.train.events import EpochEnded, Event, EventSink, PhaseStarted, RunFinished, RunStarted, StepEnded, Validated
from spkft.core.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "ConfigError", "EpochEnded", "Event", "EventSink", "PhaseStarted", "RunFinished", "RunStarted", "StepEnded", "Validated",
    "TrainConfig", "Trainer", "TrainingDiverged", "check_paths", "load_config",
]
