"""Segmenting long recordings, generating trials, and reading and writing trial lists."""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from spkft.core.data import make_trials, read_trials, scan, segment, write_trials
from spkft.core.errors import DataError
from spkft.core.records import Recording, Trial


def recordings(sizes: dict[str, int]) -> list[Recording]:
    return [
        Recording(f"{speaker}-{u}", Path(f"/d/{speaker}/{u}.wav"), speaker, duration_seconds=3.0)
        for speaker, count in sizes.items() for u in range(count)
    ]


def test_segment_cuts_equal_consecutive_pieces():
    long = Recording("u", Path("/d/u.wav"), "s", start_seconds=1.0, stop_seconds=11.0, duration_seconds=10.0)
    short = Recording("v", Path("/d/v.wav"), "s", duration_seconds=2.5)
    pieces = segment([long, short], segment_seconds=3.0)
    assert [p.utt_id for p in pieces] == ["u#0", "u#1", "u#2", "v"]
    assert [(p.start_seconds, p.stop_seconds) for p in pieces[:3]] == [
        pytest.approx((1.0, 1.0 + 10 / 3)), pytest.approx((1.0 + 10 / 3, 1.0 + 20 / 3)),
        pytest.approx((1.0 + 20 / 3, 11.0))]
    assert all(p.duration_seconds == pytest.approx(10 / 3) for p in pieces[:3])
    assert pieces[3] is short
    assert len(segment([long], segment_seconds=1.0, max_segments=4)) == 4


def test_segment_needs_known_durations_and_a_positive_length():
    with pytest.raises(DataError, match="duration unknown"):
        segment([Recording("u", Path("/d/u.wav"), "s")], 1.0)
    with pytest.raises(DataError, match="positive"):
        segment([], 0.0)


def test_all_target_pairs_and_as_many_nontargets_by_default():
    data = recordings({"a": 4, "b": 3, "c": 1})
    trials = make_trials(data, seed=0)
    targets = [t for t in trials if t.target]
    assert len(targets) == math.comb(4, 2) + math.comb(3, 2)
    assert len(trials) - len(targets) == len(targets)
    speaker = {r.utt_id: r.speaker for r in data}
    assert all((speaker[t.enrol] == speaker[t.test]) == t.target for t in trials)
    pairs = [frozenset((t.enrol, t.test)) for t in trials]
    assert len(set(pairs)) == len(pairs)


def test_trials_are_seeded_and_independent_of_order():
    data = recordings({f"s{k}": 6 for k in range(12)})
    first = make_trials(data, seed=5, max_target=40, max_nontarget=100, nontarget_per_target=None)
    again = make_trials(list(reversed(data)), seed=5, max_target=40, max_nontarget=100, nontarget_per_target=None)
    assert first == again
    assert Counter(t.target for t in first) == {True: 40, False: 100}
    assert make_trials(data, seed=6, max_target=40, max_nontarget=100, nontarget_per_target=None) != first


def test_every_nontarget_pair_when_asked_for_all():
    data = recordings({"a": 3, "b": 2, "c": 2})
    trials = make_trials(data, seed=0, nontarget_per_target=None, max_nontarget=None)
    nontargets = {frozenset((t.enrol, t.test)) for t in trials if not t.target}
    expected = {frozenset((x.utt_id, y.utt_id)) for x, y in combinations(data, 2) if x.speaker != y.speaker}
    assert nontargets == expected


def test_sampled_nontargets_favour_no_pair_over_another():
    # b-c is 1 of 101 non-target pairs, so 10 draws hold it about 10 % of the time. Drawing a
    # pair of speakers first would hold it far more often; drawing the first recording
    # uniformly, then one of another speaker, far less often (about 0.7 %).
    data = recordings({"a": 50, "b": 1, "c": 1})
    hits = 0
    for seed in range(300):
        trials = make_trials(data, seed=seed, max_target=10, nontarget_per_target=None, max_nontarget=10)
        hits += any({t.enrol, t.test} == {"b-0", "c-0"} for t in trials)
    assert 0.05 < hits / 300 < 0.15


def test_nontarget_ratio_scales_with_targets():
    data = recordings({f"s{k}": 5 for k in range(40)})
    trials = make_trials(data, seed=1, nontarget_per_target=2.5)
    counts = Counter(t.target for t in trials)
    assert counts[True] == 40 * 10 and counts[False] == 1000


def test_no_targets_or_no_nontargets_is_a_data_error():
    with pytest.raises(DataError, match="no speaker has two recordings"):
        make_trials(recordings({"a": 1, "b": 1}))
    with pytest.raises(DataError, match="one speaker"):
        make_trials(recordings({"a": 3}))
    with pytest.raises(DataError, match="appears twice"):
        make_trials(recordings({"a": 2, "b": 1}) * 2)


def test_single_file_speakers_yield_target_trials_once_segmented(librispeech_dir):
    report = scan(librispeech_dir)
    assert not any(t.target for t in _trials_or_none(report.recordings))
    pieces = segment(report.recordings, segment_seconds=3.0, max_segments=3)
    trials = make_trials(pieces, seed=0, max_target=500)
    assert Counter(t.target for t in trials) == {True: 500, False: 500}
    assert all(t.enrol.split("#")[0] == t.test.split("#")[0] for t in trials if t.target)


def _trials_or_none(recordings_):
    try:
        return make_trials(recordings_)
    except DataError:
        return []


def test_read_both_label_styles_and_voxceleb_order(tmp_path):
    path = tmp_path / "trials"
    path.write_text("a b target\nc d nontarget\n\ne f 1\ng h 0\n1 i j\n0 k l\n")
    assert read_trials(path) == [
        Trial("a", "b", True), Trial("c", "d", False), Trial("e", "f", True),
        Trial("g", "h", False), Trial("i", "j", True), Trial("k", "l", False)]


@pytest.mark.parametrize("content, line", [
    ("a b target\nc d maybe\n", 2),
    ("a b target\n\nc d\n", 3),
    ("a b c target\n", 1),
])
def test_a_bad_trial_line_is_a_data_error_naming_it(tmp_path, content, line):
    path = tmp_path / "trials.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=f"trials.txt:{line}: expected"):
        read_trials(path)


def test_empty_or_missing_trial_lists_are_data_errors(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_trials(tmp_path / "empty")
    with pytest.raises(DataError, match="no such trial list"):
        read_trials(tmp_path / "absent")


def test_written_trials_read_back_identically(tmp_path):
    trials = make_trials(recordings({"a": 3, "b": 3, "c": 2}), seed=2)
    path = write_trials(trials, tmp_path / "out" / "trials")
    assert read_trials(path) == trials
    assert path.read_text().splitlines()[0].endswith(" target")
    with pytest.raises(DataError, match="whitespace"):
        write_trials([Trial("a b", "c", True)], tmp_path / "bad")
