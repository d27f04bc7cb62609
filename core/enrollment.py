"""Enrolled speakers in one SQLite file: enroll, list, delete and 1:N identification.

A speaker's embedding is the L2-normalised mean of the (normalised) embeddings of every
recording ever enrolled for it. The store keeps the float64 *sum* and the count of those
embeddings, so a later enrollment adds to the earlier ones exactly, in any number of calls.

Durability: the file is in WAL mode with ``synchronous=FULL``, and every enrollment or deletion
is one transaction committed before the method returns, so whatever a caller was told has been
stored survives the process being killed (and a power cut).

The store records the embedding dimension and an identifier of the model that made its
embeddings; opening it for another model raises :class:`EnrollmentError` instead of comparing
embeddings from different spaces.

One owner per store file: identification runs on an in-memory matrix of every speaker's
embedding, kept in step with the writes this object makes, so a second writer would leave the two
views disagreeing about who is enrolled. An open store therefore holds an exclusive lock on
``<file>.lock`` (``flock``, released when the store closes or its process dies, ``kill -9``
included), and opening a store that another one holds raises :class:`EnrollmentError`. Replicas
that share enrollments need a server database instead (see DESIGN.md, "Scale"). All methods are
thread-safe.
"""

from __future__ import annotations

import sqlite3
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from spkft.core.embedding import l2_normalise
from spkft.core.errors import EnrollmentError, UnknownSpeakerError

MAX_SPEAKER_ID_LENGTH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS speakers (
    speaker_id TEXT PRIMARY KEY,
    embedding_sum BLOB NOT NULL,
    utterance_count INTEGER NOT NULL CHECK (utterance_count > 0)
);
"""


@dataclass(frozen=True)
class EnrolledSpeaker:
    """A speaker in the store and how many recordings it was enrolled with."""

    speaker_id: str
    utterance_count: int


@dataclass(frozen=True)
class SpeakerMatch:
    """A candidate of an identification: an enrolled speaker and its cosine score."""

    speaker_id: str
    score: float


def check_speaker_id(speaker_id: str) -> str:
    """The identifier itself, or :class:`EnrollmentError` when it is empty, invisible, holds a
    control character or is too long."""
    if not speaker_id or not speaker_id.strip():
        raise EnrollmentError("speaker_id must not be empty")
    # Separators (Z*) and format or control characters (C*: U+200B, U+FEFF, ...) show nothing.
    if all(unicodedata.category(c)[0] in "ZC" for c in speaker_id):
        raise EnrollmentError("speaker_id must hold a visible character; it has only spaces or invisible ones")
    control = next((c for c in speaker_id if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise EnrollmentError(f"speaker_id must not hold control characters (it holds U+{ord(control):04X})")
    if len(speaker_id) > MAX_SPEAKER_ID_LENGTH:
        raise EnrollmentError(f"speaker_id is {len(speaker_id)} characters; at most {MAX_SPEAKER_ID_LENGTH} are allowed")
    return speaker_id


def _own(path: Path) -> FileLock:
    """The store's exclusive lock, taken now; :class:`EnrollmentError` when another store holds it."""
    lock_path = path.with_name(path.name + ".lock")
    # Not thread-local: a server may close its store from another thread than the one that opened it.
    owner = FileLock(lock_path, thread_local=False)
    try:
        owner.acquire(timeout=0)
    except Timeout:
        raise EnrollmentError(
            f"{path}: the enrollment store is in use by another server or process (it holds {lock_path}); "
            "one server owns a SQLite store: stop the other one, or give this one its own --enroll-db file"
        ) from None
    except OSError as exc:
        raise EnrollmentError(f"{path}: cannot lock the enrollment store ({lock_path}): {exc.strerror or exc}") from None
    return owner


