"""Enrolled speakers in PostgreSQL, shared by any number of server replicas (psycopg 3).

The tables are those of the SQLite store (see :mod:`spkft.core.enrollment`), with ``bytea`` for
the sums and the "C" collation for identifiers, so both order speakers by code point. Writes go through a connection pool, each in one transaction that also sends
``NOTIFY spkft_speakers, '<speaker id>'``; PostgreSQL delivers a notification only once its
transaction commits, and in commit order. Every replica LISTENs on a connection of its own, and
its store re-reads each speaker named (its own writes included), so all replicas converge on
what the database holds, usually within milliseconds. An empty payload means "read everything
again" (sent after a migration).

When the listening connection is lost, the backend reports the database unreachable, retries
with backoff (0.5 s doubling to 5 s) and, once connected and listening again, reads every
speaker again, so what changed meanwhile is not missed. While it is unreachable, writes and
listings raise :class:`StoreUnavailableError` at once; searches keep answering from memory.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from collections.abc import Callable, Iterator

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from spkft.core.enrollment import (
    LOAD_CHUNK,
    SCHEMA_VERSION,
    EnrolledSpeaker,
    StoredSpeakers,
    check_store_info,
    decode_sums,
    encode_sum,
    info_rows,
    stored_block,
)
from spkft.core.errors import EnrollmentError, StoreUnavailableError, UnknownSpeakerError, first_line

log = logging.getLogger(__name__)

CHANNEL = "spkft_speakers"
POOL_SIZE = 8
CONNECT_SECONDS = 5.0
HEARTBEAT_SECONDS = 2.0  # an idle listening connection is checked this often
RETRY_SECONDS = (0.5, 5.0)  # first and longest wait between reconnection attempts
SCHEMA_LOCK = 0x73706B6674  # advisory lock that serialises schema creation by replicas starting together

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS speakers (
        speaker_id TEXT COLLATE "C" PRIMARY KEY,
        embedding_sum BYTEA NOT NULL,
        utterance_count INTEGER NOT NULL CHECK (utterance_count > 0)
    )""",
)


