"""What a scan found: the usable recordings, every excluded row and why, and summary figures."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from spkft.core.features import SAMPLE_RATE
from spkft.core.records import Recording

# Fixed bin edges (seconds) so reports of different data sets can be compared side by side.
HISTOGRAM_EDGES: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, math.inf)


class SourceKind(StrEnum):
    """The layouts a data source may have; detected by :func:`~spkft.core.data.detect_source`."""

    CSV = "csv"
    THREED_SPEAKER_CSV = "3d-speaker-csv"
    SPEAKER_FOLDERS = "speaker-folders"
    KALDI = "kaldi"
    # A CSV naming other sources (source,name), read as one with speakers prefixed by the name.
    POOL = "pool"
    # Audio files with no speaker labels: accepted only where labels are optional (``allow_unlabelled``).
    AUDIO_FOLDER = "audio-folder"


class Reason(StrEnum):
    """Why a row of a data source was left out of training."""

    MISSING = "missing"
    UNREADABLE = "unreadable"
    EMPTY = "empty"
    TOO_SHORT = "too_short"
    DUPLICATE = "duplicate"
    TOO_FEW_RECORDINGS = "too_few_recordings"
    BAD_ROW = "bad_row"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Excluded:
    """One row of a source that is not used, where it is, and a sentence saying why."""

    reason: Reason
    where: str  # "manifest.csv:12", "wav.scp:3" or a path under a speaker folder
    detail: str
    utt_id: str | None = None
    speaker: str | None = None
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "where": self.where,
            "detail": self.detail,
            "utt_id": self.utt_id,
            "speaker": self.speaker,
            "path": None if self.path is None else str(self.path),
        }


@dataclass(frozen=True)
class HistogramBin:
    """Recordings whose duration lies in ``[low_seconds, high_seconds)``."""

    low_seconds: float
    high_seconds: float
    count: int

    @property
    def label(self) -> str:
        if math.isinf(self.high_seconds):
            return f"{self.low_seconds:g}+ s"
        return f"{self.low_seconds:g}-{self.high_seconds:g} s"


def duration_histogram(durations: list[float]) -> tuple[HistogramBin, ...]:
    """Count durations into the fixed :data:`HISTOGRAM_EDGES` bins."""
    counts = [0] * (len(HISTOGRAM_EDGES) - 1)
    for duration in durations:
        for index in range(len(counts)):
            if duration < HISTOGRAM_EDGES[index + 1]:
                counts[index] += 1
                break
    return tuple(
        HistogramBin(HISTOGRAM_EDGES[i], HISTOGRAM_EDGES[i + 1], count) for i, count in enumerate(counts)
    )


@dataclass(frozen=True)
class ScanReport:
    """Everything :func:`~spkft.core.data.scan` learnt about a source, before any training.

    ``recordings`` are the usable ones; rows in ``excluded`` are left out, each with its reason.
    Recordings of an unlabelled source (:attr:`labelled` False) have the speaker
    :data:`~spkft.core.data.sources.UNLABELLED` and count as no speaker at all.
    Recordings at another sample rate or with several channels are usable: they are resampled
    to 16 kHz and down-mixed (mean of the channels) when read, and counted here as fixes.
    """

    source: Path
    kind: SourceKind
    recordings: tuple[Recording, ...]
    excluded: tuple[Excluded, ...]
    sample_rates: dict[int, int]  # sample rate -> usable recordings at that rate
    channels: dict[int, int]  # channel count -> usable recordings with that many channels
    min_seconds: float
    min_recordings_per_speaker: int
    synthetic: bool = False  # the source is a demo set written by write_demo, not real speech

    @property
    def source_label(self) -> str:
        """``csv:emodb-10spk/manifest.csv``: the layout and the last two parts of the path, no home folders."""
        return f"{self.kind.value}:{'/'.join(self.source.parts[-2:])}"

    @property
    def labelled(self) -> bool:
        """Whether the source names each recording's speaker."""
        return self.kind is not SourceKind.AUDIO_FOLDER

    @property
    def speakers(self) -> tuple[str, ...]:
        return tuple(sorted({r.speaker for r in self.recordings})) if self.labelled else ()

    @property
    def files(self) -> int:
        """Distinct audio files behind the usable recordings (segments share a file)."""
        return len({r.path for r in self.recordings})

    @property
    def total_seconds(self) -> float:
        return sum(r.duration_seconds or 0.0 for r in self.recordings)

    @property
    def total_hours(self) -> float:
        return self.total_seconds / 3600.0

    @property
    def resampled(self) -> int:
        """Usable recordings not at 16 kHz, which are resampled when read."""
        return sum(n for rate, n in self.sample_rates.items() if rate != SAMPLE_RATE)

    @property
    def downmixed(self) -> int:
        """Usable recordings with more than one channel, which are averaged to mono when read."""
        return sum(n for count, n in self.channels.items() if count > 1)

    @property
    def recordings_per_speaker(self) -> dict[str, int]:
        if not self.labelled:
            return {}
        return dict(sorted(Counter(r.speaker for r in self.recordings).items()))

    @property
    def excluded_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(e.reason.value for e in self.excluded).items()))

    @property
    def duration_histogram(self) -> tuple[HistogramBin, ...]:
        return duration_histogram([r.duration_seconds or 0.0 for r in self.recordings])

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable values (the usable recordings only as counts)."""
        per_speaker = self.recordings_per_speaker
        counts = list(per_speaker.values())
        return {
            "source": str(self.source),
            "kind": self.kind.value,
            "synthetic": self.synthetic,
            "recordings": len(self.recordings),
            "excluded": len(self.excluded),
            "speakers": len(per_speaker),
            "files": self.files,
            "total_hours": round(self.total_hours, 6),
            "min_seconds": self.min_seconds,
            "min_recordings_per_speaker": self.min_recordings_per_speaker,
            "recordings_per_speaker_summary": {
                "min": min(counts, default=0),
                "median": statistics.median(counts) if counts else 0,
                "max": max(counts, default=0),
            },
            "recordings_per_speaker": per_speaker,
            # JSON object keys are strings; the counts are per usable recording.
            "sample_rates": {str(rate): n for rate, n in sorted(self.sample_rates.items())},
            "channels": {str(count): n for count, n in sorted(self.channels.items())},
            "fixes": {"resampled_to_16000_hz": self.resampled, "downmixed_to_mono": self.downmixed},
            "duration_histogram": [
                {
                    "bin": b.label,
                    "low_seconds": b.low_seconds,
                    "high_seconds": None if math.isinf(b.high_seconds) else b.high_seconds,
                    "count": b.count,
                }
                for b in self.duration_histogram
            ],
            "excluded_by_reason": self.excluded_by_reason,
            "excluded_rows": [e.to_dict() for e in self.excluded],
        }