class EnrollmentStore:
    """Speakers' embedding sums in a SQLite file, and an in-memory matrix to search them."""

    def __init__(self, path: str | Path, model: str, embedding_dim: int) -> None:
        """Open (or create) the store at ``path`` for embeddings of ``embedding_dim`` from ``model``."""
        self.path = Path(path)
        self.model = model
        self.embedding_dim = embedding_dim
        self._lock = threading.Lock()
        self._owner = _own(self.path)
        try:
            # Autocommit mode: every write below opens its own explicit transaction.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            self._owner.release()
            raise EnrollmentError(f"{self.path}: cannot open the enrollment store: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._claim(model, embedding_dim)
            rows = self._db.execute("SELECT speaker_id, embedding_sum FROM speakers ORDER BY speaker_id").fetchall()
        except BaseException as exc:
            self._db.close()
            self._owner.release()
            if isinstance(exc, sqlite3.Error):
                raise EnrollmentError(f"{self.path}: not a usable enrollment store: {exc}") from None
            raise
        self._ids: list[str] = [speaker_id for speaker_id, _ in rows]
        self._rows: dict[str, int] = {speaker_id: i for i, speaker_id in enumerate(self._ids)}
        self._matrix = np.zeros((max(16, len(rows)), embedding_dim), dtype=np.float32)
        for i, (_, blob) in enumerate(rows):
            self._matrix[i] = l2_normalise(self._decode(blob))

    def _claim(self, model: str, embedding_dim: int) -> None:
        """Record the model on a new store; refuse a store made with another one."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            info = dict(self._db.execute("SELECT key, value FROM store_info"))
            if not info:
                self._db.executemany(
                    "INSERT INTO store_info (key, value) VALUES (?, ?)",
                    [("model", model), ("embedding_dim", str(embedding_dim))],
                )
            elif info.get("model") != model or info.get("embedding_dim") != str(embedding_dim):
                raise EnrollmentError(
                    f"{self.path} holds embeddings of another model (model {info.get('model')}, "
                    f"dimension {info.get('embedding_dim')}), not of this one (model {model}, dimension "
                    f"{embedding_dim}); use another enrollment store or enroll the speakers again"
                )

    @staticmethod
    def _decode(blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, dtype="<f8")

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def enroll(self, speaker_id: str, embeddings: np.ndarray) -> int:
        """Add recordings' embeddings ``[n, dim]`` to a speaker (created when new); its new recording count."""
        check_speaker_id(speaker_id)
        embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        if embeddings.shape[0] == 0 or embeddings.shape[1] != self.embedding_dim:
            raise EnrollmentError(
                f"expected embeddings [n >= 1, {self.embedding_dim}], got {list(embeddings.shape)}"
            )
        added = l2_normalise(embeddings).sum(axis=0)
        with self._lock:
            with self._db:  # committed (or rolled back) before the matrix changes
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT embedding_sum, utterance_count FROM speakers WHERE speaker_id = ?", (speaker_id,)
                ).fetchone()
                total = added if row is None else self._decode(row[0]) + added
                count = len(embeddings) + (0 if row is None else row[1])
                self._db.execute(
                    "INSERT OR REPLACE INTO speakers (speaker_id, embedding_sum, utterance_count) VALUES (?, ?, ?)",
                    (speaker_id, total.astype("<f8").tobytes(), count),
                )
            self._set_row(speaker_id, l2_normalise(total))
        return count

    def speakers(self) -> list[EnrolledSpeaker]:
        """Every enrolled speaker, ordered by identifier."""
        with self._lock:
            rows = self._db.execute("SELECT speaker_id, utterance_count FROM speakers ORDER BY speaker_id").fetchall()
        return [EnrolledSpeaker(speaker_id, count) for speaker_id, count in rows]

    def embedding(self, speaker_id: str) -> np.ndarray:
        """The speaker's normalised mean embedding; :class:`UnknownSpeakerError` when not enrolled."""
        with self._lock:
            row = self._rows.get(speaker_id)
            if row is None:
                raise UnknownSpeakerError(f"speaker {speaker_id!r} is not enrolled")
            return self._matrix[row].copy()

    def delete(self, speaker_id: str) -> int:
        """Remove a speaker; how many recordings it had. :class:`UnknownSpeakerError` when not enrolled."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT utterance_count FROM speakers WHERE speaker_id = ?", (speaker_id,)
                ).fetchone()
                if row is None:
                    raise UnknownSpeakerError(f"speaker {speaker_id!r} is not enrolled")
                self._db.execute("DELETE FROM speakers WHERE speaker_id = ?", (speaker_id,))
            self._drop_row(speaker_id)
        return row[0]

    def identify(self, embedding: np.ndarray, top_k: int = 1) -> list[SpeakerMatch]:
        """The ``top_k`` enrolled speakers with the highest cosine score, best first."""
        if top_k < 1:
            raise EnrollmentError(f"top_k must be at least 1, got {top_k}")
        query = l2_normalise(np.asarray(embedding, dtype=np.float32))
        with self._lock:
            scores = self._matrix[: len(self._ids)] @ query
            ids = list(self._ids)
        k = min(top_k, len(ids))
        best = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=int)
        best = best[np.argsort(-scores[best], kind="stable")]
        return [SpeakerMatch(ids[i], float(np.clip(scores[i], -1.0, 1.0))) for i in best]

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._owner.release()

    def _set_row(self, speaker_id: str, vector: np.ndarray) -> None:
        row = self._rows.get(speaker_id)
        if row is None:
            row = len(self._ids)
            if row == len(self._matrix):  # grow by doubling: appends stay amortised O(dim)
                self._matrix = np.concatenate([self._matrix, np.zeros_like(self._matrix)])
            self._ids.append(speaker_id)
            self._rows[speaker_id] = row
        self._matrix[row] = vector

    def _drop_row(self, speaker_id: str) -> None:
        # Move the last speaker into the freed row so the live rows stay contiguous.
        row = self._rows.pop(speaker_id)
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._ids[row] = moved
            self._rows[moved] = row
            self._matrix[row] = self._matrix[last]
        self._ids.pop()
