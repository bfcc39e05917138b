"""Synchronous callers on Redis: ``delay()``, ``group().apply_async()`` and ``get()`` on the
caller's own thread, over blocking connections, instead of through the portal's event loop.

Every test checks the fast path against what the portal path does: the same stored bytes (but
for the delivery tag), the same errors, the same waiting rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from celeriac import Celery, group, states
from celeriac.app.base import _SyncClients
from celeriac.app.queues import Exchange, Queue
from celeriac.backends import redis as redis_backend
from celeriac.backends.base import BackendOptions
from celeriac.backends.redis import RedisBackend
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import ConnectionError, PublishError, TimeoutError
from celeriac.signals import after_task_publish, before_task_publish
from tests.brokers.test_resp import private_redis, wait_for_port
from tests.forking import run_in_fork_child
from tests.services import REDIS_DB, REDIS_HOST, REDIS_PORT, free_port, redis_url, require_redis
from tests.services import unique as unique_name

FAST_RETRIES = {"max_retries": 2, "interval_start": 0, "interval_step": 0.01, "interval_max": 0.01}
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def make_app(broker: str, backend: str, prefix: str, **settings: Any) -> Celery:
    app = Celery(
        "syncclient",
        broker=broker,
        backend=backend,
        set_as_current=False,
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        task_default_queue=unique_name("q"),
        **settings,
    )

    @app.task(name="sync.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="sync.fail")
    def fail() -> None:
        raise KeyError("missing")

    return app


@pytest.fixture
def prefix() -> Iterator[str]:
    require_redis()
    prefix = f"{unique_name('sc')}:"
    yield prefix
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def app(prefix: str) -> Iterator[Celery]:
    app = make_app(redis_url(), redis_url(), prefix)
    yield app
    app.close()


@pytest.fixture
def raw(prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    yield client
    client.close()


@contextlib.contextmanager
def no_portal(app: Celery) -> Iterator[None]:
    """Fail the test if a synchronous call goes through the portal's loop."""

    def refuse(coro: Any) -> Any:
        coro.close()
        raise AssertionError("went through the portal")

    app.run_sync = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        del app.run_sync


