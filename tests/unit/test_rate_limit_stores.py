"""The rate-limiter stores: one contract, held by every store that offers one.

Each scenario runs against two store instances that name the same place (two connections to one
SQLite file, two Redis clients with one key prefix, two memory brokers of one name), the way two
workers share it: a grant taken through one is seen by the other.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from celeriac.backends.base import BackendOptions
from celeriac.backends.redis import RedisBackend
from celeriac.backends.sqlite import SQLiteBackend
from celeriac.brokers.amqp import AMQPBroker
from celeriac.brokers.base import BrokerOptions
from celeriac.brokers.memory import MemoryBroker
from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.brokers.redis import RedisBroker
from celeriac.brokers.sqlite import SQLiteBroker
from celeriac.exceptions import ConnectionError
from tests.services import redis_url, require_redis, unique

RATE = 20.0
INTERVAL = 1.0 / RATE


@dataclass
class Pair:
    """Two connected instances of one store and their limiters."""

    first: RateLimiterStore
    second: RateLimiterStore
    close: Callable[[], Awaitable[None]]


def _redis_cleanup(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url())
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def _open(kind: str, tmp_path: Path, prefix: str) -> Pair:
    stores: list[Any]
    if kind == "memory broker":
        url = f"memory://{prefix}"
        stores = [MemoryBroker(url, BrokerOptions()) for _ in range(2)]
    elif kind == "sqlite broker":
        url = f"sqlite:///{tmp_path}/broker.sqlite3"
        stores = [SQLiteBroker(url, BrokerOptions()) for _ in range(2)]
    elif kind == "sqlite result store":
        url = f"sqlite:///{tmp_path}/results.sqlite3"
        stores = [SQLiteBackend(url, BackendOptions()) for _ in range(2)]
    elif kind == "redis broker":
        options = BrokerOptions(transport_options={"global_keyprefix": prefix})
        stores = [RedisBroker(redis_url(), options) for _ in range(2)]
    else:
        options_ = BackendOptions(transport_options=(("global_keyprefix", prefix),))
        stores = [RedisBackend(redis_url(), options_) for _ in range(2)]
    for store in stores:
        await store.connect()

    async def close() -> None:
        for store in stores:
            await store.close()

    first, second = (store.rate_limiter() for store in stores)
    assert first is not None and second is not None
    return Pair(first, second, close)


KINDS = ["memory broker", "sqlite broker", "sqlite result store", "redis broker", "redis result"]


@pytest.fixture(params=KINDS)
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., None]]:
    """``run(scenario)``: the scenario with a fresh :class:`Pair` of the parametrized store."""
    kind: str = request.param
    if kind.startswith("redis"):
        require_redis()
    prefix = unique("rl") + ":"

    def go(scenario: Callable[[Pair], Awaitable[None]]) -> None:
        async def main() -> None:
            pair = await _open(kind, tmp_path, prefix)
            try:
                await scenario(pair)
            finally:
                await pair.close()

        asyncio.run(main())

    yield go
    if kind.startswith("redis"):
        _redis_cleanup(prefix)


def test_a_grant_through_one_instance_is_seen_by_the_other(run: Callable[..., None]) -> None:
    async def scenario(pair: Pair) -> None:
        assert await pair.first.acquire("tasks.a", RATE) == 0.0
        wait = await pair.second.acquire("tasks.a", RATE)
        assert 0.0 < wait <= INTERVAL + 0.01
        # A refusal takes nothing: asking again and again does not push the grant back.
        for _ in range(3):
            assert 0.0 < await pair.second.acquire("tasks.a", RATE) <= wait
        # Other keys are independent.
        assert await pair.second.acquire("tasks.b", RATE) == 0.0
        await asyncio.sleep(wait + 0.005)
        assert await pair.second.acquire("tasks.a", RATE) == 0.0
        assert await pair.first.acquire("tasks.a", RATE) > 0.0

    run(scenario)


def test_contending_instances_never_exceed_the_rate(run: Callable[..., None]) -> None:
    """Eight callers on two instances ask as fast as they are told to for 0.5 s."""

    async def scenario(pair: Pair) -> None:
        grants: list[float] = []
        deadline = time.monotonic() + 0.5

        async def caller(store: RateLimiterStore) -> None:
            while time.monotonic() < deadline:
                wait = await store.acquire("tasks.hot", RATE)
                if wait == 0.0:
                    grants.append(time.monotonic())
                else:
                    await asyncio.sleep(min(wait, 0.02))

        await asyncio.gather(*(caller(s) for s in [pair.first, pair.second] * 4))
        # 0.5 s at 20/s: 10 intervals, plus the first grant.
        assert 8 <= len(grants) <= 11
        gaps = [b - a for a, b in itertools.pairwise(grants)]
        assert min(gaps) >= INTERVAL * 0.8  # measured after the reply, so with some jitter

    run(scenario)


def test_burst(run: Callable[..., None]) -> None:
    async def scenario(pair: Pair) -> None:
        granted = [await pair.first.acquire("tasks.burst", 1.0, burst=3) for _ in range(4)]
        assert granted[:3] == [0.0, 0.0, 0.0]
        assert 0.9 <= granted[3] <= 1.0

    run(scenario)


def test_impossible_arguments_are_refused(run: Callable[..., None]) -> None:
    async def scenario(pair: Pair) -> None:
        for key, rate, burst in [("", 1.0, 1), ("k", 0, 1), ("k", float("inf"), 1), ("k", 1, 0)]:
            with pytest.raises(ValueError):
                await pair.first.acquire(key, rate, burst)

    run(scenario)


def test_sqlite_table_is_added_to_the_file_without_a_new_schema_version(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = SQLiteBroker(f"sqlite:///{tmp_path}/broker.sqlite3", BrokerOptions())
        await broker.connect()
        try:
            limiter = broker.rate_limiter()
            assert await limiter.acquire("tasks.a", RATE) == 0.0
        finally:
            await broker.close()

    asyncio.run(scenario())
    with sqlite3.connect(tmp_path / "broker.sqlite3") as conn:
        rows = conn.execute("SELECT key, tat FROM rate_limits").fetchall()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    assert [key for key, _ in rows] == ["tasks.a"]
    assert rows[0][1] == pytest.approx(time.time(), abs=5)
    assert version == 1
    # The file still opens as a broker (older celeriac versions see an extra table only).
    asyncio.run(_reopen(tmp_path))


async def _reopen(tmp_path: Path) -> None:
    broker = SQLiteBroker(f"sqlite:///{tmp_path}/broker.sqlite3", BrokerOptions())
    await broker.connect()
    assert await broker.size("celery") == 0
    await broker.close()


def test_redis_key_is_prefixed_and_expires() -> None:
    require_redis()
    import redis

    prefix = unique("rl") + ":"

    async def scenario() -> None:
        options = BrokerOptions(transport_options={"global_keyprefix": prefix})
        broker = RedisBroker(redis_url(), options)
        await broker.connect()
        try:
            assert await broker.rate_limiter().acquire("tasks.a", 0.5) == 0.0
        finally:
            await broker.close()

    asyncio.run(scenario())
    client = redis.Redis.from_url(redis_url())
    try:
        key = f"{prefix}_celeriac.rate_limit.tasks.a"
        assert list(client.scan_iter(match=f"{prefix}*")) == [key.encode()]
        # The next grant is 2 s away; the key lives until a second after that.
        assert 2500 <= client.pttl(key) <= 3000
    finally:
        _redis_cleanup(prefix)
        client.close()


def test_unreachable_store_is_a_connection_error() -> None:
    async def scenario() -> None:
        broker = RedisBroker("redis://127.0.0.1:1/0", BrokerOptions())
        with pytest.raises(ConnectionError, match="not connected"):
            await broker.rate_limiter().acquire("tasks.a", RATE)

    asyncio.run(scenario())


def test_rabbitmq_keeps_no_counters() -> None:
    assert AMQPBroker("amqp://guest:guest@127.0.0.1:1/", BrokerOptions()).rate_limiter() is None
