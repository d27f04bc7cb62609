"""Speaker-disjoint splits: no speaker in two parts, the same split for the same seed."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from data_helpers import write_wav

from spkft.core.data import Split, split_sources, split_speakers
from spkft.core.errors import DataError
from spkft.core.records import Recording


def recordings(speakers: int, per_speaker: int) -> list[Recording]:
    return [
        Recording(f"s{s:02d}_{u}", Path(f"/data/s{s:02d}/{u}.wav"), f"s{s:02d}", duration_seconds=2.0)
        for s in range(speakers) for u in range(per_speaker)
    ]


def test_parts_share_no_speaker_and_keep_every_recording():
    data = recordings(20, 3)
    split = split_speakers(data, val=4, test=0.25, seed=7)
    train, val, test = (Split.speakers_of(part) for part in (split.train, split.val, split.test))
    assert (len(train), len(val), len(test)) == (11, 4, 5)
    assert not split.shared_speakers
    assert sorted(split.train + split.val + split.test, key=lambda r: r.utt_id) == data
    assert all(len([r for r in split.val if r.speaker == s]) == 3 for s in val)


def test_the_same_seed_gives_the_same_split_whatever_the_order():
    data = recordings(30, 2)
    shuffled = data[:]
    random.Random(1).shuffle(shuffled)
    a = split_speakers(data, val=0.2, test=3, seed=3)
    b = split_speakers(shuffled, val=0.2, test=3, seed=3)
    assert Split.speakers_of(a.val) == Split.speakers_of(b.val)
    assert Split.speakers_of(a.test) == Split.speakers_of(b.test)
    other = split_speakers(data, val=0.2, test=3, seed=4)
    assert Split.speakers_of(other.val) != Split.speakers_of(a.val)


@pytest.mark.parametrize("val, test, expected", [
    (0.3, 0, (3, 0)),     # 30 % of 10 speakers
    (0.1, 0, (2, 0)),     # a fraction takes at least two speakers: trials need two
    (0.01, 0, (2, 0)),
    (2, 3, (2, 3)),
    (2.0, 0.5, (2, 5)),   # a whole float is a count
    (0, 0, (0, 0)),
])
def test_counts_and_fractions(val, test, expected):
    split = split_speakers(recordings(10, 1), val=val, test=test, seed=0)
    assert (len(split.val), len(split.test)) == expected


@pytest.mark.parametrize("val, test, message", [
    (5, 5, "at least one speaker must remain"),
    (1.5, 0, "neither a whole count"),
    (-1, 0, "speaker count or a fraction"),
    (float("nan"), 0, "speaker count or a fraction"),
])
def test_impossible_requests_raise_data_error(val, test, message):
    with pytest.raises(DataError, match=message):
        split_speakers(recordings(10, 1), val=val, test=test, seed=0)


def test_user_given_validation_source_is_scanned_and_used_as_is(tmp_path):
    for speaker in ("a", "b", "c", "d"):
        write_wav(tmp_path / "train" / speaker / "1.wav")
    for speaker in ("a", "e"):
        write_wav(tmp_path / "dev" / speaker / "1.wav")
    split, reports = split_sources(tmp_path / "train", val_source=tmp_path / "dev", test=1, seed=0)
    assert set(reports) == {"train", "val"}
    assert Split.speakers_of(split.val) == {"a", "e"}
    assert len(split.test) == 1 and len(split.train) == 3
    assert Split.speakers_of(split.test).isdisjoint(Split.speakers_of(split.train))
    # The user chose this validation set, so a shared speaker is kept and reported, not dropped.
    assert split.shared_speakers == {"a"}
