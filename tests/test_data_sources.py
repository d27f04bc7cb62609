"""Source detection: each layout is recognised, read into recordings, and bad sources fail cleanly."""

from __future__ import annotations

import pytest
from data_helpers import write_wav

from spkft.core.data import SourceKind, detect_source, scan
from spkft.core.errors import DataError


def test_csv_with_relative_paths_is_read_relative_to_its_folder(tmp_path):
    write_wav(tmp_path / "audio" / "a1.wav")
    write_wav(tmp_path / "audio" / "b1.flac", fmt="FLAC")
    (tmp_path / "list.csv").write_text("path,speaker\naudio/a1.wav,alice\naudio/b1.flac,bob\n")
    report = scan(tmp_path / "list.csv")
    assert report.kind is SourceKind.CSV
    assert report.speakers == ("alice", "bob")
    first = report.recordings[0]
    assert first.path == tmp_path / "audio" / "a1.wav" and first.path.is_absolute()
    assert first.utt_id == "audio/a1.wav"
    assert first.duration_seconds == pytest.approx(1.0)


def test_csv_optional_columns_give_ids_and_segments(tmp_path):
    write_wav(tmp_path / "long.wav", seconds=3.0)
    (tmp_path / "list.csv").write_text(
        "utt_id,path,speaker,start,stop\nu1,long.wav,alice,0,1.5\nu2,long.wav,alice,1.5,3\n")
    report = scan(tmp_path / "list.csv")
    assert [(r.utt_id, r.start_seconds, r.stop_seconds) for r in report.recordings] == [
        ("u1", 0.0, 1.5), ("u2", 1.5, 3.0)]
    assert [r.duration_seconds for r in report.recordings] == pytest.approx([1.5, 1.5])
    assert report.files == 1


def test_3d_speaker_train_csv_is_detected_and_read_as_segments(tmp_path):
    wav = write_wav(tmp_path / "wav" / "s1.wav", seconds=4.0)
    (tmp_path / "train.csv").write_text(
        "ID,dur,path,start,stop,spk\n"
        f"s1_0_2,2.0,{wav},0.0,2.0,spk1\n"
        f"s1_2_4,2.0,{wav},2.0,4.0,spk1\n"
        "s2_0_1,1.0,wav/s1.wav,0.5,1.5,spk2\n")
    report = scan(tmp_path / "train.csv")
    assert report.kind is SourceKind.THREED_SPEAKER_CSV
    assert [r.utt_id for r in report.recordings] == ["s1_0_2", "s1_2_4", "s2_0_1"]
    assert report.recordings[2].path == wav
    assert report.recordings[2].duration_seconds == pytest.approx(1.0)
    assert report.recordings_per_speaker == {"spk1": 2, "spk2": 1}


def test_speaker_folders_take_audio_from_any_depth(tmp_path):
    write_wav(tmp_path / "alice" / "session1" / "x.wav")
    write_wav(tmp_path / "alice" / "y.ogg", fmt="OGG")
    write_wav(tmp_path / "bob" / "z.flac", fmt="FLAC")
    (tmp_path / "bob" / "notes.txt").write_text("not audio, and not listed")
    report = scan(tmp_path)
    assert report.kind is SourceKind.SPEAKER_FOLDERS
    assert report.recordings_per_speaker == {"alice": 2, "bob": 1}
    assert {r.utt_id for r in report.recordings} == {"alice/session1/x.wav", "alice/y.ogg", "bob/z.flac"}
    assert not report.excluded


def test_kaldi_directory_is_detected_with_and_without_segments(tmp_path):
    a = write_wav(tmp_path / "audio" / "a.wav", seconds=2.0)
    b = write_wav(tmp_path / "audio" / "b.wav", seconds=2.0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "wav.scp").write_text(f"ua {a}\nub ../audio/b.wav\n")
    (data / "utt2spk").write_text("ua alice\nub bob\n")
    report = scan(data)
    assert report.kind is SourceKind.KALDI
    assert [(r.utt_id, r.speaker, r.path) for r in report.recordings] == [("ua", "alice", a), ("ub", "bob", b)]

    (data / "segments").write_text("ua-0 ua 0.0 1.0\nua-1 ua 1.0 2.0\nub-0 ub 0.5 1.5\n")
    (data / "utt2spk").write_text("ua-0 alice\nua-1 alice\nub-0 bob\n")
    report = scan(data)
    assert [(r.utt_id, r.start_seconds, r.stop_seconds) for r in report.recordings] == [
        ("ua-0", 0.0, 1.0), ("ua-1", 1.0, 2.0), ("ub-0", 0.5, 1.5)]
    assert detect_source(data / "wav.scp") == (SourceKind.KALDI, data)


