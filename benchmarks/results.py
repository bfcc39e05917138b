"""Reading the result store: how many tasks are done, and when each one was done.

Completion times come from the ``date_done`` field of the stored result documents, which Celery
and celeriac both write, in the same format (ISO-8601 UTC with microseconds, taken when the result
is built, on the worker). Reading them after the run costs the worker nothing while it runs; the
only reads during a run are :func:`wait_for` polling a small sample of the result keys, which is a
few hundred ``EXISTS`` per 100 ms at most.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

#: Result documents are read and counted this many at a time.
CHUNK = 5_000
#: Seconds between two polls of :func:`wait_for`.
POLL = 0.1


class BenchmarkError(Exception):
    """A measurement could not be made (a worker died, stalled, or a service is missing)."""


def _chunks(ids: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _done_time(document: Any, task_id: str) -> float:
    """The UNIX time of a result document's ``date_done``."""
    if not isinstance(document, dict) or not isinstance(document.get("date_done"), str):
        raise BenchmarkError(f"the result of task {task_id} has no date_done: {document!r}")
    if document.get("status") != "SUCCESS":
        raise BenchmarkError(f"task {task_id} did not succeed: {document!r}")
    return datetime.fromisoformat(document["date_done"]).timestamp()


class ResultReader(abc.ABC):
    """Counts stored results and reads their completion times, given the tasks' ids."""

    @abc.abstractmethod
    def count(self, ids: Sequence[str]) -> int:
        """How many of ``ids`` have a stored result."""

    @abc.abstractmethod
    def done_times(self, ids: Sequence[str]) -> list[float]:
        """The ``date_done`` of every task in ``ids`` as UNIX time (all must be stored)."""

    @abc.abstractmethod
    def forget(self, ids: Sequence[str]) -> None:
        """Delete the results of ``ids`` (the benchmark's own, and nothing else)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection."""


class RedisResults(ResultReader):
    """Results under Celery's keys ``celery-task-meta-<id>``, written by either project."""

    PREFIX = "celery-task-meta-"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def _keys(self, ids: Sequence[str]) -> list[str]:
        return [self.PREFIX + task_id for task_id in ids]

    def count(self, ids: Sequence[str]) -> int:
        return sum(int(self.client.exists(*self._keys(chunk))) for chunk in _chunks(ids))

    def done_times(self, ids: Sequence[str]) -> list[float]:
        times: list[float] = []
        for chunk in _chunks(ids):
            for task_id, raw in zip(chunk, self.client.mget(self._keys(chunk)), strict=True):
                if raw is None:
                    raise BenchmarkError(f"task {task_id} has no stored result")
                times.append(_done_time(json.loads(raw), task_id))
        return times

    def forget(self, ids: Sequence[str]) -> None:
        for chunk in _chunks(ids):
            self.client.delete(*self._keys(chunk))

    def close(self) -> None:
        self.client.close()


class SQLiteResults(ResultReader):
    """celeriac's SQLite result store (its ``results`` table), opened read-only beside the worker.

    WAL mode lets this reader run while the worker writes, without blocking it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection | None:
        if self._db is None:
            if not self.path.exists():
                return None  # the worker has not created the store yet
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        return self._db

    def _select(self, what: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
        db = self._connection()
        if db is None:
            return []
        rows: list[tuple[Any, ...]] = []
        for chunk in _chunks(ids, 900):
            marks = ",".join("?" * len(chunk))
            try:
                query = f"SELECT {what} FROM results WHERE task_id IN ({marks})"
                rows.extend(db.execute(query, list(chunk)).fetchall())
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []  # created by the worker's first connect
                raise
        return rows

    def count(self, ids: Sequence[str]) -> int:
        return len(self._select("task_id", ids))

    def done_times(self, ids: Sequence[str]) -> list[float]:
        rows = self._select("task_id, payload", ids)
        if len(rows) != len(ids):
            raise BenchmarkError(f"{len(ids) - len(rows)} tasks have no stored result")
        return [_done_time(json.loads(payload), task_id) for task_id, payload in rows]

    def forget(self, ids: Sequence[str]) -> None:
        """Nothing to do: the store is a file of the run's own, deleted with its directory."""

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def wait_for(
    reader: ResultReader,
    ids: Sequence[str],
    *,
    stall_timeout: float,
    alive: Callable[[], None] = lambda: None,
    what: str = "tasks",
) -> None:
    """Return once every task of ``ids`` has a stored result.

    Polls a sample (every ``n/200``-th id and the last 20) until all of it is stored, then the
    whole list; a full count of 100,000 keys every 100 ms would load the very server the worker
    is using. Raises :class:`BenchmarkError` if no progress is seen for ``stall_timeout`` seconds,
    or when ``alive()`` raises (the worker died).
    """
    step = max(1, len(ids) // 200)
    sample = list(dict.fromkeys([*ids[::step], *ids[-20:]]))
    last_progress = time.monotonic()
    seen = -1
    done_sample = False
    while True:
        alive()
        if not done_sample:
            current = reader.count(sample)
            done_sample = current == len(sample)
        if done_sample:
            current = reader.count(ids)
            if current == len(ids):
                return
            current += len(sample)  # progress on the whole list counts after the sample's
        if current > seen:
            seen, last_progress = current, time.monotonic()
        elif time.monotonic() - last_progress > stall_timeout:
            stored = reader.count(ids)
            raise BenchmarkError(
                f"{what}: no progress for {stall_timeout:.0f} s ({stored} of {len(ids)} stored)"
            )
        time.sleep(POLL)
