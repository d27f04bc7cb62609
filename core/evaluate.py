"""Measuring a model as a verifier: embed the recordings a trial list uses, score, compute metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from spkft.core.audio import load_audio
from spkft.core.calibration import Calibration, act_dcf, cllr, min_cllr
from spkft.core.embedding import SpeakerEmbedder
from spkft.core.errors import EvaluationError
from spkft.core.metrics import VerificationMetrics, compute_metrics, min_dcf
from spkft.core.plda import Plda, score_kind
from spkft.core.records import Recording, Trial
from spkft.core.scoring import as_norm, score_trials, trial_labels

# Priors at which a calibrated model's actual detection cost is reported beside its minimum.
CALIBRATION_PRIORS = (0.01, 0.05)

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class CalibrationMeasures:
    """What a calibrated model's LLRs cost on the trials: Cllr against its minimum, actual DCF by prior."""

    cllr: float
    min_cllr: float
    act_dcf: dict[float, float]  # p_target -> actual normalised DCF (c_miss = c_fa = 1)
    min_dcf: dict[float, float]  # p_target -> minDCF of the same scores, for comparison

    def to_dict(self) -> dict[str, object]:
        return {"cllr": self.cllr, "min_cllr": self.min_cllr,
                "act_dcf": {f"{p:g}": v for p, v in self.act_dcf.items()},
                "min_dcf": {f"{p:g}": v for p, v in self.min_dcf.items()}}


@dataclass(frozen=True)
class Evaluation:
    metrics: VerificationMetrics
    scores: np.ndarray
    labels: np.ndarray
    trials: list[Trial]
    score_kind: str = "cosine"  # "cosine" or "plda" (log-likelihood ratios)
    llr: np.ndarray | None = None  # calibrated log-likelihood ratios, when the model carries a calibration
    calibration: CalibrationMeasures | None = None


def embed_recordings(
    embedder: SpeakerEmbedder, recordings: Sequence[Recording], progress: Progress | None = None,
    durations: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """L2-normalised embeddings by utt_id; segments are read as segments. ``durations``, when given,
    receives each recording's length in seconds."""
    embeddings = {}
    for done, recording in enumerate(recordings, start=1):
        wave = load_audio(recording.path, start_seconds=recording.start_seconds, stop_seconds=recording.stop_seconds)
        embeddings[recording.utt_id] = embedder.embed_waveform(wave).vector
        if durations is not None:
            durations[recording.utt_id] = wave.duration_seconds
        if progress is not None:
            progress(done, len(recordings))
    return embeddings


def plda_scores(plda: Plda, embeddings: dict[str, np.ndarray], trials: Sequence[Trial]) -> np.ndarray:
    """The PLDA log-likelihood ratio of each trial, in trial order."""
    missing = sorted(({t.enrol for t in trials} | {t.test for t in trials}) - set(embeddings))
    if missing:
        raise EvaluationError(f"{len(missing)} utterances in the trials have no embedding: {', '.join(missing[:5])}")
    utts = sorted(embeddings)
    rows = {utt: i for i, utt in enumerate(utts)}
    projected = plda.project(np.stack([embeddings[u] for u in utts]))
    weights = projected * plda.cross
    own = plda.side_terms(projected)
    enrol = np.fromiter((rows[t.enrol] for t in trials), np.int64, len(trials))
    test = np.fromiter((rows[t.test] for t in trials), np.int64, len(trials))
    return np.einsum("ij,ij->i", weights[enrol], projected[test]) + own[enrol] + own[test] + plda.offset


def trial_durations(durations: dict[str, float], trials: Sequence[Trial]) -> tuple[np.ndarray, np.ndarray]:
    """The enrolment and test sides' lengths in seconds, in trial order."""
    return (np.fromiter((durations[t.enrol] for t in trials), np.float64, len(trials)),
            np.fromiter((durations[t.test] for t in trials), np.float64, len(trials)))


def calibration_measures(scores: np.ndarray, llr: np.ndarray, labels: np.ndarray) -> CalibrationMeasures:
    """Cllr and min Cllr, and actual against minimum DCF at :data:`CALIBRATION_PRIORS`."""
    return CalibrationMeasures(
        cllr=cllr(llr, labels), min_cllr=min_cllr(scores, labels),
        act_dcf={p: act_dcf(llr, labels, p) for p in CALIBRATION_PRIORS},
        min_dcf={p: min_dcf(scores, labels, p_target=p)[0] for p in CALIBRATION_PRIORS})


def speaker_cohort(embeddings: dict[str, np.ndarray], recordings: Sequence[Recording]) -> np.ndarray:
    """One normalised mean embedding per speaker: the AS-norm cohort."""
    by_speaker: dict[str, list[np.ndarray]] = {}
    for recording in recordings:
        by_speaker.setdefault(recording.speaker, []).append(embeddings[recording.utt_id])
    means = np.stack([np.mean(v, axis=0) for v in by_speaker.values()])
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def evaluate(
    embedder: SpeakerEmbedder,
    recordings: Sequence[Recording],
    trials: Sequence[Trial],
    cohort: Sequence[Recording] | None = None,
    top_k: int = 300,
    threshold: float | None = None,
    progress: Progress | None = None,
    plda: Plda | None = None,
    calibration: Calibration | None = None,
    durations_out: dict[str, float] | None = None,
) -> Evaluation:
    """Embed what the trials need, score them, measure.

    Scores are cosines (AS-norm against ``cohort`` when given) or, with ``plda``, its
    log-likelihood ratios. With ``calibration`` (which must map that kind of score), the
    calibrated LLRs are measured too: Cllr, min Cllr and actual DCF. ``durations_out``, when
    given, receives each embedded recording's length in seconds.
    """
    if plda is not None and cohort:
        raise EvaluationError("AS-norm normalises cosine scores; a model scored by PLDA takes no cohort")
    kind = score_kind(plda)
    if calibration is not None and calibration.scores != kind:
        raise EvaluationError(f"the calibration maps {calibration.scores} scores, not {kind} scores")
    needed = {t.enrol for t in trials} | {t.test for t in trials}
    used = [r for r in recordings if r.utt_id in needed]
    missing = needed - {r.utt_id for r in used}
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise EvaluationError(f"{len(missing)} utterance(s) in the trials are not in the data: {shown}")
    durations: dict[str, float] = {} if durations_out is None else durations_out
    embeddings = embed_recordings(embedder, used, progress, durations)
    if plda is not None:
        scores = plda_scores(plda, embeddings, trials)
    else:
        scores = score_trials(embeddings, trials)
    if cohort:
        cohort_vectors = speaker_cohort(embed_recordings(embedder, cohort), cohort)
        scores = as_norm(scores, embeddings, trials, cohort_vectors, top_k=top_k)
    labels = trial_labels(trials)
    llr = measures = None
    if calibration is not None:
        llr = calibration.llr(scores, *trial_durations(durations, trials))
        if labels.any() and not labels.all():
            measures = calibration_measures(scores, llr, labels)
    return Evaluation(compute_metrics(scores, labels, threshold=threshold), scores, labels, list(trials), kind,
                      llr, measures)
