"""The SQLite enrollment store: means over every enrollment, persistence, model checks, search."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from spkft.core.embedding import l2_normalise
from spkft.core.enrollment import EnrollmentStore
from spkft.core.errors import EnrollmentError, UnknownSpeakerError

DIM = 8


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    return l2_normalise(rng.standard_normal((n, DIM))).astype(np.float32)


def test_a_speaker_is_the_normalised_mean_of_every_enrolled_recording(tmp_path):
    rng = np.random.default_rng(0)
    first, second = unit(rng, 2), unit(rng, 3)
    store = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    assert store.enroll("alice", first) == 2
    assert store.enroll("alice", second) == 5
    expected = l2_normalise(np.concatenate([first, second]).astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(store.embedding("alice"), expected, atol=1e-6)
    store.close()

    reopened = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    np.testing.assert_allclose(reopened.embedding("alice"), expected, atol=1e-6)
    assert [(s.speaker_id, s.utterance_count) for s in reopened.speakers()] == [("alice", 5)]


def test_the_store_is_a_wal_database(tmp_path):
    EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM).enroll("alice", np.ones(DIM))
    with sqlite3.connect(tmp_path / "e.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_identify_ranks_by_cosine_and_survives_deletes(tmp_path):
    store = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    eye = np.eye(DIM, dtype=np.float32)
    for i in range(5):
        store.enroll(f"s{i}", eye[i])
    query = eye[3] + 0.5 * eye[1]
    assert [m.speaker_id for m in store.identify(query, top_k=2)] == ["s3", "s1"]
    assert store.delete("s1") == 1
    matches = store.identify(query, top_k=10)
    assert [m.speaker_id for m in matches][:1] == ["s3"] and len(matches) == 4
    assert "s1" not in {m.speaker_id for m in matches}
    np.testing.assert_allclose(store.embedding("s4"), eye[4])  # moved into the freed row
    with pytest.raises(UnknownSpeakerError, match="'s1' is not enrolled"):
        store.embedding("s1")
    with pytest.raises(UnknownSpeakerError):
        store.delete("s1")


def test_an_empty_store_identifies_nobody(tmp_path):
    assert EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM).identify(np.ones(DIM), top_k=3) == []


def test_a_store_from_another_model_is_refused(tmp_path):
    EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM).close()
    with pytest.raises(EnrollmentError, match="another model"):
        EnrollmentStore(tmp_path / "e.sqlite", "model-b", DIM)
    with pytest.raises(EnrollmentError, match="dimension 8"):
        EnrollmentStore(tmp_path / "e.sqlite", "model-a", 16)


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "e.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(EnrollmentError, match="not a usable enrollment store"):
        EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)


@pytest.mark.parametrize("speaker_id", ["", "   ", "x" * 257, "\u200b", "\ufeff\u200b", " \u200b\u00a0", "a\nb",
                                        "bob\x00"])
def test_bad_speaker_ids_are_refused(tmp_path, speaker_id):
    store = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    with pytest.raises(EnrollmentError, match="speaker_id"):
        store.enroll(speaker_id, np.ones(DIM))


def test_names_in_any_script_are_speaker_ids(tmp_path):
    store = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    for name in ("Zoë", "李雷", "أحمد", "o'brien-2"):
        assert store.enroll(name, np.ones(DIM)) == 1
    assert len(store) == 4


def test_embeddings_of_the_wrong_size_are_refused(tmp_path):
    store = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    with pytest.raises(EnrollmentError, match=r"\[n >= 1, 8\]"):
        store.enroll("alice", np.ones(DIM + 1))


def test_concurrent_enrollments_all_count(tmp_path):
    store = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    rng = np.random.default_rng(1)
    vectors = unit(rng, 40)

    def enroll(part: np.ndarray) -> None:
        for vector in part:
            store.enroll("alice", vector)

    threads = [threading.Thread(target=enroll, args=(vectors[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.speakers()[0].utterance_count == 40
    np.testing.assert_allclose(store.embedding("alice"), l2_normalise(vectors.astype(np.float64).mean(axis=0)), atol=1e-6)


def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
    first = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    first.enroll("alice", np.ones(DIM))
    with pytest.raises(EnrollmentError, match="in use by another server or process"):
        EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    first.close()
    second = EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    assert [s.speaker_id for s in second.speakers()] == ["alice"]
    second.close()
    # A refused open (another model) leaves the file free for the right one.
    with pytest.raises(EnrollmentError, match="another model"):
        EnrollmentStore(tmp_path / "e.sqlite", "model-b", DIM)
    EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM).close()


def test_a_store_held_by_another_process_is_refused_and_freed_when_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from spkft.core.enrollment import EnrollmentStore
            store = EnrollmentStore({str(tmp_path / "e.sqlite")!r}, "model-a", {DIM})
            print("open", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(EnrollmentError, match="in use by another server or process"):
            EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)
    finally:
        holder.send_signal(signal.SIGKILL)  # as a crash would: no chance to unlock
        holder.wait(timeout=60)
    EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM).close()
