"""The revocation stores (memory, SQLite broker and result files, Redis) against one contract.

Each test opens two instances on the same storage, a writer (a client's ``revoke()``) and a reader
(a worker), as the two sides of a real deployment are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac.backends.sqlite import RESULT_STORE_FILE
from celeriac.brokers._revocations import MemoryRevocations, Revocation, RevocationStore
from celeriac.brokers._revocations_sqlite import SQLiteRevocations
from celeriac.brokers._sqlite_schema import BROKER_FILE
from celeriac.utils import sqlite
from tests import services

Factory = Callable[[], RevocationStore]


class Storage:
    """Where one test's revocations live: makes stores on it and counts what it really holds."""

    def __init__(self, make: Factory, count: Callable[[], int]) -> None:
        self.make = make
        self.count = count


def _sqlite_storage(path: Path, fmt: sqlite.FileFormat) -> Storage:
    settings = sqlite.parse_options({}, fmt)

    def count() -> int:
        with sqlite3.connect(path) as conn:
            (rows,) = conn.execute("SELECT COUNT(*) FROM revoked").fetchone()
            return int(rows)

    return Storage(lambda: SQLiteRevocations(str(path), fmt, settings), count)


def _redis_storage() -> Iterator[Storage]:
    services.require_redis()
    import redis

    from celeriac.brokers._revocations_redis import RedisRevocations, stream_key
    from celeriac.utils.redis_url import parse_redis_url

    prefix = services.unique("rv") + ":"
    target, _ = parse_redis_url(services.redis_url())
    client = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=services.REDIS_DB)

    def count() -> int:
        return int(client.xlen(stream_key(prefix)))

    try:
        yield Storage(lambda: RedisRevocations(target, prefix, "broker"), count)
    finally:
        client.delete(stream_key(prefix))
        client.close()


