"""Enrolled speakers: enroll, list, delete and 1:N identification, kept in SQLite or PostgreSQL.

A speaker's embedding is the L2-normalised mean of the (normalised) embeddings of every
recording ever enrolled for it. A store keeps the float64 *sum* and the count of those
embeddings, so a later enrollment adds to the earlier ones exactly, in any number of calls.

Where it is kept (:func:`open_backend` picks by the location):
- a file path: SQLite (:class:`SqliteBackend`), owned by one process. The file is in WAL mode
  with ``synchronous=FULL``, and the store holds an exclusive lock on ``<file>.lock`` (``flock``,
  released when it closes or its process dies, ``kill -9`` included), so a second server on the
  same file is refused instead of drifting apart from the first;
- a ``postgresql://`` URL: PostgreSQL (:mod:`spkft.core.enrollment_postgres`), shared by any
  number of server replicas, each of which follows the others' writes.

Both hold one schema, version :data:`SCHEMA_VERSION`: ``store_info`` (key, value: ``model``,
``embedding_dim``, ``schema_version``) and ``speakers`` (``speaker_id`` text primary key,
``embedding_sum`` the little-endian float64 sum as bytes, ``utterance_count`` > 0). Every
enrollment or deletion is one transaction committed before the method returns, so whatever a
caller was told has been stored survives the process being killed. A store records the model
that made its embeddings and their dimension; opening it for another model raises
:class:`EnrollmentError` instead of comparing embeddings from different spaces.

Search runs on an in-memory :class:`SpeakerIndex`: every speaker's normalised embedding in
float16, and again as int8 codes that a scan reads (580 MB in all for a million 192-dimensional
speakers). A scan is bound by memory bandwidth, so reading a byte per value instead of four makes
it several times faster than float32; the best candidates are then scored in float32 from their
float16 rows, so a score is within about 1e-4 of the float64 one. All methods are thread-safe.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from spkft.core.errors import EnrollmentError, StoreUnavailableError, UnknownSpeakerError
from spkft.core.plda import Plda
from spkft.core.scoring import l2_normalise

MAX_SPEAKER_ID_LENGTH = 256
SCHEMA_VERSION = 1
# Speakers read from the database at a time when a store opens: bounds the memory of loading.
LOAD_CHUNK = 50_000
# Below this many speakers one thread scans them all; above, the scan is split across the cores.
PARALLEL_SCAN_ROWS = 100_000


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


@dataclass(frozen=True)
class StoredSpeakers:
    """A block of speakers as a backend reads them: identifiers and float64 sums ``[n, dim]``."""

    speaker_ids: list[str]
    sums: np.ndarray
    counts: np.ndarray


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


def is_database_url(location: str | Path) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def encode_sum(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f8").tobytes()


def decode_sums(blobs: list[bytes], dim: int) -> np.ndarray:
    """Stored sums ``[n, dim]`` from their bytes, in one step (no per-row arrays)."""
    return np.frombuffer(b"".join(blobs), dtype="<f8").reshape(len(blobs), dim)


def check_store_info(info: dict[str, str], model: str, embedding_dim: int, location: str) -> None:
    """Refuse a store made with another model, of another dimension, or by a newer spkft."""
    version = int(info.get("schema_version", "1"))
    if version > SCHEMA_VERSION:
        raise EnrollmentError(f"{location}: the enrollment store has schema version {version}, newer than this "
                              f"spkft knows ({SCHEMA_VERSION}); upgrade spkft to use it")
    if info.get("model") != model or info.get("embedding_dim") != str(embedding_dim):
        raise EnrollmentError(
            f"{location} holds embeddings of another model (model {info.get('model')}, dimension "
            f"{info.get('embedding_dim')}), not of this one (model {model}, dimension {embedding_dim}); "
            "use another enrollment store or enroll the speakers again"
        )


class SpeakerIndex:
    """Every speaker's normalised embedding, searched by cosine or, given a PLDA, by its LLR.

    Each embedding is held twice: in float16, for scores and :meth:`embedding`, and as int8
    codes with a scale per row (the largest magnitude maps to 127), for the scan. A search scans
    the int8 codes, a quarter of float32's bytes, with an int8 matrix product (``torch._int_mm``,
    VNNI on CPUs that have it) to find the best candidates, then scores those in float32 from
    their float16 rows.

    With a PLDA, a speaker's LLR against a query ``q`` is ``w . u(q) + t + own(q)``
    (:meth:`spkft.core.plda.Plda.enrolled_terms`): the codes hold each speaker's ``[w, t / c]``
    and a query scans with ``[u(q), c]``, one matrix product as for cosines (``c`` keeps ``t``, a
    sum over every dimension, on the scale of ``w``'s entries, so that int8 keeps both).
    """

    def __init__(self, dim: int, capacity: int = 16, plda: Plda | None = None) -> None:
        self.dim = dim
        self.plda = plda
        self._lock = threading.Lock()
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        capacity = max(16, capacity)
        self._matrix = np.zeros((capacity, dim), dtype=np.float16)
        # What the scan multiplies: the embedding itself, or the speaker's PLDA terms.
        self._scan_dim = dim if plda is None else plda.dim + 1
        self._term_scale = np.float32(1.0 if plda is None else np.sqrt(plda.dim))
        self._codes = np.zeros((capacity, self._scan_dim), dtype=np.int8)
        self._scales = np.zeros(capacity, dtype=np.float32)

    @classmethod
    def of(cls, dim: int, blocks: Iterator[StoredSpeakers], expected: int = 0, plda: Plda | None = None
           ) -> SpeakerIndex:
        """An index of the speakers in ``blocks``, each block normalised in one vectorised step,
        with room for ``expected`` speakers (grown by doubling if there are more)."""
        index = cls(dim, expected + 16, plda)
        n = 0
        # Reading a block and normalising the one before overlap: a worker thread does the NumPy
        # work, which releases the GIL, while this thread reads from the database.
        with ThreadPoolExecutor(1, thread_name_prefix="spkft-index") as worker:
            pending = None
            for block in blocks:
                end = n + len(block.speaker_ids)
                if pending is not None:
                    pending.result()
                while end > len(index._matrix):
                    index._grow()
                pending = worker.submit(lambda rows, sums: index._set(rows, _normalised32(sums)), slice(n, end),
                                        block.sums)
                index._ids += block.speaker_ids
                n = end
            if pending is not None:
                pending.result()
        index._rows = {speaker_id: i for i, speaker_id in enumerate(index._ids)}
        return index

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def __contains__(self, speaker_id: str) -> bool:
        with self._lock:
            return speaker_id in self._rows

    @property
    def nbytes(self) -> int:
        return self._matrix.nbytes + self._codes.nbytes + self._scales.nbytes

    def _grow(self) -> None:
        """Double the room (appends stay amortised O(dim))."""
        self._matrix = np.concatenate([self._matrix, np.zeros_like(self._matrix)])
        self._codes = np.concatenate([self._codes, np.zeros_like(self._codes)])
        self._scales = np.concatenate([self._scales, np.zeros_like(self._scales)])

    def _set(self, rows, vectors: np.ndarray) -> None:
        """Write unit ``vectors`` (float32) into ``rows`` of every array."""
        self._matrix[rows] = vectors
        if self.plda is None:
            self._codes[rows], self._scales[rows] = _quantised(vectors)
            return
        weights, terms = self.plda.enrolled_terms(np.atleast_2d(vectors))
        scanned = np.concatenate([weights, (terms / self._term_scale)[:, None]], axis=1).astype(np.float32)
        codes, scales = _quantised(scanned)
        self._codes[rows], self._scales[rows] = (codes[0], scales[0]) if np.ndim(vectors) == 1 else (codes, scales)

    def _scores(self, rows: np.ndarray, query: np.ndarray, query_terms: tuple[np.ndarray, float] | None
                ) -> np.ndarray:
        """Exact scores of ``rows`` against the unit ``query``: cosines, or with the query's PLDA
        terms (:meth:`~spkft.core.plda.Plda.query_terms`) LLRs."""
        enrolled = self._matrix[rows].astype(np.float32)
        if query_terms is None:
            return np.clip(enrolled @ query, -1.0, 1.0)
        weights, terms = self.plda.enrolled_terms(enrolled)
        projected, own = query_terms
        return weights @ projected + terms + np.float32(own)

    def put(self, speaker_id: str, total: np.ndarray) -> None:
        """Set a speaker's embedding from its stored sum (adding the speaker when new)."""
        vector = _normalised32(np.asarray(total)[None])[0]
        with self._lock:
            row = self._rows.get(speaker_id)
            if row is None:
                row = len(self._ids)
                if row == len(self._matrix):
                    self._grow()
                self._ids.append(speaker_id)
                self._rows[speaker_id] = row
            self._set(row, vector)

    def drop(self, speaker_id: str) -> None:
        """Remove a speaker (nothing happens when it is absent)."""
        with self._lock:
            row = self._rows.pop(speaker_id, None)
            if row is None:
                return
            # Move the last speaker into the freed row so the live rows stay contiguous.
            last = len(self._ids) - 1
            if row != last:
                moved = self._ids[last]
                self._ids[row] = moved
                self._rows[moved] = row
                for array in (self._matrix, self._codes, self._scales):
                    array[row] = array[last]
            self._ids.pop()

    def embedding(self, speaker_id: str) -> np.ndarray:
        """The speaker's normalised embedding (float32); :class:`UnknownSpeakerError` when absent."""
        with self._lock:
            row = self._rows.get(speaker_id)
            if row is None:
                raise UnknownSpeakerError(f"speaker {speaker_id!r} is not enrolled")
            return self._matrix[row].astype(np.float32)

    def identify(self, query: np.ndarray, top_k: int) -> list[SpeakerMatch]:
        """The ``top_k`` speakers with the highest score (cosine, or PLDA LLR) for ``query``, best first."""
        query = l2_normalise(np.asarray(query, dtype=np.float32))
        with self._lock:
            n = len(self._ids)
            k = min(top_k, n)
            if k == 0:
                return []
            # int8 scores find the candidates; more than asked absorb their rounding (about 1e-3).
            candidates = min(n, max(4 * k, k + 64))
            query_terms = None if self.plda is None else self.plda.query_terms(query)
            if candidates < n:
                scanned = query if query_terms is None else np.append(query_terms[0], self._term_scale)
                codes, _ = _quantised(scanned.astype(np.float32, copy=False))  # one scale for every score: it does not change their order
                coarse = _scan(self._codes[:n], self._scales[:n], codes)
                rows = torch.topk(coarse, candidates, sorted=False).indices.numpy()
            else:
                rows = np.arange(n)
            scores = self._scores(rows, query, query_terms)
            order = np.argsort(-scores, kind="stable")[:k]
            return [SpeakerMatch(self._ids[rows[i]], float(scores[i])) for i in order]


def _normalised32(sums: np.ndarray) -> np.ndarray:
    """Rows of ``sums`` scaled to unit length, in float32 (all that a float16 matrix can keep)."""
    rows = sums.astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))[:, None]
    return np.divide(rows, np.maximum(norms, 1e-12), out=rows)