def test_a_folder_with_a_manifest_is_read_through_it(tmp_path):
    write_wav(tmp_path / "one.wav")
    (tmp_path / "manifest.csv").write_text("path,speaker\none.wav,carol\n")
    kind, where = detect_source(tmp_path)
    assert (kind, where) == (SourceKind.CSV, tmp_path / "manifest.csv")
    assert scan(tmp_path).speakers == ("carol",)


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nothing-here", "no such file or folder"),
    (lambda root: root, "no audio found"),
    (lambda root: _text(root / "list.csv", "file,label\nx.wav,a\n"), "needs columns path,speaker"),
    (lambda root: _text(root / "list.csv", "path,speaker\n"), "lists no recordings"),
    (lambda root: _text(root / "list.csv", ""), "needs columns path,speaker"),
    (lambda root: write_wav(root / "single.wav"), "one audio file is not a data set"),
    (lambda root: _text(root / "wav.scp", "u1 /x.wav\n").parent, "needs utt2spk"),
    (lambda root: _bytes(root / "list.csv", b"path,speaker\n\xff\xfe.wav,a\n"), "not UTF-8 text"),
    (lambda root: write_wav(root / "flat" / "x.wav").parent, "no speaker labels"),
])
def test_a_bad_source_raises_one_line_data_error(tmp_path, make, message):
    (tmp_path / "empty-speaker").mkdir()
    with pytest.raises(DataError, match=message) as caught:
        scan(make(tmp_path))
    assert "\n" not in str(caught.value)


def _text(path, content):
    path.write_text(content)
    return path


def _bytes(path, content):
    path.write_bytes(content)
    return path


def test_real_fsdd_manifest_has_six_speakers_all_resampled(fsdd_dir):
    report = scan(fsdd_dir / "manifest.csv")
    assert report.kind is SourceKind.CSV
    assert len(report.speakers) == 6
    assert len(report.recordings) == 3000 and not report.excluded
    assert report.sample_rates == {8000: 3000}
    assert report.resampled == 3000 and report.downmixed == 0


def test_real_librispeech_folder_has_one_file_per_speaker(librispeech_dir):
    report = scan(librispeech_dir)
    assert len(report.speakers) == 251 and len(report.recordings) == 251
    assert set(report.recordings_per_speaker.values()) == {1}
    assert report.sample_rates == {16000: 251} and report.resampled == 0
    assert 0.5 < report.total_hours < 1.5


def test_a_pool_reads_its_sources_as_one_and_keeps_same_named_speakers_apart(tmp_path):
    for corpus in ("one", "two"):
        write_wav(tmp_path / corpus / "103" / "a.wav")
        write_wav(tmp_path / corpus / "103" / "b.wav")
    write_wav(tmp_path / "two" / "7" / "c.wav")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "pool.csv").write_text("source,name\n../one,first\n../two,second\n")
    report = scan(tmp_path / "lists" / "pool.csv")
    assert report.kind is SourceKind.POOL
    assert report.speakers == ("first/103", "second/103", "second/7")
    assert len(report.recordings) == 5
    assert {r.utt_id for r in report.recordings} >= {"first/103/a.wav", "second/103/a.wav"}
    assert all(r.path.is_file() for r in report.recordings)


@pytest.mark.parametrize("rows, problem", [
    ("../one,a\n../one,a\n", "the name 'a' is given twice"),
    ("../one,a/b\n", "must hold no whitespace and no '/'"),
    ("../one,\n", "needs a source and a name"),
    ("../missing,a\n", "no such file or folder"),
    ("inner.csv,a\n", "is a pool itself"),
])
def test_a_pool_that_cannot_be_read_as_one_says_why(tmp_path, rows, problem):
    write_wav(tmp_path / "one" / "103" / "a.wav")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "inner.csv").write_text("source,name\n../one,x\n")
    (tmp_path / "lists" / "pool.csv").write_text("source,name\n" + rows)
    with pytest.raises(DataError, match=problem):
        scan(tmp_path / "lists" / "pool.csv")
