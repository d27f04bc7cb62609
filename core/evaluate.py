"""Measuring a model as a verifier: embed the recordings a trial list uses, score, compute metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from spkft.core.audio import load_audio
from spkft.core.embedding import SpeakerEmbedder
from spkft.core.errors import EvaluationError
from spkft.core.metrics import VerificationMetrics, compute_metrics
from spkft.core.records import Recording, Trial
from spkft.core.scoring import as_norm, score_trials, trial_labels

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class Evaluation:
    metrics: VerificationMetrics
    scores: np.ndarray
    labels: np.ndarray
    trials: list[Trial]


def embed_recordings(
    embedder: SpeakerEmbedder, recordings: Sequence[Recording], progress: Progress | None = None
) -> dict[str, np.ndarray]:
    """L2-normalised embeddings by utt_id; segments are read as segments."""
    embeddings = {}
    for done, recording in enumerate(recordings, start=1):
        wave = load_audio(recording.path, start_seconds=recording.start_seconds, stop_seconds=recording.stop_seconds)
        embeddings[recording.utt_id] = embedder.embed_waveform(wave).vector
        if progress is not None:
            progress(done, len(recordings))
    return embeddings


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
) -> Evaluation:
    """Embed what the trials need, score them (AS-norm against ``cohort`` when given), measure."""
    needed = {t.enrol for t in trials} | {t.test for t in trials}
    used = [r for r in recordings if r.utt_id in needed]
    missing = needed - {r.utt_id for r in used}
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise EvaluationError(f"{len(missing)} utterance(s) in the trials are not in the data: {shown}")
    embeddings = embed_recordings(embedder, used, progress)
    scores = score_trials(embeddings, trials)
    if cohort:
        cohort_vectors = speaker_cohort(embed_recordings(embedder, cohort), cohort)
        scores = as_norm(scores, embeddings, trials, cohort_vectors, top_k=top_k)
    labels = trial_labels(trials)
    return Evaluation(compute_metrics(scores, labels, threshold=threshold), scores, labels, list(trials))
