"""Scanning: every kind of bad row is excluded with its reason, fixes are counted, nothing crashes."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
from data_helpers import write_wav

from spkft.core.audio import MIN_SECONDS
from spkft.core.data import Reason, scan


@pytest.fixture
def messy(tmp_path):
    """A CSV list with good rows and one row of every kind that must be excluded."""
    write_wav(tmp_path / "a1.wav", seconds=1.5)
    write_wav(tmp_path / "a2.wav", seconds=2.5, rate=8000)
    write_wav(tmp_path / "a3.wav", seconds=0.5, channels=2)
    write_wav(tmp_path / "b1.wav", seconds=12.0, rate=44100, channels=2)
    write_wav(tmp_path / "short.wav", seconds=0.05)
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(tmp_path / "no-samples.wav", [], 16000)
    (tmp_path / "notes.wav").write_text("these are notes, not audio\n")
    good = (tmp_path / "a1.wav").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(b"fLaC" + good[4:60])
    write_wav(tmp_path / "c1.wav")
    (tmp_path / "list.csv").write_text(
        "path,speaker\n"
        "a1.wav,alice\n"           # 2
        "a2.wav,alice\n"           # 3 resampled
        "a3.wav,alice\n"           # 4 down-mixed
        "b1.wav,bob\n"             # 5 resampled and down-mixed
        "gone.wav,bob\n"           # 6 missing
        "notes.wav,bob\n"          # 7 a text file
        "truncated.flac,bob\n"     # 8 corrupt
        "empty.wav,bob\n"          # 9 zero bytes
        "no-samples.wav,bob\n"     # 10 a header and no samples
        "short.wav,bob\n"          # 11 too short
        "a1.wav,bob\n"             # 12 the same file again
        "b1.wav\n"                 # 13 a field missing
        ",bob\n"                   # 14 no path
        "c1.wav,carol\n"           # 15 fine, but carol is alone
        "subdir,carol\n"           # 16 a folder, not a file
    )
    (tmp_path / "subdir").mkdir()
    return tmp_path / "list.csv"


def test_every_bad_row_is_excluded_with_its_reason_and_line(messy):
    report = scan(messy, min_recordings_per_speaker=2)
    reasons = {e.where: e.reason for e in report.excluded}
    assert reasons == {
        "list.csv:5": Reason.TOO_FEW_RECORDINGS,  # bob's only usable recording
        "list.csv:6": Reason.MISSING,
        "list.csv:7": Reason.UNREADABLE,
        "list.csv:8": Reason.UNREADABLE,
        "list.csv:9": Reason.EMPTY,
        "list.csv:10": Reason.EMPTY,
        "list.csv:11": Reason.TOO_SHORT,
        "list.csv:12": Reason.DUPLICATE,
        "list.csv:13": Reason.BAD_ROW,
        "list.csv:14": Reason.BAD_ROW,
        "list.csv:15": Reason.TOO_FEW_RECORDINGS,
        "list.csv:16": Reason.UNREADABLE,
    }
    details = {e.where: e.detail for e in report.excluded}
    assert "list.csv:2" in details["list.csv:12"]
    assert "no such file" in details["list.csv:6"]
    assert "expected 2 fields, found 1" in details["list.csv:13"]
    assert "carol has 1 usable recording" in details["list.csv:15"]
    assert all(e.detail for e in report.excluded)
    assert [r.utt_id for r in report.recordings] == ["a1.wav", "a2.wav", "a3.wav"]


def test_other_rates_and_channels_are_fixed_and_counted_not_excluded(messy):
    report = scan(messy)
    assert report.sample_rates == {8000: 1, 16000: 3, 44100: 1}
    assert report.channels == {1: 3, 2: 2}
    assert report.resampled == 2
    assert report.downmixed == 2
    assert report.speakers == ("alice", "bob", "carol")


def test_summary_figures_and_histogram(messy):
    report = scan(messy)
    assert report.files == 5
    assert report.total_seconds == pytest.approx(1.5 + 2.5 + 0.5 + 12.0 + 1.0)
    assert {b.label: b.count for b in report.duration_histogram} == {
        "0-1 s": 1, "1-2 s": 2, "2-3 s": 1, "3-5 s": 0, "5-10 s": 0, "10-20 s": 1, "20+ s": 0}
    assert report.min_seconds == MIN_SECONDS


def test_min_seconds_moves_recordings_to_too_short(messy):
    report = scan(messy, min_seconds=2.0)
    too_short = sorted(e.utt_id for e in report.excluded if e.reason is Reason.TOO_SHORT)
    assert too_short == ["a1.wav", "a3.wav", "c1.wav", "short.wav"]
    assert [r.utt_id for r in report.recordings] == ["a2.wav", "b1.wav"]


def test_report_to_dict_is_json_and_lists_every_excluded_row(messy):
    report = scan(messy)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["kind"] == "csv" and data["synthetic"] is False
    assert data["recordings"] == 5 and data["speakers"] == 3
    assert data["fixes"] == {"resampled_to_16000_hz": 2, "downmixed_to_mono": 2}
    assert data["sample_rates"] == {"8000": 1, "16000": 3, "44100": 1}
    assert len(data["excluded_rows"]) == len(report.excluded) == 10
    assert data["excluded_by_reason"]["unreadable"] == 3
    assert [b["count"] for b in data["duration_histogram"]] == [1, 2, 1, 0, 0, 1, 0]
    assert data["duration_histogram"][-1]["high_seconds"] is None


def test_kaldi_piped_commands_and_dangling_rows_are_excluded(tmp_path):
    a = write_wav(tmp_path / "a.wav")
    b = write_wav(tmp_path / "b.wav")
    (tmp_path / "wav.scp").write_text(
        f"u1 {a}\n"
        "u2 sox /data/u2.sph -t wav - |\n"
        f"u3 {b}\n"
        "u4\n"
        f"u1 {b}\n"
    )
    (tmp_path / "utt2spk").write_text("u1 alice\nu2 alice\nu5 bob\n")
    report = scan(tmp_path)
    by_utt = {(e.utt_id, e.where): (e.reason, e.detail) for e in report.excluded}
    assert by_utt[("u2", "wav.scp:2")][0] is Reason.UNSUPPORTED
    assert "piped command" in by_utt[("u2", "wav.scp:2")][1]
    assert by_utt[("u3", "wav.scp:3")] == (Reason.BAD_ROW, "u3 has no speaker in utt2spk")
    assert by_utt[("u4", "wav.scp:4")][0] is Reason.BAD_ROW
    assert by_utt[("u1", "wav.scp:5")][0] is Reason.DUPLICATE
    assert by_utt[("u5", "utt2spk:3")][0] is Reason.BAD_ROW
    assert len(report.excluded) == 5
    assert [r.utt_id for r in report.recordings] == ["u1"]


def test_segments_past_the_end_of_their_file_are_bad_rows(tmp_path):
    write_wav(tmp_path / "x.wav", seconds=2.0)
    (tmp_path / "list.csv").write_text(
        "utt_id,path,speaker,start,stop\n"
        "ok,x.wav,a,0,2.02\n"        # within rounding of the end: kept, clipped to the file
        "late,x.wav,a,2.5,3\n"
        "long,x.wav,a,1,4\n"
        "backwards,x.wav,a,1.5,1\n"
        "words,x.wav,a,one,two\n"
        "spaced id,x.wav,a,0,1\n")
    report = scan(tmp_path / "list.csv")
    assert [(r.utt_id, r.stop_seconds) for r in report.recordings] == [("ok", pytest.approx(2.0))]
    assert {e.utt_id: e.reason for e in report.excluded} == {
        "late": Reason.BAD_ROW, "long": Reason.BAD_ROW, "backwards": Reason.BAD_ROW,
        "words": Reason.BAD_ROW, "spaced id": Reason.BAD_ROW}
    assert "past the end of the file" in next(e.detail for e in report.excluded if e.utt_id == "long")


def test_audio_loose_beside_speaker_folders_is_reported(tmp_path):
    write_wav(tmp_path / "alice" / "1.wav")
    write_wav(tmp_path / "stray.wav")
    report = scan(tmp_path)
    assert [r.speaker for r in report.recordings] == ["alice"]
    assert [(e.where, e.reason) for e in report.excluded] == [("stray.wav", Reason.BAD_ROW)]


def test_progress_reports_reach_the_total(messy):
    calls = []
    scan(messy, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (12, 12)
    assert all(done <= total for done, total in calls)
