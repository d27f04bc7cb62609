"""The enrollment store, in SQLite and in PostgreSQL: means over every enrollment, persistence,
model checks, search; one owner per SQLite file; replicas that follow each other on PostgreSQL."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from spkft.core.embedding import l2_normalise
from spkft.core import enrollment
from spkft.core.enrollment import EnrollmentStore, open_backend
from spkft.core.errors import EnrollmentError, StoreUnavailableError, UnknownSpeakerError

DIM = 8
# The search matrix is float16: embeddings and scores read from it are this close to float64 ones.
SEARCH_ATOL = 1e-3


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a store lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "e.sqlite"
    return request.getfixturevalue("postgres_url")


_opened: list[EnrollmentStore] = []


def store_at(location, model: str = "model-a", dim: int = DIM) -> EnrollmentStore:
    """An open store, closed when the test ends (a PostgreSQL one stops following its database)."""
    _opened.append(EnrollmentStore(location, model, dim))
    return _opened[-1]


@pytest.fixture(autouse=True)
def _close_stores():
    yield
    while _opened:
        _opened.pop().close()


def stored_sum(location, speaker_id: str) -> np.ndarray:
    backend = open_backend(location)
    try:
        return backend.read([speaker_id], DIM)[speaker_id]
    finally:
        backend.close()


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    return l2_normalise(rng.standard_normal((n, DIM))).astype(np.float32)


def test_a_speaker_is_the_normalised_mean_of_every_enrolled_recording(location):
    rng = np.random.default_rng(0)
    first, second = unit(rng, 2), unit(rng, 3)
    store = store_at(location)
    assert store.enroll("alice", first) == 2
    assert store.enroll("alice", second) == 5
    expected = l2_normalise(np.concatenate([first, second]).astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(store.embedding("alice"), expected, atol=SEARCH_ATOL)
    store.close()
    # The store keeps the exact float64 sum of the normalised embeddings.
    np.testing.assert_allclose(stored_sum(location, "alice"), l2_normalise(np.concatenate([first, second]).astype(np.float64)).sum(axis=0),
                               rtol=1e-12)

    reopened = store_at(location)
    np.testing.assert_allclose(reopened.embedding("alice"), expected, atol=SEARCH_ATOL)
    assert [(s.speaker_id, s.utterance_count) for s in reopened.speakers()] == [("alice", 5)]
    reopened.close()


def test_the_store_is_a_wal_database(tmp_path):
    EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM).enroll("alice", np.ones(DIM))
    with sqlite3.connect(tmp_path / "e.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_identify_ranks_by_cosine_and_survives_deletes(location):
    store = store_at(location)
    eye = np.eye(DIM, dtype=np.float32)
    for i in range(5):
        store.enroll(f"s{i}", eye[i])
    query = eye[3] + 0.5 * eye[1]
    assert [m.speaker_id for m in store.identify(query, top_k=2)] == ["s3", "s1"]
    assert store.delete("s1") == 1
    matches = store.identify(query, top_k=10)
    assert [m.speaker_id for m in matches][:1] == ["s3"] and len(matches) == 4
    assert "s1" not in {m.speaker_id for m in matches}
    np.testing.assert_allclose(store.embedding("s4"), eye[4])  # moved into the freed row (exact in float16)
    with pytest.raises(UnknownSpeakerError, match="'s1' is not enrolled"):
        store.embedding("s1")
    with pytest.raises(UnknownSpeakerError):
        store.delete("s1")


def test_an_empty_store_identifies_nobody(location):
    assert store_at(location).identify(np.ones(DIM), top_k=3) == []


def test_a_store_from_another_model_is_refused(location):
    store_at(location).close()
    with pytest.raises(EnrollmentError, match="another model"):
        store_at(location, "model-b")
    with pytest.raises(EnrollmentError, match="dimension 8"):
        store_at(location, dim=16)


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "e.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(EnrollmentError, match="not a usable enrollment store"):
        EnrollmentStore(tmp_path / "e.sqlite", "model-a", DIM)


@pytest.mark.parametrize("speaker_id", ["", "   ", "x" * 257, "\u200b", "\ufeff\u200b", " \u200b\u00a0", "a\nb",
                                        "bob\x00"])
def test_bad_speaker_ids_are_refused(location, speaker_id):
    store = store_at(location)
    with pytest.raises(EnrollmentError, match="speaker_id"):
        store.enroll(speaker_id, np.ones(DIM))


def test_names_in_any_script_are_speaker_ids(location):
    store = store_at(location)
    for name in ("Zoë", "李雷", "أحمد", "o'brien-2"):
        assert store.enroll(name, np.ones(DIM)) == 1
    assert len(store) == 4


def test_embeddings_of_the_wrong_size_are_refused(location):
    store = store_at(location)
    with pytest.raises(EnrollmentError, match=r"\[n >= 1, 8\]"):
        store.enroll("alice", np.ones(DIM + 1))


def test_concurrent_enrollments_all_count(location):
    store = store_at(location)
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
    np.testing.assert_allclose(store.embedding("alice"), l2_normalise(vectors.astype(np.float64).mean(axis=0)),
                               atol=SEARCH_ATOL)
    store.close()
    np.testing.assert_allclose(stored_sum(location, "alice"), l2_normalise(vectors.astype(np.float64)).sum(axis=0),
                               atol=1e-12)


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


# ---------------------------------------------------------------- PostgreSQL: replicas share one store


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.01)


def test_replicas_on_one_database_see_each_others_writes_within_a_second(postgres_url):
    a, b = store_at(postgres_url), store_at(postgres_url)
    vector = np.eye(DIM)[2]
    a.enroll("alice", vector)
    wait_until(lambda: [m.speaker_id for m in b.identify(vector, top_k=1)] == ["alice"], timeout=1.0)
    np.testing.assert_allclose(b.embedding("alice"), vector)
    b.enroll("alice", vector)  # adds to what a enrolled
    wait_until(lambda: a.speakers() == b.speakers() and a.speakers()[0].utterance_count == 2, timeout=1.0)
    assert b.delete("alice") == 2
    wait_until(lambda: a.identify(vector, top_k=1) == [], timeout=1.0)
    with pytest.raises(UnknownSpeakerError):
        a.embedding("alice")
    with pytest.raises(UnknownSpeakerError):  # already gone: deleted on b
        a.delete("alice")


def test_replicas_creating_one_speaker_at_once_lose_no_recording(postgres_url):
    stores = [store_at(postgres_url) for _ in range(3)]
    vectors = unit(np.random.default_rng(3), 30)

    def enroll(store: EnrollmentStore, part: np.ndarray) -> None:
        for vector in part:
            store.enroll("bob", vector)

    threads = [threading.Thread(target=enroll, args=(stores[i % 3], vectors[i::6])) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stores[0].speakers()[0].utterance_count == 30
    expected = l2_normalise(vectors.astype(np.float64).mean(axis=0))
    for store in stores:
        wait_until(lambda: np.allclose(store.embedding("bob"), expected, atol=SEARCH_ATOL), timeout=1.0)


def test_a_lost_database_refuses_writes_and_is_followed_again_when_it_returns(postgres_url, postgres_control):
    store = store_at(postgres_url)
    store.enroll("carol", np.eye(DIM)[0])
    seen = []
    store.on_reachability(seen.append)
    postgres_control("stop")
    wait_until(lambda: not store.reachable, timeout=10)
    assert seen == [False]
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        store.enroll("dave", np.eye(DIM)[1])
    assert [m.speaker_id for m in store.identify(np.eye(DIM)[0])] == ["carol"]  # searches go on from memory
    postgres_control("start")
    wait_until(lambda: store.reachable, timeout=15)
    assert seen == [False, True]
    assert store.enroll("dave", np.eye(DIM)[1]) == 1
    other = store_at(postgres_url)
    other.delete("carol")
    wait_until(lambda: [m.speaker_id for m in store.identify(np.eye(DIM)[0])] == ["dave"], timeout=1.0)


def test_a_postgres_store_from_another_model_is_refused_and_the_url_password_is_not_shown(postgres_url):
    store_at(postgres_url).close()
    with_password = postgres_url.replace("postgres@", "postgres:hunter2@")
    with pytest.raises(EnrollmentError, match="another model") as caught:
        store_at(with_password, "model-b")
    assert "hunter2" not in str(caught.value)


def test_an_unreachable_database_is_one_clear_error():
    with pytest.raises(EnrollmentError, match="cannot connect to the enrollment database.*refused"):
        EnrollmentStore("postgresql://nobody@127.0.0.1:1/spkft", "model-a", DIM)


def test_speakers_are_listed_in_code_point_order_a_page_at_a_time(location):
    store = store_at(location)
    names = ["Zoë", "alice", "Émile", "bob", "李雷", "Bob", "zed"]
    for name in names:
        store.enroll(name, np.ones(DIM))
    everyone = [s.speaker_id for s in store.speakers()]
    assert everyone == sorted(names)  # Python sorts str by code point too
    pages, after = [], None
    while page := store.speakers(after=after, limit=3):
        pages.append([s.speaker_id for s in page])
        after = page[-1].speaker_id
    assert [len(p) for p in pages] == [3, 3, 1] and sum(pages, []) == everyone


@pytest.mark.parametrize("parallel_rows", [100_000, 500], ids=["one scan", "scan split across threads"])
def test_search_finds_the_exact_top_matches_among_many_speakers(tmp_path, monkeypatch, parallel_rows):
    # With more speakers than candidates, the int8 scan picks candidates and float32 scores them.
    monkeypatch.setattr(enrollment, "PARALLEL_SCAN_ROWS", parallel_rows)
    rng = np.random.default_rng(5)
    dim = 64
    vectors = rng.standard_normal((3000, dim))
    store = store_at(tmp_path / "e.sqlite", dim=dim)
    for i, vector in enumerate(vectors):
        store.enroll(f"s{i:04d}", vector)
    unit = l2_normalise(vectors)
    for query in rng.standard_normal((20, dim)):
        exact = unit @ l2_normalise(query)
        best = np.argsort(-exact)[:5]
        matches = store.identify(query, top_k=5)
        assert [m.speaker_id for m in matches] == [f"s{i:04d}" for i in best]
        np.testing.assert_allclose([m.score for m in matches], exact[best], atol=SEARCH_ATOL)
