"""The records data flows through: labelled recordings and verification trials."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Recording:
    """One labelled utterance: a whole file, or the segment ``[start, stop)`` seconds of it."""

    utt_id: str
    path: Path
    speaker: str
    start_seconds: float = 0.0
    stop_seconds: float | None = None
    duration_seconds: float | None = None  # of the utterance (segment), once known


@dataclass(frozen=True)
class Trial:
    """A verification trial: does ``test`` come from the speaker of ``enrol``?"""

    enrol: str  # utt_id of the enrolment recording
    test: str  # utt_id of the test recording
    target: bool
