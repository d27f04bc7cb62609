"""Cutting long recordings into consecutive segments.

A speaker with a single recording gives no same-speaker trial; cut into segments, the same
recording does. Segments of one file share its channel and session, so scores from them are
easier than scores across sessions; they are a fallback where nothing better exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from spkft.core.errors import DataError
from spkft.core.records import Recording

SEGMENT_SEPARATOR = "#"


def segment(
    recordings: Iterable[Recording], segment_seconds: float, max_segments: int | None = None
) -> list[Recording]:
    """Cut each recording into ``k`` equal consecutive segments, ``k = duration // segment_seconds``.

    ``k`` is capped at ``max_segments``; the segments share the whole recording between them,
    so each is at least ``segment_seconds`` long. A recording shorter than two segments is
    returned unchanged. Segment ``i`` of utterance ``u`` is called ``u#i``. Durations must be
    known (recordings from :func:`~spkft.core.data.scan` have them).
    """
    if segment_seconds <= 0:
        raise DataError(f"segment length must be positive, got {segment_seconds:g} s")
    if max_segments is not None and max_segments < 1:
        raise DataError(f"max_segments must be at least 1, got {max_segments}")
    out: list[Recording] = []
    for recording in recordings:
        if recording.duration_seconds is None:
            raise DataError(f"{recording.utt_id}: duration unknown; scan the source before segmenting")
        count = int(recording.duration_seconds // segment_seconds)
        if max_segments is not None:
            count = min(count, max_segments)
        if count < 2:
            out.append(recording)
            continue
        length = recording.duration_seconds / count
        for index in range(count):
            start = recording.start_seconds + index * length
            out.append(replace(
                recording,
                utt_id=f"{recording.utt_id}{SEGMENT_SEPARATOR}{index}",
                start_seconds=start,
                stop_seconds=start + length,
                duration_seconds=length,
            ))
    return out