def _quantised(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes of float32 ``vectors`` (each row's largest magnitude maps to 127) and each row's scale."""
    scales = np.maximum(np.abs(vectors).max(axis=-1), np.float32(1e-12)) / np.float32(127)
    return np.rint(vectors * (1 / scales)[..., None]).astype(np.int8), scales


def stored_block(rows: list[tuple[str, bytes, int]], dim: int) -> StoredSpeakers:
    """A block of ``(speaker_id, embedding_sum, utterance_count)`` rows as a backend reads them."""
    return StoredSpeakers([row[0] for row in rows], decode_sums([row[1] for row in rows], dim),
                          np.fromiter((row[2] for row in rows), dtype=np.int64, count=len(rows)))


_scan_pool: ThreadPoolExecutor | None = None
_scan_pool_lock = threading.Lock()


def _scan(codes: np.ndarray, scales: np.ndarray, query: np.ndarray) -> torch.Tensor:
    """Approximate cosines of every row to ``query`` from int8 codes, split across the cores when there are many.

    The slices run in threads of their own, each on one core, whatever torch's thread setting
    (a server keeps torch at one thread for its many request threads).
    """
    global _scan_pool
    column = torch.from_numpy(query)[:, None]

    def part(rows: slice) -> torch.Tensor:
        products = torch._int_mm(torch.from_numpy(codes[rows]), column)[:, 0]
        return products.to(torch.float32) * torch.from_numpy(scales[rows])

    parts = min(os.cpu_count() or 1, max(1, len(codes) // PARALLEL_SCAN_ROWS))
    if parts == 1:
        return part(slice(None))
    with _scan_pool_lock:
        if _scan_pool is None:
            _scan_pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="spkft-scan")
    bounds = np.linspace(0, len(codes), parts + 1).astype(int)
    return torch.cat(list(_scan_pool.map(part, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])])))


class SqliteBackend:
    """The store's rows in a SQLite file, owned (``<file>.lock``) by the process that opened it."""

    shared = False  # no other process writes to it: the store applies its own writes directly
    reachable = True  # a local file is never lost

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)
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
            self._db.executescript(_SQLITE_SCHEMA)
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise EnrollmentError(f"{self.path}: not a usable enrollment store: {exc}") from None
            raise

    def on_reachability(self, callback: Callable[[bool], None]) -> None:
        """Nothing to report: a local file's reachability never changes."""

    def _guarded(self, work: Callable[[], object]):
        with self._lock:
            try:
                return work()
            except sqlite3.Error as exc:
                raise EnrollmentError(f"{self.path}: not a usable enrollment store: {exc}") from None

    def info(self) -> dict[str, str]:
        return self._guarded(lambda: dict(self._db.execute("SELECT key, value FROM store_info")))

    def claim(self, model: str, embedding_dim: int) -> None:
        """Record the model on a new store; refuse a store made with another one."""

        def claim() -> None:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                info = dict(self._db.execute("SELECT key, value FROM store_info"))
                if not info:
                    self._db.executemany("INSERT INTO store_info (key, value) VALUES (?, ?)",
                                         info_rows(model, embedding_dim))
                    return
                check_store_info(info, model, embedding_dim, self.location)
                if "schema_version" not in info:  # stores from before the version was recorded are version 1
                    self._db.execute("INSERT INTO store_info (key, value) VALUES ('schema_version', ?)",
                                     (str(SCHEMA_VERSION),))

        self._guarded(claim)

    def count(self) -> int:
        return self._guarded(lambda: self._db.execute("SELECT count(*) FROM speakers").fetchone()[0])

    def blocks(self, dim: int) -> Iterator[StoredSpeakers]:
        with self._lock:
            cursor = self._db.execute("SELECT speaker_id, embedding_sum, utterance_count FROM speakers")
            while rows := cursor.fetchmany(LOAD_CHUNK):
                yield stored_block(rows, dim)

    def add(self, speaker_id: str, vector: np.ndarray, n: int) -> tuple[np.ndarray, int]:
        """Add ``vector``, the sum of ``n`` recordings' normalised embeddings, to a speaker; its new sum and count."""

        def add() -> tuple[np.ndarray, int]:
            with self._db:  # committed (or rolled back) before returning
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT embedding_sum, utterance_count FROM speakers WHERE speaker_id = ?",
                                       (speaker_id,)).fetchone()
                total = vector if row is None else decode_sums([row[0]], len(vector))[0] + vector
                count = n + (0 if row is None else row[1])
                self._db.execute("INSERT OR REPLACE INTO speakers (speaker_id, embedding_sum, utterance_count) "
                                 "VALUES (?, ?, ?)", (speaker_id, encode_sum(total), count))
            return total, count

        return self._guarded(add)

    def remove(self, speaker_id: str) -> int:
        def remove() -> int:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT utterance_count FROM speakers WHERE speaker_id = ?",
                                       (speaker_id,)).fetchone()
                if row is None:
                    raise UnknownSpeakerError(f"speaker {speaker_id!r} is not enrolled")
                self._db.execute("DELETE FROM speakers WHERE speaker_id = ?", (speaker_id,))
            return row[0]

        return self._guarded(remove)

    def read(self, speaker_ids: list[str], dim: int) -> dict[str, np.ndarray]:
        """The current sums of those of ``speaker_ids`` that are enrolled."""
        marks = ", ".join("?" * len(speaker_ids))
        rows = self._guarded(lambda: self._db.execute(
            f"SELECT speaker_id, embedding_sum FROM speakers WHERE speaker_id IN ({marks})", list(speaker_ids)
        ).fetchall())
        return dict(zip((r[0] for r in rows), decode_sums([r[1] for r in rows], dim))) if rows else {}

    def listing(self, after: str | None = None, limit: int | None = None) -> list[EnrolledSpeaker]:
        """Speakers in code-point order (SQLite's BINARY collation of UTF-8 text) after ``after``, at most ``limit``."""
        rows = self._guarded(lambda: self._db.execute(
            "SELECT speaker_id, utterance_count FROM speakers WHERE speaker_id > ? ORDER BY speaker_id LIMIT ?",
            ("" if after is None else after, -1 if limit is None else limit)).fetchall())
        return [EnrolledSpeaker(speaker_id, count) for speaker_id, count in rows]

    def write_blocks(self, blocks: Iterator[StoredSpeakers]) -> None:
        """Insert speakers in bulk, in one transaction (for a migration into an empty store)."""

        def write() -> None:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                for block in blocks:
                    self._db.executemany(
                        "INSERT INTO speakers (speaker_id, embedding_sum, utterance_count) VALUES (?, ?, ?)",
                        ((i, encode_sum(s), int(c)) for i, s, c in zip(block.speaker_ids, block.sums, block.counts)),
                    )

        self._guarded(write)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._owner.release()


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS speakers (
    speaker_id TEXT PRIMARY KEY,
    embedding_sum BLOB NOT NULL,
    utterance_count INTEGER NOT NULL CHECK (utterance_count > 0)
);
"""


def info_rows(model: str, embedding_dim: int) -> list[tuple[str, str]]:
    return [("model", model), ("embedding_dim", str(embedding_dim)), ("schema_version", str(SCHEMA_VERSION))]


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
            "one server owns a SQLite store: stop the other one, give this one its own --enroll-db file, "
            "or share a PostgreSQL store between servers"
        ) from None
    except OSError as exc:
        raise EnrollmentError(f"{path}: cannot lock the enrollment store ({lock_path}): {exc.strerror or exc}") from None
    return owner


def open_backend(location: str | Path):
    """The backend for ``location``: PostgreSQL for a ``postgresql://`` URL, else a SQLite file."""
    if is_database_url(location):
        from spkft.core.enrollment_postgres import PostgresBackend  # psycopg only where it is used

        return PostgresBackend(str(location))
    return SqliteBackend(location)