def describe(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL URL given"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class PostgresBackend:
    """The store's rows in a PostgreSQL database that several servers share."""

    shared = True

    def __init__(self, url: str) -> None:
        self.location = describe(url)
        self._url = url
        try:  # one direct connection first: its error says why, where a pool's would only time out
            psycopg.connect(url, connect_timeout=CONNECT_SECONDS).close()
        except psycopg.Error as exc:
            raise EnrollmentError(f"{self.location}: cannot connect to the enrollment database: "
                                  f"{first_line(str(exc)) or type(exc).__name__}") from None
        self._pool = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, open=False, timeout=CONNECT_SECONDS,
                                    kwargs={"connect_timeout": CONNECT_SECONDS}, check=ConnectionPool.check_connection,
                                    name="spkft-enrollments")
        self._pool.open()
        self._closing = threading.Event()
        self._reachable = True
        self._callbacks: list[Callable[[bool], None]] = []
        self._listener: threading.Thread | None = None

    @property
    def reachable(self) -> bool:
        return self._reachable

    def on_reachability(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)

    def _unreachable(self, exc: Exception | None = None) -> StoreUnavailableError:
        why = f" ({first_line(str(exc)) or type(exc).__name__})" if exc is not None else ""
        return StoreUnavailableError(f"the enrollment database ({self.location}) is unreachable{why}; retry shortly")

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in one transaction, committed at the end; :class:`StoreUnavailableError`
        when the database cannot be reached, at once while it is known to be down."""
        if not self._reachable:
            raise self._unreachable()
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise self._unreachable(exc) from None

    def _run(self, work: Callable[[psycopg.Connection], object]):
        """``work(connection)`` in one transaction, committed before it returns."""
        with self._transaction() as conn:
            return work(conn)

    def info(self) -> dict[str, str]:
        return self._run(lambda conn: dict(conn.execute("SELECT key, value FROM store_info").fetchall()))

    def claim(self, model: str, embedding_dim: int) -> None:
        """Create the tables (under a lock, as replicas may start together), record or check the model."""

        def claim(conn: psycopg.Connection) -> None:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in _SCHEMA:
                conn.execute(statement)
            info = dict(conn.execute("SELECT key, value FROM store_info").fetchall())
            if not info:
                with conn.cursor() as cursor:
                    cursor.executemany("INSERT INTO store_info (key, value) VALUES (%s, %s)",
                                       info_rows(model, embedding_dim))
                return
            check_store_info(info, model, embedding_dim, self.location)
            if "schema_version" not in info:
                conn.execute("INSERT INTO store_info (key, value) VALUES ('schema_version', %s)", (str(SCHEMA_VERSION),))

        self._run(claim)

    def count(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT count(*) FROM speakers").fetchone()[0])

    def blocks(self, dim: int) -> Iterator[StoredSpeakers]:
        """Every speaker, read in blocks through a server-side cursor in binary."""
        with self._transaction() as conn, conn.cursor(name="spkft_load", binary=True) as cursor:
            cursor.itersize = LOAD_CHUNK
            cursor.execute("SELECT speaker_id, embedding_sum, utterance_count FROM speakers")
            while rows := cursor.fetchmany(LOAD_CHUNK):
                yield stored_block(rows, dim)

    def add(self, speaker_id: str, vector: np.ndarray, n: int) -> tuple[np.ndarray, int]:
        """Add ``vector``, the sum of ``n`` recordings' normalised embeddings, to a speaker; its new sum and count."""

        def add(conn: psycopg.Connection) -> tuple[np.ndarray, int]:
            select = "SELECT embedding_sum, utterance_count FROM speakers WHERE speaker_id = %s FOR UPDATE"
            row = conn.execute(select, (speaker_id,)).fetchone()
            if row is None:
                created = conn.execute(
                    "INSERT INTO speakers (speaker_id, embedding_sum, utterance_count) VALUES (%s, %s, %s) "
                    "ON CONFLICT (speaker_id) DO NOTHING RETURNING utterance_count",
                    (speaker_id, encode_sum(vector), n),
                ).fetchone()
                if created is not None:
                    _notify(conn, speaker_id)
                    return vector, n
                # Another replica created the speaker meanwhile; its row is committed and locked now.
                row = conn.execute(select, (speaker_id,)).fetchone()
            total = decode_sums([bytes(row[0])], len(vector))[0] + vector
            count = row[1] + n
            conn.execute("UPDATE speakers SET embedding_sum = %s, utterance_count = %s WHERE speaker_id = %s",
                         (encode_sum(total), count, speaker_id))
            _notify(conn, speaker_id)
            return total, count

        return self._run(add)

    def remove(self, speaker_id: str) -> int:
        def remove(conn: psycopg.Connection) -> int:
            row = conn.execute("DELETE FROM speakers WHERE speaker_id = %s RETURNING utterance_count",
                               (speaker_id,)).fetchone()
            if row is None:
                raise UnknownSpeakerError(f"speaker {speaker_id!r} is not enrolled")
            _notify(conn, speaker_id)
            return row[0]

        return self._run(remove)

    def read(self, speaker_ids: list[str], dim: int) -> dict[str, np.ndarray]:
        """The current sums of those of ``speaker_ids`` that are enrolled."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT speaker_id, embedding_sum FROM speakers WHERE speaker_id = ANY(%s)", (list(speaker_ids),)
        ).fetchall())
        if not rows:
            return {}
        return dict(zip((r[0] for r in rows), decode_sums([bytes(r[1]) for r in rows], dim)))

    def listing(self, after: str | None = None, limit: int | None = None) -> list[EnrolledSpeaker]:
        """Speakers in code-point order (the column's collation is "C", as SQLite orders) after ``after``, at most ``limit``."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT speaker_id, utterance_count FROM speakers WHERE speaker_id > %s ORDER BY speaker_id LIMIT %s",
            ("" if after is None else after, limit)).fetchall())
        return [EnrolledSpeaker(speaker_id, count) for speaker_id, count in rows]

    def write_blocks(self, blocks: Iterator[StoredSpeakers]) -> None:
        """Insert speakers in bulk (COPY), in one transaction, then tell every replica to read everything again."""

        def write(conn: psycopg.Connection) -> None:
            with conn.cursor() as cursor:
                with cursor.copy("COPY speakers (speaker_id, embedding_sum, utterance_count) FROM STDIN") as copy:
                    for block in blocks:
                        for speaker_id, total, count in zip(block.speaker_ids, block.sums, block.counts):
                            copy.write_row((speaker_id, encode_sum(total), int(count)))
            _notify(conn, "")

        self._run(write)

    def follow(self, on_change: Callable[[list[str]], None], on_reload: Callable[[], None]) -> None:
        """Listen for changes from every replica: ``on_reload()`` once listening (now, and after each
        reconnection), ``on_change(ids)`` for the speakers each notification names.

        Returns once the first ``on_reload`` is done; :class:`EnrollmentError` when it cannot be.
        """
        ready = threading.Event()
        failure: list[BaseException] = []
        self._listener = threading.Thread(target=self._listen, args=(on_change, on_reload, ready, failure),
                                          name="spkft-enroll-listen", daemon=True)
        self._listener.start()
        ready.wait()
        if failure:
            self.close()
            raise EnrollmentError(f"{self.location}: cannot read the enrollment store: "
                                  f"{first_line(str(failure[0])) or type(failure[0]).__name__}")

    def _listen(self, on_change, on_reload, ready: threading.Event, failure: list) -> None:
        delay = RETRY_SECONDS[0]
        while not self._closing.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_SECONDS) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._set_reachable(True)
                    on_reload()  # whatever changed before LISTEN took effect is read here
                    ready.set()
                    delay = RETRY_SECONDS[0]
                    self._follow(conn, on_change, on_reload)
            except Exception as exc:  # a lost connection, or a read that failed with it
                if not ready.is_set():
                    failure.append(exc)
                    ready.set()
                    return
                if self._closing.is_set():
                    return
                if self._reachable:
                    log.warning("lost the enrollment database %s (%s); reconnecting", self.location,
                                first_line(str(exc)) or type(exc).__name__)
                    self._set_reachable(False)
                self._closing.wait(delay)
                delay = min(2 * delay, RETRY_SECONDS[1])

    def _follow(self, conn: psycopg.Connection, on_change, on_reload) -> None:
        idle = 0.0
        while not self._closing.is_set():
            changed: set[str] = set()
            everything = False
            for note in conn.notifies(timeout=0.1, stop_after=LOAD_CHUNK):
                if note.payload:
                    changed.add(note.payload)
                else:
                    everything = True
            if everything:
                on_reload()
            elif changed:
                on_change(sorted(changed))
            else:
                idle += 0.1
                if idle >= HEARTBEAT_SECONDS:  # a dead peer shows up here, not in a quiet LISTEN
                    conn.execute("SELECT 1")
                    idle = 0.0

    def _set_reachable(self, reachable: bool) -> None:
        if reachable == self._reachable:
            return
        self._reachable = reachable
        if reachable:
            log.info("reconnected to the enrollment database %s", self.location)
        for callback in self._callbacks:
            callback(reachable)

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None and self._listener is not threading.current_thread():
            self._listener.join(timeout=2 * CONNECT_SECONDS)
        self._pool.close()


def _notify(conn: psycopg.Connection, payload: str) -> None:
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
