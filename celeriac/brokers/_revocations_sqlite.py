"""Revocations in a celeriac SQLite file: the SQLite broker's, or the SQLite result store's when the
broker (RabbitMQ) keeps none.

Storage layout — one table and its index, created in the file on first use::

    revoked
      seq         INTEGER PRIMARY KEY AUTOINCREMENT
                                     order of the revokes; readers follow it with a cursor.
                                     AUTOINCREMENT never hands out a number twice, even after the
                                     newest rows were deleted, so a cursor never skips a row
      task_id     TEXT NOT NULL UNIQUE
                                     the revoked id; revoking it again replaces the row (new seq),
                                     so a later terminate=True reaches the workers
      revoked_at  REAL NOT NULL      UNIX time of the revoke, for inspection
      expires_at  REAL NOT NULL      UNIX time after which the row no longer counts
      terminate   INTEGER NOT NULL   1: a worker running the task stops it
      signal      TEXT               the signal named with terminate ("SIGTERM"), else NULL

    index revoked_expires_at ON revoked(expires_at)     serves the removal of expired rows

The table sits beside the store's own tables, outside their versioned schema
(``PRAGMA user_version``): it is created with ``IF NOT EXISTS`` by whichever process needs it
first, and a celeriac that does not know it never reads it, so files stay usable both ways.

Every revoke is one ``BEGIN IMMEDIATE`` transaction that inserts (``INSERT OR REPLACE``), deletes
the expired rows and keeps the newest ``limit``. Transactions commit one at a time under SQLite's
write lock, in ``seq`` order, so a reader that saw ``seq`` n has seen every row below it.

Waiting: a revoke made in this process wakes its readers at once; revokes of other processes are
seen within :data:`~celeriac.brokers._revocations.POLL_INTERVAL`, by reading ``seq > cursor`` —
a seek in the primary key that finds nothing almost every time.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from celeriac.brokers._revocations import (
    POLL_INTERVAL,
    Revocation,
    RevocationStore,
    int_cursor,
    wakeups,
)
from celeriac.utils import sqlite

_CHANNEL = "revoked"

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS revoked (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT, -- order of the revokes (never reused)
        task_id    TEXT    NOT NULL UNIQUE,           -- the revoked task id
        revoked_at REAL    NOT NULL,                  -- UNIX time of the revoke
        expires_at REAL    NOT NULL,                  -- UNIX time it stops counting
        terminate  INTEGER NOT NULL,                  -- 1: stop the task where it runs
        signal     TEXT                               -- signal named with terminate, or NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS revoked_expires_at ON revoked (expires_at)",
)

_INSERT = """
INSERT OR REPLACE INTO revoked (task_id, revoked_at, expires_at, terminate, signal)
VALUES (?, ?, ?, ?, ?)
"""
_DELETE_EXPIRED = "DELETE FROM revoked WHERE expires_at <= ?"
# Keep the newest ``limit`` rows: delete from the (limit + 1)-th newest down; nothing when fewer.
_DELETE_OLDEST = """
DELETE FROM revoked WHERE seq <= (SELECT seq FROM revoked ORDER BY seq DESC LIMIT 1 OFFSET ?)
"""
_AFTER = """
SELECT seq, task_id, expires_at, terminate, signal FROM revoked WHERE seq > ? ORDER BY seq
"""


def _create_table(conn: sqlite3.Connection) -> sqlite3.Connection:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'revoked'"
    ).fetchone()
    if exists is None:
        with sqlite.immediate_transaction(conn):
            for statement in _SCHEMA:
                conn.execute(statement)
    return conn


class SQLiteRevocations(RevocationStore):
    """The ``revoked`` table of one SQLite file (of the kind ``fmt`` describes)."""

    def __init__(self, path: str, fmt: sqlite.FileFormat, settings: sqlite.Settings) -> None:
        self.path = path
        self.describe = f"{fmt.label} {path}"
        self._db = sqlite.ConnectionThread(path, fmt, settings, _create_table)

    async def connect(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def revoke(self, revocations: Sequence[Revocation], *, limit: int) -> None:
        now = time.time()
        rows = [
            (r.task_id, now, r.expires_at, int(r.terminate), r.signal)
            for r in revocations
            if not r.expired(now)
        ]
        if not rows:
            return

        def write(conn: sqlite3.Connection) -> None:
            with sqlite.immediate_transaction(conn):
                conn.executemany(_INSERT, rows)
                conn.execute(_DELETE_EXPIRED, (now,))
                conn.execute(_DELETE_OLDEST, (limit,))

        await self._db.run(write)
        wakeups.notify(self.path, (_CHANNEL,))

    @staticmethod
    def _after(conn: sqlite3.Connection, cursor: int) -> tuple[list[Revocation], int]:
        now = time.time()
        found: list[Revocation] = []
        last = cursor
        for seq, task_id, expires_at, terminate, signal in conn.execute(_AFTER, (cursor,)):
            last = seq
            if expires_at > now:
                found.append(Revocation(task_id, expires_at, bool(terminate), signal))
        return found, last

    async def read(self, cursor: str | None, timeout: float) -> tuple[list[Revocation], str]:
        if cursor is None:
            found, last = await self._db.run(lambda conn: self._after(conn, 0))
            return found, str(last)
        start = int_cursor(cursor)
        deadline = time.monotonic() + timeout
        # Registered before the first look: a revoke of this process in between still wakes it.
        with wakeups.waiting(self.path, (_CHANNEL,)) as waiter:
            while True:
                waiter.clear()
                found, last = await self._db.run(lambda conn: self._after(conn, start))
                left = deadline - time.monotonic()
                if found or last != start or left <= 0:
                    return found, str(last)
                await waiter.wait(min(POLL_INTERVAL, left))