def through_portal(app: Celery) -> None:
    """Make ``app`` take the portal path for everything, as transports without blocking methods."""
    app._sync_clients = _SyncClients(0, broker_known=True, store_known=True)
    app._sync = lambda: app._sync_clients  # type: ignore[method-assign,assignment,return-value]


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Everything stored under ``prefix``: delivery tags and the time left until ``expires``
    (which differ from one publish to the next) replaced."""
    found: dict[bytes, Any] = {}
    for key in sorted(client.scan_iter(match=f"{prefix}*", count=1000)):
        kind = client.type(key)
        if kind == b"list":
            found[key] = client.lrange(key, 0, -1)
        elif kind == b"zset":
            found[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"hash":
            found[key] = sorted(client.hgetall(key).items())
        elif kind == b"set":
            found[key] = sorted(client.smembers(key))
        else:
            found[key] = client.get(key)
    text = repr(found).encode()
    for tag in set(re.findall(rb'"delivery_tag": "([0-9a-f-]{36})"', text)):
        text = text.replace(tag, b"TAG")
    # Milliseconds left until ``expires``, as of the publish.
    text = re.sub(rb'"expiration": "\d+"', b'"expiration": "MS"', text)
    return {"stored": text}


# -- publishing --------------------------------------------------------------------------------

SOON = datetime(2100, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"priority": 6},
        {"eta": SOON},
        {"expires": SOON, "headers": {"x-trace": "abc"}, "ignore_result": True},
    ],
    ids=["plain", "priority", "eta", "expires-headers"],
)
def test_delay_stores_what_the_asyncio_path_stores(
    app: Celery, raw: redis.Redis, prefix: str, options: dict[str, Any]
) -> None:
    add = app.tasks["sync.add"]
    with no_portal(app):
        add.apply_async((2, 3), task_id="fixed-id", **options)
    fast = snapshot(raw, prefix)
    for key in raw.scan_iter(match=f"{prefix}*"):
        raw.delete(key)

    async def asyncio_path() -> None:
        await add.aapply_async((2, 3), task_id="fixed-id", **options)
        await app.aclose()

    asyncio.run(asyncio_path())
    assert snapshot(raw, prefix) == fast
    assert b"fixed-id" in fast["stored"]


def test_a_queue_behind_an_exchange_is_declared_then_published_to(
    prefix: str, raw: redis.Redis
) -> None:
    exchange = unique_name("ex")
    queue = unique_name("topicq")
    app = make_app(
        redis_url(),
        redis_url(),
        prefix,
        task_queues=[Queue(queue, Exchange(exchange, type="topic"), routing_key="jobs.#")],
    )
    try:
        with no_portal(app):
            app.tasks["sync.add"].apply_async((1, 2), queue=queue)
            app.tasks["sync.add"].apply_async((3, 4), queue=queue)
        assert raw.llen(f"{prefix}{queue}") == 2
        assert b'"exchange": "' + exchange.encode() in raw.lindex(f"{prefix}{queue}", 0)
        assert raw.scard(f"{prefix}_kombu.binding.{exchange}") == 1
        assert raw.hget(f"{prefix}_celeriac.exchanges", exchange) == b"topic"
    finally:
        app.close()


def test_group_publishes_every_member_on_the_callers_thread(
    app: Celery, raw: redis.Redis, prefix: str
) -> None:
    add = app.tasks["sync.add"]
    with no_portal(app):
        result = group(add.s(i, i) for i in range(2500)).apply_async()
    stored = raw.lrange(f"{prefix}{app.conf.task_default_queue}", 0, -1)
    assert len(stored) == 2500
    ids = set(re.findall(rb'"id": "([0-9a-f-]{36})"', b"".join(stored)))
    assert ids == {r.id.encode() for r in result.results}


def test_publish_signals_are_sent_on_the_fast_path(app: Celery) -> None:
    seen: list[tuple[str, Any]] = []

    def before(sender: Any = None, routing_key: Any = None, **_: Any) -> None:
        seen.append(("before", routing_key))

    def after(sender: Any = None, routing_key: Any = None, **_: Any) -> None:
        seen.append(("after", routing_key))

    before_task_publish.connect(before)
    after_task_publish.connect(after)
    try:
        with no_portal(app):
            app.tasks["sync.add"].delay(1, 1)
    finally:
        before_task_publish.disconnect(before)
        after_task_publish.disconnect(after)
    queue = app.conf.task_default_queue
    assert seen == [("before", queue), ("after", queue)]


def test_threads_publish_at_once(app: Celery, raw: redis.Redis, prefix: str) -> None:
    add = app.tasks["sync.add"]
    ids: list[str] = []

    def send() -> None:
        ids.extend(add.delay(1, 2).id for _ in range(50))

    with no_portal(app):
        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(set(ids)) == 400
    assert raw.llen(f"{prefix}{app.conf.task_default_queue}") == 400


def _normalized(exc: BaseException) -> str:
    return UUID.sub(b"ID", str(exc).encode()).decode()


@pytest.mark.parametrize("retry", [True, False])
def test_an_unreachable_broker_fails_as_through_the_portal(
    retry: bool, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    errors: list[str] = []
    for fast in (True, False):
        app = make_app(url, "memory://", "p:", task_publish_retry_policy=FAST_RETRIES)
        if not fast:
            through_portal(app)
        caplog.clear()
        with pytest.raises(PublishError) as failed:
            app.tasks["sync.add"].apply_async((1, 2), retry=retry)
        errors.append(_normalized(failed.value))
        assert len([r for r in caplog.records if "retrying" in r.message]) == (2 if retry else 0)
        app.close()
    assert errors[0] == errors[1]
    assert "cannot connect: Error 111 connecting to 127.0.0.1" in errors[0]


# -- results -----------------------------------------------------------------------------------


def store_result(app: Celery, task_id: str, value: Any, status: str = states.SUCCESS) -> None:
    """Write a result document the way a worker does (script: SET and PUBLISH)."""

    async def write() -> None:
        store = app.create_result_store()
        await store.connect()
        try:
            await store.store(
                {
                    "status": status,
                    "result": value,
                    "traceback": None,
                    "children": [],
                    "date_done": None,
                    "task_id": task_id,
                }
            )
        finally:
            await store.close()

    asyncio.run(write())


def test_get_with_a_worker_running(app: Celery) -> None:
    add, fail = app.tasks["sync.add"], app.tasks["sync.fail"]
    with start_worker(app, concurrency=2), no_portal(app):
        assert [add.delay(i, 1).get(timeout=10) for i in range(20)] == [i + 1 for i in range(20)]
        failed = fail.delay()
        with pytest.raises(KeyError, match="missing"):
            failed.get(timeout=10)
        assert isinstance(fail.delay().get(timeout=10, propagate=False), KeyError)
        assert failed.state == states.FAILURE
        result = add.delay(1, 1)
        result.get(timeout=10)
        assert result.state == states.SUCCESS and result.result == 2


def test_get_of_a_result_already_there_and_state_reads(app: Celery) -> None:
    store_result(app, "done-id", 42)
    with no_portal(app):
        pending = app.AsyncResult("never-sent")
        assert pending.state == states.PENDING
        done = app.AsyncResult("done-id")
        assert done.state == states.SUCCESS
        assert app.AsyncResult("done-id").get(timeout=0) == 42


def test_get_times_out_after_reading_the_key_once_more(app: Celery, raw: redis.Redis) -> None:
    result = app.AsyncResult("slow-id")
    with no_portal(app):
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="timed out waiting for task slow-id"):
            result.get(timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 1.5
        with pytest.raises(TimeoutError):
            result.get(timeout=0)


def test_get_is_woken_by_the_published_result(app: Celery) -> None:
    outcome: list[Any] = []

    def wait() -> None:
        started = time.monotonic()
        outcome.append(app.AsyncResult("woken-id").get(timeout=10))
        outcome.append(time.monotonic() - started)

    with no_portal(app):
        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.2)
        store_result(app, "woken-id", "hello")
        waiter.join(10)
    assert outcome[0] == "hello"
    assert outcome[1] < redis_backend.FALLBACK_POLL_INTERVAL  # woken, not found by a poll


def test_a_result_stored_without_a_message_is_found_by_the_fallback_read(
    app: Celery, raw: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "FALLBACK_POLL_INTERVAL", 0.05)
    outcome: list[Any] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(app.AsyncResult("quiet-id").get(timeout=5))
    )
    with no_portal(app):
        waiter.start()
        time.sleep(0.2)
        raw.set(
            f"{prefix}celery-task-meta-quiet-id",
            b'{"status": "SUCCESS", "result": 7, "traceback": null, "children": [], '
            b'"date_done": null, "task_id": "quiet-id"}',
        )
        waiter.join(5)
    assert outcome == [7]


def test_the_wait_goes_on_after_its_connection_is_lost(prefix: str, raw: redis.Redis) -> None:
    name = unique_name("results")
    app = make_app(redis_url(), f"{redis_url()}?client_name={name}", prefix)
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(app.AsyncResult("kill-id").get(10)))
    try:
        with no_portal(app):
            waiter.start()
            deadline = time.monotonic() + 5
            killed = 0
            while not killed and time.monotonic() < deadline:
                time.sleep(0.05)
                for client in raw.client_list():
                    if client["name"] == name and int(client["sub"]) > 0:
                        raw.client_kill_filter(_id=client["id"])
                        killed += 1
            assert killed
            time.sleep(0.1)
            store_result(app, "kill-id", "survived")
            waiter.join(10)
        assert outcome == ["survived"]
    finally:
        app.close()


def test_an_unreachable_result_store_fails_as_through_the_portal() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    errors: list[tuple[str, str]] = []
    for fast in (True, False):
        app = make_app("memory://", url, "p:")
        if not fast:
            through_portal(app)
        with pytest.raises(ConnectionError) as waiting:
            app.AsyncResult("x").get(timeout=1)
        with pytest.raises(ConnectionError) as reading:
            _ = app.AsyncResult("x").state
        errors.append((str(waiting.value), str(reading.value)))
        app.close()
    assert errors[0] == errors[1]
    assert "connect failed: cannot connect: [Errno 111]" in errors[0][0]


def test_a_server_without_resp3_is_waited_for_through_the_portal(tmp_path: Path) -> None:
    port = free_port()
    with private_redis(tmp_path, "--port", str(port), "--rename-command", "HELLO", '""') as proc:
        wait_for_port(port, proc)
        url = f"redis://127.0.0.1:{port}/0"
        app = make_app(url, url, "p:")
        try:
            store_result(app, "old-server", "fine")
            assert app.AsyncResult("old-server").get(timeout=5) == "fine"
            assert app._sync().store is None  # told apart once, then the portal for good
            assert app.AsyncResult("old-server").state == states.SUCCESS
            with no_portal(app):  # publishing needs no RESP3
                app.tasks["sync.add"].delay(1, 2)
        finally:
            app.close()


def test_a_forked_child_uses_connections_of_its_own(
    app: Celery, raw: redis.Redis, prefix: str
) -> None:
    add = app.tasks["sync.add"]
    store_result(app, "shared-id", "from the parent")
    with no_portal(app):
        add.delay(1, 1)
        assert app.AsyncResult("shared-id").state == states.SUCCESS
    broker_pool = app._sync().broker._sync_pool  # type: ignore[union-attr]
    idle_before = list(broker_pool._idle)

    async def child() -> None:
        with no_portal(app):
            add.delay(2, 2)
            assert app.AsyncResult("shared-id").get(timeout=5) == "from the parent"
        app.close()

    assert run_in_fork_child(child) == 0
    assert list(broker_pool._idle) == idle_before  # the parent's connection, untouched
    with no_portal(app):
        add.delay(3, 3)
    assert raw.llen(f"{prefix}{app.conf.task_default_queue}") == 3


def test_result_store_options_are_the_fast_paths_too(prefix: str) -> None:
    """The store the fast path reads is the configured one: prefix, serializer, accept."""
    app = make_app(redis_url(), redis_url(), prefix)
    try:
        store = app._sync_store()
        assert isinstance(store, RedisBackend)
        assert store.prefix == f"{prefix}celery-task-meta-"
        assert store.options == app.backend_options()
        assert isinstance(store.options, BackendOptions)
    finally:
        app.close()


def test_a_store_that_goes_away_during_a_wait_fails_it(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with private_redis(tmp_path, "--port", str(port)) as proc:
        wait_for_port(port, proc)
        app = make_app("memory://", url, "p:")
        outcome: list[BaseException] = []

        def wait() -> None:
            try:
                app.AsyncResult("gone-id").get(timeout=30)
            except BaseException as exc:
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        with no_portal(app):
            waiter.start()
            time.sleep(0.3)
            proc.terminate()
            proc.wait(10)
            waiter.join(10)
        app.close()
    assert not waiter.is_alive()
    assert isinstance(outcome[0], ConnectionError)
    assert f"result store {url}: reading results failed: cannot connect" in str(outcome[0])