@pytest.fixture(params=["memory", "sqlite-broker", "sqlite-results", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    kind = request.param
    if kind == "memory":
        name = services.unique("mem")
        stores: list[MemoryRevocations] = []

        def make() -> RevocationStore:
            stores.append(MemoryRevocations(name))
            return stores[-1]

        def count() -> int:
            from celeriac.brokers._revocations import _logs

            return len(_logs.named(name).entries)

        yield Storage(make, count)
    elif kind == "sqlite-broker":
        yield _sqlite_storage(tmp_path / "broker.sqlite3", BROKER_FILE)
    elif kind == "sqlite-results":
        yield _sqlite_storage(tmp_path / "results.sqlite3", RESULT_STORE_FILE)
    else:
        yield from _redis_storage()


def run(
    storage: Storage, body: Callable[[RevocationStore, RevocationStore], Awaitable[Any]]
) -> Any:
    """``body(writer, reader)`` with both stores connected, on a fresh event loop."""

    async def main() -> Any:
        writer, reader = storage.make(), storage.make()
        await writer.connect()
        await reader.connect()
        try:
            return await body(writer, reader)
        finally:
            await writer.close()
            await reader.close()

    return asyncio.run(main())


def ids(revocations: list[Revocation]) -> list[str]:
    return [r.task_id for r in revocations]


def live(task_id: str, terminate: bool = False, signal: str | None = None) -> Revocation:
    return Revocation(task_id, time.time() + 60, terminate, signal)


def test_a_reader_loads_everything_then_follows_from_its_cursor(storage: Storage) -> None:
    async def body(writer: RevocationStore, reader: RevocationStore) -> None:
        found, cursor = await reader.read(None, 0)
        assert found == []
        await writer.revoke([live("a"), live("b")], limit=100)
        found, cursor = await reader.read(cursor, 1.0)
        assert ids(found) == ["a", "b"]
        await writer.revoke([live("c", terminate=True, signal="SIGKILL")], limit=100)
        found, cursor = await reader.read(cursor, 1.0)
        assert found == [Revocation("c", found[0].expires_at, True, "SIGKILL")]
        # Nothing new: the same cursor comes back after the wait.
        started = time.monotonic()
        assert await reader.read(cursor, 0.2) == ([], cursor)
        assert time.monotonic() - started >= 0.15
        # A starting worker loads every live revocation.
        everything, _ = await reader.read(None, 0)
        assert ids(everything) == ["a", "b", "c"]

    run(storage, body)


def test_revoking_again_reaches_the_readers_again(storage: Storage) -> None:
    async def body(writer: RevocationStore, reader: RevocationStore) -> None:
        await writer.revoke([live("a")], limit=100)
        _, cursor = await reader.read(None, 0)
        await writer.revoke([live("a", terminate=True, signal="SIGTERM")], limit=100)
        found, _ = await reader.read(cursor, 1.0)
        assert [(r.task_id, r.terminate) for r in found] == [("a", True)]

    run(storage, body)


def test_a_waiting_reader_hears_of_a_revoke_at_once(storage: Storage) -> None:
    async def body(writer: RevocationStore, reader: RevocationStore) -> float:
        _, cursor = await reader.read(None, 0)
        waiting = asyncio.create_task(reader.read(cursor, 5.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await writer.revoke([live("x")], limit=100)
        found, _ = await waiting
        assert ids(found) == ["x"]
        return time.monotonic() - started

    # In one process every store wakes its readers (SQLite polls only other processes).
    assert run(storage, body) < 0.5


def test_only_the_newest_are_kept(storage: Storage) -> None:
    async def body(writer: RevocationStore, reader: RevocationStore) -> None:
        await writer.revoke([live("a"), live("b")], limit=3)
        await writer.revoke([live("c"), live("d"), live("e")], limit=3)
        found, _ = await reader.read(None, 0)
        assert ids(found) == ["c", "d", "e"]

    run(storage, body)
    assert storage.count() == 3


def test_expired_revocations_are_gone(storage: Storage) -> None:
    async def body(writer: RevocationStore, reader: RevocationStore) -> None:
        await writer.revoke([Revocation("old", time.time() + 0.2)], limit=100)
        _, cursor = await reader.read(None, 0)
        await asyncio.sleep(0.3)
        await writer.revoke([live("new")], limit=100)
        found, _ = await reader.read(None, 0)
        assert ids(found) == ["new"]
        # A reader following the store does not see an expired one either.
        await writer.revoke([Revocation("dead", time.time() - 1)], limit=100)
        found, _ = await reader.read(cursor, 1.0)
        assert ids(found) == ["new"]

    run(storage, body)
    # The expired ones were deleted by the writes, not merely skipped by the readers.
    assert storage.count() == 1


def test_a_store_used_before_connect_says_so(storage: Storage) -> None:
    from celeriac.exceptions import ConnectionError

    async def body() -> None:
        store = storage.make()
        with pytest.raises(ConnectionError, match="not connected"):
            await store.revoke([live("a")], limit=10)

    asyncio.run(body())


def test_sqlite_revocations_live_beside_the_broker_tables(tmp_path: Path) -> None:
    """The table joins a broker file that already exists and is still a valid broker file."""
    from celeriac.brokers.base import BrokerOptions
    from celeriac.brokers.sqlite import SQLiteBroker

    path = tmp_path / "broker.sqlite3"

    async def main() -> None:
        broker = SQLiteBroker(f"sqlite:///{path}", BrokerOptions())
        await broker.connect()
        await broker.close()
        store = SQLiteRevocations(str(path), BROKER_FILE, sqlite.parse_options({}, BROKER_FILE))
        await store.connect()
        await store.revoke([live("a")], limit=10)
        await store.close()
        broker = SQLiteBroker(f"sqlite:///{path}", BrokerOptions())
        await broker.connect()
        assert await broker.size("celery") == 0
        await broker.close()

    asyncio.run(main())
