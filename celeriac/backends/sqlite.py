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
pragmas are per file, so the broker and the result store each need a file of their own. When the
broker (RabbitMQ) keeps none, revoked task ids are kept in this file, in a table of their own
(:mod:`celeriac.brokers._revocations_sqlite`).

Concurrency: WAL journal (readers never block the writer), ``busy_timeout`` so concurrent writers
queue instead of failing, ``synchronous = NORMAL`` by default (a committed result survives a crash
of the process; ``FULL`` also survives power loss). A write is a single ``INSERT … ON CONFLICT DO
UPDATE … WHERE status != 'SUCCESS'`` statement, so the success-is-final rule holds between
processes without a read-then-write race.

``sqlite3`` blocks, so every instance owns one connection used from one dedicated thread (a
:class:`~celeriac.utils.sqlite.ConnectionThread`, as in the SQLite broker); the coroutines hand
their statements to it. The connection and the thread are created by :meth:`SQLiteBackend.connect`,
never at import, so the store works in a process that forks after importing celeriac (a child of a
process that had connected opens its own). Opening, claiming and configuring the file is shared
with the broker too (:mod:`celeriac.utils.sqlite`).

Waiting: a result stored wakes the waiters of that task at once — those of its own process directly,
those of other processes through a Unix datagram socket each waiting process binds in
``<file>.wake/`` (see :mod:`celeriac.utils.file_wakeups` for the layout and what happens when that
is not possible). Waiters also poll as before (from 1 ms backing off to ``interval``), which finds
what a lost wake-up would have announced.

