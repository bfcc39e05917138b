"""SQLite result store: ``sqlite:///relative/path.sqlite3`` or ``sqlite:////absolute/path.sqlite3``.

One file, shared by any number of processes (workers writing, clients reading). Storage layout —
one table, created on first connect::

    results
      task_id          TEXT PRIMARY KEY  the task's id (Celery's result key without its prefix)
      status           TEXT NOT NULL     the document's state, duplicated out of the payload so
                                         "a SUCCESS is final" is checked inside the write statement
      payload          BLOB NOT NULL     the result document encoded with ``result_serializer``,
                                         byte for byte what Redis would hold
      content_type     TEXT NOT NULL     of the payload; checked against ``result_accept_content``
      content_encoding TEXT NOT NULL     of the payload ("utf-8" or "binary")
      expires_at       REAL NULL         unix time after which the row counts as absent; NULL keeps
                                         it forever (``result_expires = None``)
      updated_at       REAL NOT NULL     unix time of the last write, for inspection and debugging

    index results_expires_at ON results(expires_at) WHERE expires_at IS NOT NULL
                                         serves the periodic removal of expired rows

The file is marked as a celeriac result store (``PRAGMA application_id`` = :data:`APPLICATION_ID`)
and carries the schema version (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`). A file that
belongs to something else (another program, or the SQLite broker, which marks its files the same
way) or that a newer celeriac wrote is refused with a clear error instead of being altered: both
pragmas are per file, so the broker and the result store each need a file of their own.

Concurrency: WAL journal (readers never block the writer), ``busy_timeout`` so concurrent writers
queue instead of failing, ``synchronous = NORMAL`` by default (a committed result survives a crash
of the process; ``FULL`` also survives power loss). A write is a single ``INSERT … ON CONFLICT DO
UPDATE … WHERE status != 'SUCCESS'`` statement, so the success-is-final rule holds between
processes without a read-then-write race.

``sqlite3`` blocks, so every instance owns one connection used from one dedicated thread (a
single-worker executor); the coroutines hand their statements to it. The connection and the thread
are created by :meth:`SQLiteBackend.connect`, never at import, so the store works in a process that
forks after importing celeriac (a child of a process that had connected opens its own).

``result_backend_transport_options``: ``busy_timeout`` (seconds, default 5) and ``synchronous``
(``"NORMAL"`` or ``"FULL"``); anything else is refused.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from celeriac import exceptions, states
from celeriac.backends.base import BackendOptions, ResultBackend, StoredPayload
from celeriac.exceptions import ImproperlyConfigured

SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a result store file: "celr" in ASCII.
APPLICATION_ID = 0x63656C72

#: Upserts (``ON CONFLICT … DO UPDATE``) need SQLite 3.24.
MIN_SQLITE_VERSION = (3, 24, 0)

#: Expired rows are deleted on connect and once per this many writes of an instance.
SWEEP_EVERY = 1000

TRANSPORT_OPTIONS: dict[str, str] = {
    "busy_timeout": "seconds a writer waits for the file lock (default 5)",
    "synchronous": '"NORMAL" (default) or "FULL" for durability against power loss',
}

_SCHEMA = (
    """
    CREATE TABLE results (
        task_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        payload BLOB NOT NULL,
        content_type TEXT NOT NULL,
        content_encoding TEXT NOT NULL,
        expires_at REAL,
        updated_at REAL NOT NULL
    )
    """,
    """
    CREATE INDEX results_expires_at ON results (expires_at)
        WHERE expires_at IS NOT NULL
    """,
)

# An expired row is as good as absent, so even an expired SUCCESS may be replaced.
_UPSERT = f"""
INSERT INTO results (task_id, status, payload, content_type, content_encoding, expires_at,
                     updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (task_id) DO UPDATE SET
    status = excluded.status,
    payload = excluded.payload,
    content_type = excluded.content_type,
    content_encoding = excluded.content_encoding,
    expires_at = excluded.expires_at,
    updated_at = excluded.updated_at
WHERE results.status != '{states.SUCCESS}'
   OR (results.expires_at IS NOT NULL AND results.expires_at <= excluded.updated_at)
"""

_SELECT = """
SELECT payload, content_type, content_encoding FROM results
WHERE task_id = ? AND (expires_at IS NULL OR expires_at > ?)
"""

_SCHEME = "sqlite://"

_Row = tuple[str, str, bytes, str, str, float | None, float]
_T = TypeVar("_T")


def parse_url(url: str) -> str:
    """The absolute database path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL.

    A relative path is taken from the working directory at the time the store is created.
    """
    expected = "expected 'sqlite:///relative/path.sqlite3' or 'sqlite:////absolute/path.sqlite3'"
    if url[: len(_SCHEME) + 1].lower() != _SCHEME + "/":
        raise ImproperlyConfigured(f"bad SQLite result store URL {url!r}: {expected}")
    path = url[len(_SCHEME) + 1 :]
    if not path or path.endswith("/"):
        raise ImproperlyConfigured(f"SQLite result store URL {url!r} names no file: {expected}")
    if "?" in path or "#" in path:
        raise ImproperlyConfigured(
            f"SQLite result store URL {url!r} has a query or fragment, which is not supported "
            "(use result_backend_transport_options): " + expected
        )
    if path == ":memory:" or path.startswith("file:"):
        raise ImproperlyConfigured(
            f"SQLite result store URL {url!r}: an in-memory or URI database cannot be shared "
            "between processes; use 'memory://' for results kept in this process, or " + expected
        )
    return os.path.abspath(path)


def _parse_options(options: BackendOptions) -> tuple[float, str]:
    busy_timeout = 5.0
    synchronous = "NORMAL"
    for key, value in options.transport_options:
        if key == "busy_timeout":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ImproperlyConfigured(
                    f"SQLite result store option busy_timeout must be seconds >= 0, got {value!r}"
                )
            busy_timeout = float(value)
        elif key == "synchronous":
            if not isinstance(value, str) or value.upper() not in ("NORMAL", "FULL"):
                raise ImproperlyConfigured(
                    f"SQLite result store option synchronous must be 'NORMAL' or 'FULL', "
                    f"got {value!r}"
                )
            synchronous = value.upper()
        else:
            known = ", ".join(f"{name} ({meaning})" for name, meaning in TRANSPORT_OPTIONS.items())
            raise ImproperlyConfigured(
                f"unknown SQLite result store option {key!r}; known options: {known}"
            )
    return busy_timeout, synchronous


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls some failed transactions back by itself (e.g. on SQLITE_FULL); a second
    # ROLLBACK would then fail and hide the original error.
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class SQLiteBackend(ResultBackend):
    """Result store in one SQLite file, safe to share between processes."""

    def __init__(self, url: str, options: BackendOptions) -> None:
        super().__init__(url, options)
        self.path = parse_url(url)
        self._busy_timeout, self._synchronous = _parse_options(options)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._writes = 0

    # -- plumbing --------------------------------------------------------------------------------

    async def _run(self, func: Callable[..., _T], *args: Any) -> _T:
        """Run ``func(*args)`` on the connection's thread, translating driver errors."""
        if self._executor is not None and self._pid != os.getpid():
            # Connected before a fork: the executor's thread did not survive it and an inherited
            # SQLite connection must not be used (or even closed) in the child. Open afresh.
            self._executor = None
            self._conn = None
            await self.connect()
        executor = self._executor
        if executor is None:
            raise exceptions.ConnectionError(
                f"SQLite result store {self.path} is not connected; call connect()"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self._guarded, func, args)

    def _guarded(self, func: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        try:
            return func(*args)
        except sqlite3.Error as exc:
            raise exceptions.ConnectionError(
                f"SQLite result store {self.path}: {type(exc).__name__}: {exc}"
            ) from exc

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise exceptions.ConnectionError(f"SQLite result store {self.path} is not connected")
        return conn

    # -- connect / close -------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._executor is not None:
            return
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise ImproperlyConfigured(
                f"the SQLite result store needs SQLite >= 3.24, this Python has "
                f"{sqlite3.sqlite_version}"
            )
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise ImproperlyConfigured(
                f"SQLite result store {self.path}: directory {directory} does not exist"
            )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="celeriac-sqlite-results")
        self._pid = os.getpid()
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _open(self) -> None:
        # isolation_level=None: autocommit, so each single-statement write commits by itself and
        # multi-statement work says BEGIN explicitly.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            # Schema check first: a file that is not ours is refused before anything changes it
            # (the journal mode is a setting of the file).
            self._ensure_schema(conn)
            self._enable_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._delete_expired(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        # IMMEDIATE: processes starting together on a new file create the schema once; the others
        # wait for the lock, then find it made.
        conn.execute("BEGIN IMMEDIATE")
        try:
            (application_id,) = conn.execute("PRAGMA application_id").fetchone()
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if application_id == 0 and version == 0:
                tables = [
                    name
                    for (name,) in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                    )
                ]
                if tables:
                    raise ImproperlyConfigured(
                        f"{self.path} is not a celeriac result store (it holds tables {tables}); "
                        "give the result store a file of its own"
                    )
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif application_id != APPLICATION_ID:
                raise ImproperlyConfigured(
                    f"{self.path} is not a celeriac result store (application_id "
                    f"{application_id:#x}; the SQLite broker's files are marked too); give the "
                    "result store a file of its own"
                )
            elif version > SCHEMA_VERSION:
                raise ImproperlyConfigured(
                    f"{self.path} has result store schema version {version}, written by a newer "
                    f"celeriac; this version understands {SCHEMA_VERSION}: upgrade celeriac"
                )
            elif version < SCHEMA_VERSION:
                raise ImproperlyConfigured(
                    f"{self.path} has unknown result store schema version {version} "
                    f"(expected {SCHEMA_VERSION})"
                )
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (a persistent setting), waiting out concurrent first connects.

        Changing the journal mode needs the file to itself, and SQLite reports "database is
        locked" at once instead of calling the busy handler when another process does the same
        (two workers starting on a new file): retry until ``busy_timeout``.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        if str(mode).lower() != "wal":
            raise exceptions.ConnectionError(
                f"SQLite result store {self.path}: could not switch to the WAL journal (mode is "
                f"{mode!r}); the file system may not support it"
            )

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        if self._pid != os.getpid():  # connected before a fork: nothing of it is ours to close
            self._executor = None
            self._conn = None
            return
        try:
            await self._run(self._close_connection)
        finally:
            self._executor = None
            executor.shutdown(wait=False)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- primitives ------------------------------------------------------------------------------

    async def _write(
        self, task_id: str, status: str, payload: StoredPayload, expires_at: float | None
    ) -> None:
        row = (
            task_id,
            status,
            payload.data,
            payload.content_type,
            payload.content_encoding,
            expires_at,
            time.time(),
        )
        await self._run(self._write_rows, [row])

    def _write_rows(self, rows: list[_Row]) -> None:
        conn = self._connection()
        if len(rows) == 1:
            conn.execute(_UPSERT, rows[0])
        else:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        before = self._writes
        self._writes += len(rows)
        if self._writes // SWEEP_EVERY != before // SWEEP_EVERY:
            self._delete_expired(conn)

    @staticmethod
    def _delete_expired(conn: sqlite3.Connection) -> None:
        conn.execute(
            "DELETE FROM results WHERE expires_at IS NOT NULL AND expires_at <= ?", (time.time(),)
        )

    async def _read(self, task_id: str) -> StoredPayload | None:
        return await self._run(self._read_row, task_id)

    def _read_row(self, task_id: str) -> StoredPayload | None:
        row = self._connection().execute(_SELECT, (task_id, time.time())).fetchone()
        if row is None:
            return None
        data, content_type, content_encoding = row
        return StoredPayload(bytes(data), content_type, content_encoding)

    async def _delete(self, task_id: str) -> None:
        await self._run(self._delete_row, task_id)

    def _delete_row(self, task_id: str) -> None:
        self._connection().execute("DELETE FROM results WHERE task_id = ?", (task_id,))

    # -- batch -----------------------------------------------------------------------------------

    async def store_many(self, metas: Iterable[dict[str, Any]]) -> None:
        """Store several result documents in one transaction (same rules as :meth:`store`).

        One commit for the lot is what makes pipelined result writes cheap: the per-commit cost
        (WAL append and lock hand-over) dominates a single small write.
        """
        expires = self.options.expires
        now = time.time()
        expires_at = None if expires is None else now + expires
        rows: list[_Row] = []
        for meta in metas:
            payload = self.encode_meta(meta)
            rows.append(
                (
                    meta["task_id"],
                    meta["status"],
                    payload.data,
                    payload.content_type,
                    payload.content_encoding,
                    expires_at,
                    now,
                )
            )
        if rows:
            await self._run(self._write_rows, rows)
