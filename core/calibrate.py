"""Fitting a checkpoint's calibration on trials of held-out speakers and storing it with the model.

The trials are scored as the model scores them everywhere (its PLDA when it carries one, else the
cosine of its embeddings, adaptation included), the linear-logistic map is fitted on those scores
(and the shorter side's duration), and the checkpoint is written again atomically with the map under
``calibration``; everything else it holds stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from spkft.core.calibration import Calibration, fit_calibration
from spkft.core.checkpoint import load_model, output_for, with_entries
from spkft.core.embedding import Embedder, resolve_device
from spkft.core.evaluate import CalibrationMeasures, Progress, calibration_measures, evaluate, trial_durations
from spkft.core.files import staged
from spkft.core.records import Recording, Trial


@dataclass(frozen=True)
class CalibrateResult:
    calibration: Calibration
    measures: CalibrationMeasures  # on the trials it was fitted on (in-sample: a held-out set tells more)
    output: Path
    replaced: bool  # the checkpoint carried a calibration before


def calibrate_checkpoint(
    checkpoint: str | Path,
    recordings: Sequence[Recording],
    trials: Sequence[Trial],
    output: str | Path | None = None,
    durations: bool = True,
    source: str = "",
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> CalibrateResult:
    """Score ``trials`` with the checkpoint's model and backend, fit the map to LLRs, write the checkpoint.

    ``durations``: make the map weigh the shorter side's length (quality-aware calibration).
    """
    checkpoint = Path(checkpoint)
    device = resolve_device(device)
    loaded = load_model(checkpoint, device=device)
    output = output_for(checkpoint, loaded, output, "a calibration")
    seconds: dict[str, float] = {}
    evaluation = evaluate(Embedder(loaded.inference_model, device), recordings, trials, progress=progress,
                          plda=loaded.plda, durations_out=seconds)
    sides = trial_durations(seconds, evaluation.trials)
    calibration = fit_calibration(evaluation.scores, evaluation.labels, loaded.score_kind,
                                  *(sides if durations else (None, None)), source=source)
    measures = calibration_measures(evaluation.scores, calibration.llr(evaluation.scores, *sides), evaluation.labels)
    with staged(output) as tmp:
        torch.save(with_entries(loaded, {"calibration": calibration.to_dict()}), tmp)
    return CalibrateResult(calibration, measures, output, replaced=loaded.calibration is not None)
