"""Checking every row of a data source against its audio, before any training starts.

Only each file's header is opened (``soundfile.info``): sample rate, channels and length are
all a scan needs, and reading headers keeps a scan of many hours of audio to seconds. Bad rows
never stop a scan; they are excluded and each is listed with its reason.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf

from spkft.core.audio import MIN_SECONDS
from spkft.core.data.demo import MARKER_NAME
from spkft.core.data.report import Excluded, Reason, ScanReport
from spkft.core.data.sources import Row, read_source
from spkft.core.records import Recording

ScanProgress = Callable[[int, int], None]
"""Called with (files probed, files to probe) at most a few times a second, and at the end."""

# A segment may end this far past the end of its file: list files round times, and a few
# milliseconds of rounding must not throw a recording away.
_END_TOLERANCE_SECONDS = 0.05
_PROGRESS_INTERVAL_SECONDS = 0.2
# Header reads wait on storage, not on the CPU; a few threads hide the latency of network disks.
_PROBE_THREADS = 8


@dataclass(frozen=True)
class _Header:
    sample_rate: int
    channels: int
    frames: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class _Problem:
    reason: Reason
    detail: str


def scan(
    source: str | Path,
    *,
    min_seconds: float = MIN_SECONDS,
    min_recordings_per_speaker: int = 1,
    allow_unlabelled: bool = False,
    progress: ScanProgress | None = None,
) -> ScanReport:
    """Detect the layout of ``source``, check every row against its audio file and report.

    Rows are excluded (never raised) for: a missing, unreadable or empty file; a recording
    shorter than ``min_seconds``; a repeated utterance id or segment of a file; a speaker left
    with fewer than ``min_recordings_per_speaker`` usable recordings; a malformed list row.
    ``allow_unlabelled`` also accepts a folder of audio files without speaker labels (see
    :func:`~spkft.core.data.sources.detect_source`).
    Raises :class:`~spkft.core.errors.DataError` only when the source as a whole is unusable.
    """
    listing = read_source(source, allow_unlabelled=allow_unlabelled)
    excluded = list(listing.rejected)
    rows = _drop_duplicates(listing.rows, excluded)
    headers = _probe_all(sorted({row.path for row in rows}), progress)

    usable: list[tuple[Row, Recording]] = []
    for row in rows:
        checked = _check(row, headers[row.path], min_seconds)
        if isinstance(checked, Recording):
            usable.append((row, checked))
        else:
            excluded.append(_excluded(row, checked.reason, checked.detail))

    per_speaker = Counter(recording.speaker for _, recording in usable)
    kept: list[tuple[Recording, _Header]] = []
    for row, recording in usable:
        count = per_speaker[recording.speaker]
        if count >= min_recordings_per_speaker:
            kept.append((recording, headers[row.path]))
        else:
            excluded.append(_excluded(row, Reason.TOO_FEW_RECORDINGS,
                                      f"speaker {recording.speaker} has {count} usable recording(s); "
                                      f"at least {min_recordings_per_speaker} are needed"))

    folder = listing.source if listing.source.is_dir() else listing.source.parent
    return ScanReport(
        source=listing.source,
        kind=listing.kind,
        recordings=tuple(recording for recording, _ in kept),
        excluded=tuple(excluded),
        sample_rates=dict(sorted(Counter(h.sample_rate for _, h in kept).items())),
        channels=dict(sorted(Counter(h.channels for _, h in kept).items())),
        min_seconds=min_seconds,
        min_recordings_per_speaker=min_recordings_per_speaker,
        synthetic=(folder / MARKER_NAME).is_file(),
    )


def _drop_duplicates(rows: Iterable[Row], excluded: list[Excluded]) -> list[Row]:
    """Keep the first row of each utterance id and of each span of a file; exclude the rest."""
    by_utt: dict[str, Row] = {}
    by_span: dict[tuple[str, float, float | None], Row] = {}
    kept = []
    for row in rows:
        # realpath, so one file reached through a symlink or "..", is still the same file.
        span = (os.path.realpath(row.path), row.start_seconds, row.stop_seconds)
        if row.utt_id in by_utt:
            detail = f"utterance id {row.utt_id} was already used at {by_utt[row.utt_id].where}"
        elif span in by_span:
            detail = f"the same audio is already listed at {by_span[span].where}"
        else:
            by_utt[row.utt_id] = by_span[span] = row
            kept.append(row)
            continue
        excluded.append(_excluded(row, Reason.DUPLICATE, detail))
    return kept


def _excluded(row: Row, reason: Reason, detail: str) -> Excluded:
    return Excluded(reason, row.where, detail, row.utt_id, row.speaker, row.path)


def _probe_all(paths: list[Path], progress: ScanProgress | None) -> dict[Path, _Header | _Problem]:
    results: dict[Path, _Header | _Problem] = {}
    last_report = 0.0
    with ThreadPoolExecutor(max_workers=_PROBE_THREADS) as pool:
        for path, result in zip(paths, pool.map(_probe, paths)):
            results[path] = result
            now = time.monotonic()
            if progress is not None and now - last_report >= _PROGRESS_INTERVAL_SECONDS:
                progress(len(results), len(paths))
                last_report = now
    if progress is not None:
        progress(len(results), len(paths))
    return results


def _probe(path: Path) -> _Header | _Problem:
    """What a file's header says, or why it has no usable header."""
    try:
        if not path.exists():
            return _Problem(Reason.MISSING, "no such file")
        if not path.is_file():
            return _Problem(Reason.UNREADABLE, "not a file")
        if path.stat().st_size == 0:
            return _Problem(Reason.EMPTY, "the file is empty (0 bytes)")
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        # libsndfile's own words without the path, which the report already shows
        why = getattr(exc, "error_string", None) or str(exc)
        return _Problem(Reason.UNREADABLE, f"not audio that libsndfile can read: {why}")
    except OSError as exc:
        return _Problem(Reason.UNREADABLE, f"cannot be read: {exc.strerror or exc}")
    if info.samplerate <= 0 or info.channels <= 0:
        return _Problem(Reason.UNREADABLE, "the header gives no sample rate or channel count")
    if info.frames <= 0:
        return _Problem(Reason.EMPTY, "the file holds no samples")
    return _Header(int(info.samplerate), int(info.channels), int(info.frames))


def _check(row: Row, header: _Header | _Problem, min_seconds: float) -> Recording | _Problem:
    """The row as a :class:`Recording` with its duration, or why it cannot be one."""
    if isinstance(header, _Problem):
        return header
    length = header.seconds
    if row.start_seconds >= length:
        return _Problem(Reason.BAD_ROW, f"the segment starts at {row.start_seconds:g} s, "
                                        f"after the end of the file ({length:.3f} s)")
    if row.stop_seconds is not None and row.stop_seconds > length + _END_TOLERANCE_SECONDS:
        return _Problem(Reason.BAD_ROW, f"the segment ends at {row.stop_seconds:g} s, "
                                        f"past the end of the file ({length:.3f} s)")
    stop = length if row.stop_seconds is None else min(row.stop_seconds, length)
    duration = stop - row.start_seconds
    if duration < min_seconds:
        return _Problem(Reason.TOO_SHORT, f"{duration:.3f} s is shorter than the "
                                          f"{min_seconds:.3f} s minimum")
    return Recording(
        utt_id=row.utt_id,
        path=row.path,
        speaker=row.speaker,
        start_seconds=row.start_seconds,
        stop_seconds=None if row.stop_seconds is None else stop,
        duration_seconds=duration,
    )