class EnrollmentStore:
    """Enrolled speakers in a backend, with an in-memory :class:`SpeakerIndex` to search them.

    With a shared backend (PostgreSQL), the store re-reads every speaker that changes, its own
    writes included, from the database, one read at a time: the last read applied is the latest
    committed state, whatever order writes from several replicas arrive in.
    """

    def __init__(self, location: str | Path, model: str, embedding_dim: int, plda: Plda | None = None) -> None:
        """Open (or create) the store at ``location`` (a SQLite path or a ``postgresql://`` URL);
        ``plda``: identify by its LLR rather than the cosine."""
        backend = open_backend(location)
        self.model = model
        self.embedding_dim = embedding_dim
        self.plda = plda
        self.location = backend.location
        self._backend = backend
        self._refreshing = threading.Lock()  # one read-and-apply at a time (shared backends)
        try:
            backend.claim(model, embedding_dim)
            self._index = SpeakerIndex(embedding_dim, plda=plda)
            if backend.shared:
                backend.follow(self._refresh, self._reload)  # loads every speaker once it listens for changes
            else:
                self._index = SpeakerIndex.of(embedding_dim, backend.blocks(embedding_dim), backend.count(), plda)
        except BaseException:
            backend.close()
            raise

    @property
    def kind(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return "postgresql" if self._backend.shared else "sqlite"

    @property
    def reachable(self) -> bool:
        """Whether the backend can be written now (a SQLite file always can)."""
        return self._backend.reachable

    def on_reachability(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(reachable)`` whenever the database is lost or found again."""
        self._backend.on_reachability(callback)

    @property
    def index_bytes(self) -> int:
        return self._index.nbytes

    def __len__(self) -> int:
        return len(self._index)

    def enroll(self, speaker_id: str, embeddings: np.ndarray) -> int:
        """Add recordings' embeddings ``[n, dim]`` to a speaker (created when new); its new recording count."""
        check_speaker_id(speaker_id)
        embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        if embeddings.shape[0] == 0 or embeddings.shape[1] != self.embedding_dim:
            raise EnrollmentError(
                f"expected embeddings [n >= 1, {self.embedding_dim}], got {list(embeddings.shape)}"
            )
        added = l2_normalise(embeddings).sum(axis=0)
        if not self._backend.shared:
            with self._refreshing:  # the write and the index change in one order
                total, count = self._backend.add(speaker_id, added, len(embeddings))
                self._index.put(speaker_id, total)
            return count
        total, count = self._backend.add(speaker_id, added, len(embeddings))
        self._refresh_after_write(speaker_id, total)
        return count

    def delete(self, speaker_id: str) -> int:
        """Remove a speaker; how many recordings it had. :class:`UnknownSpeakerError` when not enrolled."""
        if not self._backend.shared:
            with self._refreshing:
                count = self._backend.remove(speaker_id)
                self._index.drop(speaker_id)
            return count
        try:
            count = self._backend.remove(speaker_id)
        except UnknownSpeakerError:
            self._refresh([speaker_id])  # another replica may have deleted it first
            raise
        self._refresh_after_write(speaker_id, None)
        return count

    def speakers(self, after: str | None = None, limit: int | None = None) -> list[EnrolledSpeaker]:
        """Enrolled speakers ordered by identifier (by code point): those after ``after``, at most ``limit``."""
        return self._backend.listing(after, limit)

    def embedding(self, speaker_id: str) -> np.ndarray:
        """The speaker's normalised mean embedding; :class:`UnknownSpeakerError` when not enrolled."""
        return self._index.embedding(speaker_id)

    def identify(self, embedding: np.ndarray, top_k: int = 1) -> list[SpeakerMatch]:
        """The ``top_k`` enrolled speakers with the highest score (cosine, or the PLDA's LLR), best first."""
        if top_k < 1:
            raise EnrollmentError(f"top_k must be at least 1, got {top_k}")
        return self._index.identify(embedding, top_k)

    def close(self) -> None:
        self._backend.close()

    def _refresh(self, speaker_ids) -> None:
        """Apply the database's current state of ``speaker_ids`` to the index."""
        with self._refreshing:
            current = self._backend.read(speaker_ids, self.embedding_dim)
            for speaker_id in speaker_ids:
                if speaker_id in current:
                    self._index.put(speaker_id, current[speaker_id])
                else:
                    self._index.drop(speaker_id)

    def _refresh_after_write(self, speaker_id: str, total: np.ndarray | None) -> None:
        """Show a committed write of this store in its index (``total`` None: a deletion).

        The write is committed, so the caller is told it succeeded even when the database is lost
        just after: the index then takes the write's own result, and the full read that follows
        reconnection settles any concurrent write from another replica.
        """
        try:
            self._refresh([speaker_id])
        except StoreUnavailableError:
            with self._refreshing:
                if total is None:
                    self._index.drop(speaker_id)
                else:
                    self._index.put(speaker_id, total)

    def _reload(self) -> None:
        """Read every speaker again (after the connection to the database was lost)."""
        with self._refreshing:
            self._index = SpeakerIndex.of(self.embedding_dim, self._backend.blocks(self.embedding_dim),
                                          self._backend.count(), self.plda)


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate` copied: speakers and recordings, from and to where."""

    source: str
    destination: str
    speakers: int
    recordings: int


def migrate(source: str | Path, destination: str | Path) -> Migration:
    """Copy every speaker of the store at ``source`` into the empty store at ``destination``
    (SQLite or PostgreSQL, either way), then check that both hold the same speakers, counts and
    sums, bit for bit.

    A SQLite source is locked while it is read, so no server writes to it meanwhile. Raises
    :class:`EnrollmentError` when the source is missing or not a store, or the destination holds
    speakers already or belongs to another model.
    """
    if not is_database_url(source) and not Path(source).is_file():
        raise EnrollmentError(f"{source}: no such enrollment store")
    origin = open_backend(source)
    try:
        info = origin.info()
        if "model" not in info or "embedding_dim" not in info:
            raise EnrollmentError(f"{origin.location}: not an enrollment store (it records no model)")
        model, dim = info["model"], int(info["embedding_dim"])
        target = open_backend(destination)
        try:
            target.claim(model, dim)
            held = target.count()
            if held:
                raise EnrollmentError(f"{target.location} already holds {held} speakers; migrate into an empty store")
            target.write_blocks(origin.blocks(dim))
            copied, written = _digest(origin.blocks(dim)), _digest(target.blocks(dim))
            if copied != written:
                raise EnrollmentError(f"{target.location} does not hold what {origin.location} does after the copy "
                                      f"({written[0]} speakers and {written[1]} recordings, not {copied[0]} and "
                                      f"{copied[1]}, or different sums)")
            return Migration(origin.location, target.location, copied[0], copied[1])
        finally:
            target.close()
    finally:
        origin.close()


def _digest(blocks: Iterator[StoredSpeakers]) -> tuple[int, int, int]:
    """Speakers, recordings, and an order-free checksum of every (id, sum bytes, count)."""
    speakers = recordings = checksum = 0
    for block in blocks:
        speakers += len(block.speaker_ids)
        recordings += int(block.counts.sum())
        for speaker_id, total, count in zip(block.speaker_ids, block.sums, block.counts):
            row = hashlib.blake2b(speaker_id.encode() + b"\0" + encode_sum(total) + int(count).to_bytes(8, "little"),
                                  digest_size=8).digest()
            checksum = (checksum + int.from_bytes(row, "little")) % (1 << 64)
    return speakers, recordings, checksum
