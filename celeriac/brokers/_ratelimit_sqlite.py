"""Cluster-wide rate limits in a celeriac SQLite file (the broker's, or the result store's).

Storage: one table, created in the file the first time a limit is asked for (it is an addition
that older versions of celeriac simply do not read, so the file's schema version is unchanged)::

    rate_limits
      key   TEXT PRIMARY KEY  the limit's key: the task name
      tat   REAL NOT NULL     UNIX time at which the next grant is free (the theoretical arrival
                              time of :func:`celeriac.utils.rates.gcra`); a row in the past is
                              the same as no row

One row per rate-limited task name, so the table stays as small as the set of those names and
needs no expiry. A grant is one ``BEGIN IMMEDIATE`` transaction (read the row, apply the rule,
write the row): the write lock serialises the workers of every process on the file, and the
clock is read inside the transaction, so grants are decided in the order they commit. All those
processes run on one machine (a SQLite file is not shared over a network), so they share a clock.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable

from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.utils.rates import check_request, gcra
from celeriac.utils.sqlite import immediate_transaction

__all__ = ["SQLiteRateLimiter"]

_TABLE = """
CREATE TABLE IF NOT EXISTS rate_limits (
    key              TEXT    PRIMARY KEY, -- the limit's key: a task name
    tat              REAL    NOT NULL     -- UNIX time at which the next grant is free; a row in
                                          -- the past counts as no row
) WITHOUT ROWID
"""

_READ = "SELECT tat FROM rate_limits WHERE key = ?"

_WRITE = """
INSERT INTO rate_limits (key, tat) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET tat = excluded.tat
"""

#: Runs an operation on the store's connection, on the store's own thread, translating errors.
Runner = Callable[[Callable[[sqlite3.Connection], float]], Awaitable[float]]


class SQLiteRateLimiter(RateLimiterStore):
    """Grants decided in a SQLite file shared by every worker that opens it."""

    def __init__(self, run: Runner, description: str) -> None:
        self._run = run
        self.description = description
        #: Whether this instance has made sure the table exists (once; the file keeps it).
        self._ready = False

    async def acquire(self, key: str, rate: float, burst: int = 1) -> float:
        check_request(key, rate, burst)
        interval = 1.0 / rate
        ready = self._ready

        def grant(conn: sqlite3.Connection) -> float:
            with immediate_transaction(conn):
                if not ready:
                    conn.execute(_TABLE)
                row = conn.execute(_READ, (key,)).fetchone()
                tat, wait = gcra(
                    None if row is None else float(row[0]), time.time(), interval, burst
                )
                if tat is not None:
                    conn.execute(_WRITE, (key, tat))
            return wait

        wait = await self._run(grant)
        self._ready = True
        return wait
