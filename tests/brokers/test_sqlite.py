"""What only the SQLite transport has: several OS processes on one file, crashes, the file itself.

The conformance suite (test_conformance.py) covers the broker contract; these tests cover sharing a
database file between processes (spawned, killed, forked), the schema, URLs and options, and the
translation of driver errors.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from celeriac.brokers import _sqlite_schema
from celeriac.brokers.base import BrokerOptions, Delivery, PublishRequest
from celeriac.brokers.sqlite import SQLiteBroker
from celeriac.exceptions import ConnectionError, ImproperlyConfigured, PublishError
from tests.brokers.conftest import bodies, message
from tests.forking import run_in_fork_child

spawn = multiprocessing.get_context("spawn")


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


async def connected(path: Path, **options: Any) -> SQLiteBroker:
    broker = SQLiteBroker(url_of(path), BrokerOptions(**options))
    await broker.connect()
    return broker


async def publish_range(broker: SQLiteBroker, count: int, queue: str = "q") -> None:
    for start in range(0, count, 500):
        batch = [
            PublishRequest(message(str(i)), "", queue)
            for i in range(start, min(count, start + 500))
        ]
        await broker.publish_many(batch)


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return result
    finally:
        conn.close()


# -- several processes -------------------------------------------------------------------------


def _drain(url: str, start: Barrier, results: multiprocessing.Queue[list[str]]) -> None:
    """Child process: fetch and ack until the queue stays empty."""

    async def main() -> list[str]:
        broker = SQLiteBroker(url, BrokerOptions(visibility_timeout=30))
        await broker.connect()
        got: list[str] = []
        start.wait()
        while deliveries := await broker.fetch(["q"], 10, 0.5):
            got += bodies(deliveries)
            await broker.ack(deliveries)
        await broker.close()
        return got

    results.put(asyncio.run(main()))


def test_three_processes_drain_one_file_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    total = 3000

    async def fill() -> None:
        broker = await connected(path)
        await publish_range(broker, total)
        await broker.close()

    run(fill)
    start = spawn.Barrier(3)
    results: multiprocessing.Queue[list[str]] = spawn.Queue()
    workers = [spawn.Process(target=_drain, args=(url_of(path), start, results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    shares = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    received = [name for share in shares for name in share]
    assert len(received) == total, "duplicates or losses"
    assert sorted(map(int, received)) == list(range(total))
    assert all(shares), f"every process should have had a share: {[len(s) for s in shares]}"

    async def check() -> None:
        broker = await connected(path)
        assert await broker.size("q") == 0
        assert await broker.fetch(["q"], 10, 0) == []
        await broker.close()

    run(check)
    assert integrity(path) == "ok"


def _lease_and_hang(url: str, count: int, results: multiprocessing.Queue[Any]) -> None:
    """Child process: lease ``count`` messages, report them, then wait to be killed."""

    async def main() -> None:
        broker = SQLiteBroker(url, BrokerOptions(visibility_timeout=1.0))
        await broker.connect()
        before = time.time()  # the leases end at least 1 s after this
        deliveries = await broker.fetch(["q"], count, 10)
        results.put((before, bodies(deliveries)))
        await asyncio.sleep(60)

    asyncio.run(main())


def test_a_killed_workers_messages_come_back_after_the_lease(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"

    async def fill() -> None:
        broker = await connected(path)
        await publish_range(broker, 5)
        await broker.close()

    run(fill)
    results: multiprocessing.Queue[Any] = spawn.Queue()
    child = spawn.Process(target=_lease_and_hang, args=(url_of(path), 5, results))
    child.start()
    lease_start, held = results.get(timeout=30)
    assert held == ["0", "1", "2", "3", "4"]
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL

    async def recover() -> None:
        broker = await connected(path, visibility_timeout=30)
        if time.time() < lease_start + 0.9:
            assert await broker.fetch(["q"], 10, 0) == [], "delivered while the lease ran"
        back: list[Delivery] = []
        while len(back) < 5:
            back += await broker.fetch(["q"], 10, 5)
        assert time.time() >= lease_start + 1.0
        assert bodies(back) == held
        assert {(d.redelivered, d.delivery_count) for d in back} == {(True, 2)}
        await broker.ack(back)
        assert await broker.size("q") == 0
        await broker.close()

    run(recover)
    assert integrity(path) == "ok"


def test_a_broker_inherited_through_fork_reconnects_in_the_child(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    broker = SQLiteBroker(url_of(path), BrokerOptions())
    run(broker.connect)
    run(lambda: broker.publish(message("from parent"), exchange="", routing_key="q"))

    async def in_child() -> None:
        await broker.publish(message("from child"), exchange="", routing_key="q")
        await broker.close()

    assert run_in_fork_child(in_child) == 0

    async def check() -> None:
        got = await broker.fetch(["q"], 10, 0)
        assert bodies(got) == ["from parent", "from child"]
        await broker.close()

    run(check)
    assert integrity(path) == "ok"


# -- the file ----------------------------------------------------------------------------------


def test_the_file_is_marked_versioned_and_documented(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"

    async def scenario() -> None:
        broker = await connected(path)
        await broker.close()

    run(scenario)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA application_id").fetchone()[0] == _sqlite_schema.APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == _sqlite_schema.SCHEMA_VERSION
        tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
        assert set(tables) == {"messages", "queues", "exchanges", "bindings", "dead_letters"}
        # Every column carries its documentation in the stored schema.
        for name, sql in tables.items():
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({name})")]
            for line in sql.splitlines():
                if line.strip().split(" ")[0] in columns:
                    assert "--" in line, f"{name}: undocumented column line {line!r}"
    finally:
        conn.close()


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"
    run(lambda: _open_close(path))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {_sqlite_schema.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ImproperlyConfigured, match="newer celeriac"):
        run(lambda: _open_close(path))


def test_a_file_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE results (task_id TEXT PRIMARY KEY)")
    conn.close()
    with pytest.raises(ImproperlyConfigured, match="not a celeriac broker database"):
        run(lambda: _open_close(path))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 42")
    conn.close()
    with pytest.raises(ImproperlyConfigured, match="application_id 0x2a"):
        run(lambda: _open_close(path))


def test_a_file_that_is_not_a_database_is_a_connection_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just some text " * 100)
    with pytest.raises(ConnectionError, match=str(path)) as info:
        run(lambda: _open_close(path))
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_a_missing_directory_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "broker.sqlite3"
    with pytest.raises(ImproperlyConfigured, match="does not exist"):
        run(lambda: _open_close(path))
    assert not path.parent.exists()


def test_an_old_sqlite_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    with pytest.raises(ImproperlyConfigured, match=r"3\.35\.0 or newer"):
        run(lambda: _open_close(tmp_path / "broker.sqlite3"))


async def _open_close(path: Path) -> None:
    broker = await connected(path)
    await broker.close()


@pytest.mark.parametrize(
    ("options", "expected"), [({}, 1), ({"synchronous": "FULL"}, 2), ({"synchronous": "normal"}, 1)]
)
def test_synchronous_option_is_applied(
    tmp_path: Path, options: dict[str, Any], expected: int
) -> None:
    async def scenario() -> int:
        broker = await connected(tmp_path / "b.sqlite3", transport_options=options)
        try:
            value: int = await broker._run(
                lambda store: store.conn.execute("PRAGMA synchronous").fetchone()[0]
            )
            return value
        finally:
            await broker.close()

    assert run(scenario) == expected


# -- URLs, options, driver errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/broker.sqlite3",
        "sqlite:///:memory:",
        "sqlite:///broker.sqlite3?mode=ro",
        "sqlite:///broker.sqlite3#fragment",
        "sqlite:///some/dir/",
        "redis://localhost",
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="sqlite:///"):
        SQLiteBroker(url, BrokerOptions())


def test_relative_and_absolute_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = SQLiteBroker("sqlite:///data/broker.sqlite3", BrokerOptions())
    assert relative.path == str(tmp_path.resolve() / "data" / "broker.sqlite3")
    absolute = SQLiteBroker(f"sqlite:///{tmp_path}/b.sqlite3", BrokerOptions())
    assert absolute.path == str(tmp_path.resolve() / "b.sqlite3")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"synchronous": "OFF"}, "synchronous must be one of"),
        ({"synchronous": 2}, "synchronous must be one of"),
        ({"busy_timeout": 0}, "busy_timeout must be"),
        ({"busy_timeout": "5"}, "busy_timeout must be"),
        ({"busy_timeout": True}, "busy_timeout must be"),
        ({"visibility_timeout": 30}, r"Known options: busy_timeout: .*; synchronous: "),
    ],
)
def test_bad_transport_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        SQLiteBroker("sqlite:///b.sqlite3", BrokerOptions(transport_options=options))


def test_a_locked_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"

    async def scenario() -> None:
        broker = await connected(path, transport_options={"busy_timeout": 0.2})
        await broker.publish(message("x"), exchange="", routing_key="q")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            with pytest.raises(PublishError, match=r"busy_timeout=0\.2s") as info:
                await broker.publish(message("y"), exchange="", routing_key="q")
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            with pytest.raises(ConnectionError, match="stayed locked"):
                await broker.fetch(["q"], 1, 0)
            assert await broker.size("q") == 1  # reads still work under WAL
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert bodies(await broker.fetch(["q"], 10, 0)) == ["x"]
        await broker.close()

    run(scenario)


def test_a_cancelled_fetch_gives_its_leases_back(tmp_path: Path) -> None:
    path = tmp_path / "broker.sqlite3"

    async def scenario() -> None:
        broker = await connected(path, visibility_timeout=30)
        await broker.publish(message("m"), exchange="", routing_key="q")
        fetching = asyncio.create_task(broker.fetch(["q"], 1, 5))
        await asyncio.sleep(0)  # the claim is now on the broker's thread
        fetching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetching
        [got] = await broker.fetch(["q"], 1, 1)  # not 30 s later
        assert (got.delivery_count, got.redelivered) == (1, False)
        await broker.close()

    run(scenario)


def test_fetch_cost_does_not_grow_with_delayed_messages(tmp_path: Path) -> None:
    """Ready messages are found through their own index, not by skipping delayed ones."""
    path = tmp_path / "broker.sqlite3"

    async def scenario() -> None:
        broker = await connected(path)
        later = time.time() + 3600
        await broker.publish_many(
            [PublishRequest(message(str(i)), "", "q", later) for i in range(20000)]
        )
        await broker.publish(message("ready"), exchange="", routing_key="q")
        plan = await broker._run(
            lambda store: store.conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE ready = 1 AND queue = 'q' "
                "ORDER BY priority DESC, id LIMIT 10"
            ).fetchall()
        )
        assert any("messages_ready" in row[3] for row in plan)
        clock = time.perf_counter()
        for _ in range(50):
            [got] = await broker.fetch(["q"], 10, 0)
            await broker.reject(got, requeue=True)
        per_cycle = (time.perf_counter() - clock) / 50
        assert per_cycle < 0.01, f"{per_cycle * 1000:.1f} ms per fetch with 20,000 delayed"
        await broker.close()

    run(scenario)


def test_throughput(tmp_path: Path) -> None:
    """Rough figures, printed (run with -s); asserted only to be non-zero."""
    path = tmp_path / "broker.sqlite3"
    count = 3000

    async def scenario() -> dict[str, float]:
        broker = await connected(path)
        rates: dict[str, float] = {}
        clock = time.perf_counter()
        for i in range(count):
            await broker.publish(message(str(i)), exchange="", routing_key="one")
        rates["publish, one per call"] = count / (time.perf_counter() - clock)
        clock = time.perf_counter()
        await publish_range(broker, count * 4, "batch")
        rates["publish_many, 500 per call"] = count * 4 / (time.perf_counter() - clock)
        for queue, batch in (("one", 1), ("batch", 100)):
            clock = time.perf_counter()
            done = 0
            while deliveries := await broker.fetch([queue], batch, 0):
                await broker.ack(deliveries)
                done += len(deliveries)
            rates[f"fetch+ack, {batch} per fetch"] = done / (time.perf_counter() - clock)
        await broker.close()
        return rates

    rates = run(scenario)
    print(f"\nSQLite broker throughput (synchronous=NORMAL, {os.cpu_count()} CPUs):")
    for what, rate in rates.items():
        print(f"  {what:<28} {rate:>9,.0f} msg/s")
    assert all(rate > 0 for rate in rates.values())