``result_backend_transport_options``: ``busy_timeout`` (seconds > 0, default 5) and ``synchronous``
(``"NORMAL"`` or ``"FULL"``); anything else is refused.
"""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3
import time
from collections.abc import AsyncGenerator, Collection, Iterable, Sequence
from typing import Any

from celeriac import states
from celeriac.backends.base import BackendOptions, ResultBackend, StoredPayload
from celeriac.brokers._ratelimit_sqlite import SQLiteRateLimiter
from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.exceptions import TimeoutError
from celeriac.utils import sqlite
from celeriac.utils.file_wakeups import FileWakeups
from celeriac.utils.wakeup import WakeupRegistry

SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a result store file: "celr" in ASCII.
APPLICATION_ID = 0x63656C72

#: Upserts (``ON CONFLICT … DO UPDATE``) need SQLite 3.24.
MIN_SQLITE_VERSION = (3, 24, 0)

#: Expired rows are deleted on connect and once per this many writes of an instance.
SWEEP_EVERY = 1000

#: Task ids per ``SELECT … WHERE task_id IN (…)`` of a batched read (SQLite allows 32,766 bound
#: parameters since 3.32, 999 before).
READ_BATCH = 500

#: The transport options, with what they mean (the same as the SQLite broker's).
TRANSPORT_OPTIONS: dict[str, str] = sqlite.OPTIONS

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

#: What :class:`celeriac.utils.sqlite.ConnectionThread` needs to open, claim and check the file.
RESULT_STORE_FILE = sqlite.FileFormat(
    role="result store",
    application_id=APPLICATION_ID,
    schema_version=SCHEMA_VERSION,
    schema=_SCHEMA,
    min_sqlite_version=MIN_SQLITE_VERSION,
    needs="INSERT … ON CONFLICT DO UPDATE",
    options_setting="result_backend_transport_options",
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

_Row = tuple[str, str, bytes, str, str, float | None, float]

#: First pause of a wait; doubled up to its ``interval``.
_FIRST_POLL = 0.001

#: Waits in this process, by the database's real path and task id: a write wakes them at once.
_wakeups = WakeupRegistry()


def parse_url(url: str) -> str:
    """The absolute database path of a ``sqlite:///relative`` or ``sqlite:////absolute`` URL.

    A relative path is taken from the working directory at the time the store is created.
    """
    return sqlite.parse_url(url, RESULT_STORE_FILE)


class SQLiteBackend(ResultBackend):
    """Result store in one SQLite file, safe to share between processes."""

    def __init__(self, url: str, options: BackendOptions) -> None:
        super().__init__(url, options)
        self.path = parse_url(url)
        settings = sqlite.parse_options(options.transport_options, RESULT_STORE_FILE)
        self._db = sqlite.ConnectionThread(
            self.path, RESULT_STORE_FILE, settings, self._sweep_on_open
        )
        #: Rows written by this instance; counted on the connection's thread.
        self._writes = 0
        key = os.path.realpath(self.path)
        #: Wakes the waits of this and other processes on the task ids written.
        self._wake = FileWakeups(self.path, _wakeups, key, "SQLite result store")

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The connection while connected; use it only on :attr:`_executor`'s thread."""
        return self._db.connection

    @property
    def _executor(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The connection's thread while connected (None before connect and after close)."""
        return self._db.executor

    def _sweep_on_open(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        self._delete_expired(conn)
        return conn

    # -- connect / close -------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        self._wake.close()
        await self._db.close()

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
        await self._db.run(lambda conn: self._write_rows(conn, [row]))

    def _write_rows(self, conn: sqlite3.Connection, rows: list[_Row]) -> None:
        if len(rows) == 1:
            conn.execute(_UPSERT, rows[0])  # no transaction open: committed when it returns
        else:
            with sqlite.immediate_transaction(conn):
                conn.executemany(_UPSERT, rows)
        # After the commit, from the connection's thread: the event loop does not wait for it.
        self._wake.changed(row[0] for row in rows)
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
        return await self._db.run(lambda conn: self._read_row(conn, task_id))

    @staticmethod
    def _read_row(conn: sqlite3.Connection, task_id: str) -> StoredPayload | None:
        row = conn.execute(_SELECT, (task_id, time.time())).fetchone()
        if row is None:
            return None
        data, content_type, content_encoding = row
        return StoredPayload(bytes(data), content_type, content_encoding)

    async def _delete(self, task_id: str) -> None:
        await self._db.run(
            lambda conn: conn.execute("DELETE FROM results WHERE task_id = ?", (task_id,))
        )

    async def _read_many(self, task_ids: Sequence[str]) -> list[StoredPayload | None]:
        """Many rows in one hop to the connection's thread, :data:`READ_BATCH` ids per query."""
        ids = list(task_ids)
        return await self._db.run(lambda conn: self._read_rows(conn, ids))

    @staticmethod
    def _read_rows(conn: sqlite3.Connection, task_ids: list[str]) -> list[StoredPayload | None]:
        now = time.time()
        found: dict[str, StoredPayload] = {}
        for start in range(0, len(task_ids), READ_BATCH):
            chunk = task_ids[start : start + READ_BATCH]
            marks = ", ".join("?" * len(chunk))
            rows = conn.execute(
                "SELECT task_id, payload, content_type, content_encoding FROM results "
                f"WHERE task_id IN ({marks}) AND (expires_at IS NULL OR expires_at > ?)",
                (*chunk, now),
            )
            for task_id, data, content_type, content_encoding in rows:
                found[task_id] = StoredPayload(bytes(data), content_type, content_encoding)
        return [found.get(task_id) for task_id in task_ids]

    # -- waiting -------------------------------------------------------------------------------

    # The template's waits read first and wait afterwards; a write landing between the two would
    # go unnoticed until the next poll. These register the waiter (and bind the socket other
    # processes wake it through) before each read instead.

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        states_wanted: Collection[str] = states.READY_STATES,
    ) -> dict[str, Any]:
        """Wait until the task reaches one of ``states_wanted``; return its document.

        Woken as soon as a write to the task is announced; between wake-ups the document is read
        again after 1 ms, then at intervals doubling up to ``interval`` (in case an announcement
        was lost). Raises :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.listen()
        pause = _FIRST_POLL
        with _wakeups.waiting(self._wake.key, (task_id,)) as waiter:
            while True:
                waiter.clear()
                meta = await self.get(task_id)
                if meta["status"] in states_wanted:
                    return meta
                left = interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"The operation timed out waiting for task {task_id}.")
                if not await waiter.wait(min(pause, left, interval)):
                    pause = min(pause * 2, interval)

    async def wait_many(
        self,
        task_ids: Sequence[str],
        timeout: float | None = None,
        interval: float = 0.5,
        states_wanted: Collection[str] = states.READY_STATES,
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Yield ``(task_id, document)`` for each task as it reaches one of ``states_wanted``.

        As :meth:`ResultBackend.wait_many`, but woken as soon as a write to one of the tasks is
        announced: the unfinished documents are then read again in one batch. Polling backs it
        up as in :meth:`wait`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(dict.fromkeys(task_ids))
        if not pending:
            return
        self._wake.listen()
        pause = _FIRST_POLL
        with _wakeups.waiting(self._wake.key, pending) as waiter:
            while True:
                waiter.clear()
                still: list[str] = []
                for task_id, meta in zip(pending, await self.get_many(pending), strict=True):
                    if meta["status"] in states_wanted:
                        yield task_id, meta
                    else:
                        still.append(task_id)
                pending = still
                if not pending:
                    return
                wait = interval
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(
                            f"The operation timed out waiting for {len(pending)} task(s) to finish."
                        )
                    wait = min(wait, left)
                if not await waiter.wait(min(pause, wait)):
                    pause = min(pause * 2, interval)

    def rate_limiter(self) -> RateLimiterStore:
        """Limits kept in a table of this file (see :mod:`celeriac.brokers._ratelimit_sqlite`)."""
        return SQLiteRateLimiter(self._db.run, f"the SQLite result store {self.path}")

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
            await self._db.run(lambda conn: self._write_rows(conn, rows))
