"""The synthetic demo set: written quickly, deterministic, scannable, and its speakers separable."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from spkft.core.data import SourceKind, scan, write_demo
from spkft.core.errors import DataError
from spkft.core.features import fbank


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo(tmp_path_factory.mktemp("demo") / "set", speakers=6, recordings_per_speaker=6,
                      seconds=(1.5, 2.5), seed=0, test_speakers=0)


def test_demo_is_scanned_back_with_every_speaker(demo):
    report = scan(demo)
    assert report.kind is SourceKind.CSV  # the manifest wins over the folder names
    assert report.speakers == tuple(f"synth{k:02d}" for k in range(1, 7))
    assert set(report.recordings_per_speaker.values()) == {6}
    assert not report.excluded
    assert report.sample_rates == {16000: 36} and report.channels == {1: 36}
    assert all(1.5 <= r.duration_seconds <= 2.5 for r in report.recordings)
    with pytest.raises(DataError, match="no speaker labels"):
        scan(demo / "synth01")  # one speaker's folder alone says nothing of who speaks
    assert "SYNTHETIC" in (demo / "README.txt").read_text()
    assert report.synthetic and report.to_dict()["synthetic"] is True


def test_demo_folders_read_as_speaker_folders(demo, tmp_path):
    (tmp_path / "copy").mkdir()
    for path in sorted(demo.glob("synth0[12]/*.wav")):
        (tmp_path / "copy" / path.parent.name).mkdir(exist_ok=True)
        (tmp_path / "copy" / path.parent.name / path.name).write_bytes(path.read_bytes())
    report = scan(tmp_path / "copy")
    assert report.kind is SourceKind.SPEAKER_FOLDERS
    assert report.recordings_per_speaker == {"synth01": 6, "synth02": 6}


def test_the_same_seed_writes_the_same_audio(demo, tmp_path):
    again = write_demo(tmp_path / "again", speakers=6, recordings_per_speaker=6, seconds=(1.5, 2.5), seed=0,
                       test_speakers=0)
    other = write_demo(tmp_path / "other", speakers=6, recordings_per_speaker=6, seconds=(1.5, 2.5), seed=1,
                       test_speakers=0)
    name = "synth03/synth03_004.wav"
    assert (again / name).read_bytes() == (demo / name).read_bytes()
    assert (other / name).read_bytes() != (demo / name).read_bytes()
    first, second = (sf.read(demo / f"synth03/synth03_00{u}.wav")[0] for u in (0, 1))
    assert len(first) != len(second) or not np.allclose(first, second)


def test_demo_refuses_a_folder_with_other_files_but_replaces_a_previous_demo(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        write_demo(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"

    target = write_demo(tmp_path / "demo", speakers=3, recordings_per_speaker=2, seconds=(1.0, 1.0),
                        test_speakers=2)
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == ["test", "train"]
    write_demo(target, speakers=2, recordings_per_speaker=2, seconds=(1.0, 1.0), test_speakers=0)
    assert sorted(p.name for p in target.iterdir() if p.is_dir()) == ["synth01", "synth02"]
    assert scan(target).speakers == ("synth01", "synth02")

    (target / "synth01" / "extra.wav").write_bytes((target / "synth01" / "synth01_000.wav").read_bytes())
    with pytest.raises(DataError, match="holds no previous spkft demo set"):
        write_demo(target)


def test_a_split_demo_tests_on_voices_it_does_not_train_on(tmp_path):
    root = write_demo(tmp_path / "split", speakers=5, recordings_per_speaker=2, seconds=(1.0, 1.5), test_speakers=3)
    train, test = scan(root / "train"), scan(root / "test")
    assert len(train.speakers) == 5 and len(test.speakers) == 3
    assert not set(train.speakers) & set(test.speakers)
    assert train.synthetic and test.synthetic
    assert set(train.speakers) | set(test.speakers) == {f"synth{k:02d}" for k in range(1, 9)}
    # The test voices are drawn from the whole population, not its last few.
    assert test.speakers != ("synth06", "synth07", "synth08")
    assert "test/" in (root / "README.txt").read_text()
    with pytest.raises(DataError, match="demo set in two parts"):
        scan(root)  # train/ and test/ are not two speakers
    with pytest.raises(DataError, match="at least 2 speakers"):
        write_demo(tmp_path / "one", speakers=3, recordings_per_speaker=2, test_speakers=1)


def test_synthetic_speakers_are_told_apart_by_their_fbank(demo):
    # Leave-one-out nearest speaker centroid over each recording's per-bin spread of
    # mean-normalised fbank: a crude stand-in for an embedding network, which must still
    # do far better than the 1 in 6 of chance.
    report = scan(demo)
    stats, labels = [], []
    for recording in report.recordings:
        samples, _ = sf.read(recording.path, dtype="float32")
        stats.append(fbank(torch.from_numpy(samples)).std(dim=0).numpy())
        labels.append(recording.speaker)
    x = np.array(stats)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = np.array(labels)
    correct = 0
    for i in range(len(x)):
        others = np.arange(len(x)) != i
        centroids = {s: x[others & (y == s)].mean(axis=0) for s in set(labels)}
        correct += min(centroids, key=lambda s: np.linalg.norm(x[i] - centroids[s])) == y[i]
    assert correct / len(x) >= 0.7
