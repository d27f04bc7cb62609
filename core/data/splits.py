"""Training, validation and test splits that share no speaker.

A speaker verifier is judged on voices it never trained on, so by default validation and test
speakers are held out whole. A user may instead bring their own validation or test source;
those are scanned like the training source and used as given.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from spkft.core.audio import MIN_SECONDS
from spkft.core.data.report import ScanReport
from spkft.core.data.scan import scan
from spkft.core.errors import DataError
from spkft.core.records import Recording

SpeakerShare = int | float
"""How many speakers a split takes: a count (an int, or a whole float >= 1) or a fraction in (0, 1)."""


@dataclass(frozen=True)
class Split:
    """Recordings for training, validation and test."""

    train: tuple[Recording, ...]
    val: tuple[Recording, ...]
    test: tuple[Recording, ...]

    @staticmethod
    def speakers_of(recordings: Iterable[Recording]) -> frozenset[str]:
        return frozenset(r.speaker for r in recordings)

    @property
    def shared_speakers(self) -> frozenset[str]:
        """Speakers found in more than one part (empty for a split made by :func:`split_speakers`)."""
        train, val, test = (self.speakers_of(part) for part in (self.train, self.val, self.test))
        return (train & val) | (train & test) | (val & test)


def split_speakers(
    recordings: Iterable[Recording], *, val: SpeakerShare = 0.1, test: SpeakerShare = 0, seed: int = 0
) -> Split:
    """Hold out whole speakers for validation and test, the same ones for the same ``seed``.

    The choice depends only on the set of speaker names and the seed, not on the order of
    ``recordings``. A fraction above zero always takes at least one speaker. At least one
    speaker must remain for training.
    """
    recordings = list(recordings)
    speakers = sorted({r.speaker for r in recordings})
    n_val = _speaker_count(val, len(speakers), "val")
    n_test = _speaker_count(test, len(speakers), "test")
    if n_val + n_test >= len(speakers):
        raise DataError(
            f"cannot hold out {n_val} validation and {n_test} test speaker(s) of {len(speakers)}: "
            "at least one speaker must remain for training"
        )
    random.Random(seed).shuffle(speakers)
    test_speakers = set(speakers[:n_test])
    val_speakers = set(speakers[n_test:n_test + n_val])
    return Split(
        train=tuple(r for r in recordings if r.speaker not in val_speakers | test_speakers),
        val=tuple(r for r in recordings if r.speaker in val_speakers),
        test=tuple(r for r in recordings if r.speaker in test_speakers),
    )


def split_sources(
    train: str | Path,
    *,
    val_source: str | Path | None = None,
    test_source: str | Path | None = None,
    val: SpeakerShare = 0.1,
    test: SpeakerShare = 0,
    seed: int = 0,
    min_seconds: float = MIN_SECONDS,
    min_recordings_per_speaker: int = 1,
) -> tuple[Split, dict[str, ScanReport]]:
    """Scan the training source and make a split, taking validation and test from their own
    sources when given and holding out speakers of ``train`` otherwise.

    Returns the split and the scan report of each source, keyed ``train``, ``val``, ``test``.
    Speakers a user-given source shares with training stay (see :attr:`Split.shared_speakers`).
    """
    options = {"min_seconds": min_seconds, "min_recordings_per_speaker": min_recordings_per_speaker}
    reports = {"train": scan(train, **options)}
    if val_source is not None:
        reports["val"] = scan(val_source, **options)
    if test_source is not None:
        reports["test"] = scan(test_source, **options)
    held_out = split_speakers(
        reports["train"].recordings,
        val=0 if val_source is not None else val,
        test=0 if test_source is not None else test,
        seed=seed,
    )
    split = Split(
        train=held_out.train,
        val=reports["val"].recordings if val_source is not None else held_out.val,
        test=reports["test"].recordings if test_source is not None else held_out.test,
    )
    return split, reports


def _speaker_count(share: SpeakerShare, speakers: int, name: str) -> int:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share < 0:
        raise DataError(f"{name} must be a speaker count or a fraction in (0, 1), got {share!r}")
    if 0 < share < 1:
        # Trials need two speakers at least: one held-out speaker gives no different-speaker pairs.
        return max(2, round(share * speakers))
    if share != int(share):
        raise DataError(f"{name}={share!r} is neither a whole count of speakers nor a fraction below 1")
    return int(share)
