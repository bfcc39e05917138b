"""Poison messages: a task that keeps killing its worker is dead-lettered after ``max_deliveries``.

The first tests run real worker processes on the embedded SQLite broker: with the threads pool a
driver starts a new worker each time the task kills the last; with ``-P prefork`` only a pool
process dies and the worker puts the message back itself. The others use the in-process worker on
every transport, with the delivery count raised through the broker the way a dying worker raises
it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import poisontasks
import pytest

from celeriac import Celery, states
from celeriac.brokers.base import BrokerOptions
from celeriac.brokers.sqlite import SQLiteBroker
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import ImproperlyConfigured, UnknownOptionError, WorkerLostError
from celeriac.signals import task_failure
from tests import services

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(workdir: Path) -> Iterator[Path]:
    """The test's directory; the client's connections to its files are closed afterwards."""
    yield workdir
    poisontasks.app.close()


def crash_runs(workdir: Path) -> list[list[str]]:
    path = workdir / poisontasks.RUNS_FILE
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def waiting(workdir: Path) -> int:
    async def size() -> int:
        broker = SQLiteBroker(f"sqlite:///{workdir}/broker.sqlite3", BrokerOptions())
        await broker.connect()
        try:
            return await broker.size("celery")
        finally:
            await broker.close()

    return asyncio.run(size())


def sqlite_dead_letters(workdir: Path) -> list[Any]:
    async def read() -> list[Any]:
        broker = SQLiteBroker(f"sqlite:///{workdir}/broker.sqlite3", BrokerOptions())
        await broker.connect()
        try:
            return await broker.dead_letters()
        finally:
            await broker.close()

    return asyncio.run(read())


def test_a_task_that_kills_its_worker_ends_failure_after_max_deliveries_runs(
    start_worker: Any, client: Path
) -> None:
    """cap 3: three runs, each killing its worker; the fourth delivery is dead-lettered, not run.
    1,000 healthy tasks published around it all succeed, including those held beside it."""
    healthy = [poisontasks.add.delay(i, i) for i in range(500)]
    poison = poisontasks.crash.delay()
    healthy += [poisontasks.add.delay(i, i) for i in range(500, 1000)]

    worker = start_worker("-c", "2", app="poisontasks")
    workers = [worker]
    deadline = time.monotonic() + 60
    while poison.state not in states.READY_STATES:
        assert time.monotonic() < deadline, f"the poison task never ended:\n{worker.log()}"
        if worker.proc.poll() is not None:
            assert worker.proc.returncode == 17, worker.log()
            worker = start_worker("-c", "2", app="poisontasks")
            workers.append(worker)
        time.sleep(0.05)

    with pytest.raises(WorkerLostError) as raised:
        poison.get(timeout=1)
    assert "delivered 3 times without finishing (max_deliveries=3)" in str(raised.value)
    assert poison.state == states.FAILURE
    assert [r.get(timeout=30) for r in healthy] == [i + i for i in range(1000)]

    # Three runs, one per delivery, each killing its worker; the fourth worker never ran it.
    assert crash_runs(client) == [[poison.id, "1"], [poison.id, "2"], [poison.id, "3"]]
    assert [w.proc.returncode for w in workers[:3]] == [17, 17, 17]
    assert len(workers) == 4 and workers[3].proc.poll() is None
    assert "Dead-lettered on delivery 4 instead of being run again" in workers[3].log()

    [letter] = sqlite_dead_letters(client)
    assert letter.message.headers["id"] == poison.id
    assert letter.reason == "poison message: delivered 3 times without finishing (max_deliveries=3)"


def test_in_a_process_pool_a_poison_task_is_requeued_until_its_cap(
    start_worker: Any, client: Path
) -> None:
    """-P prefork: the child dies, the worker lives and puts the message back (counted) each
    time; after max_deliveries runs it is dead-lettered. Healthy tasks beside it all complete."""
    healthy = [poisontasks.add.delay(i, i) for i in range(200)]
    poison = poisontasks.crash.delay()
    healthy += [poisontasks.add.delay(i, i) for i in range(200, 400)]
    worker = start_worker("-P", "prefork", "-c", "2", app="poisontasks")
    with pytest.raises(WorkerLostError, match=r"delivered 3 times without finishing"):
        poison.get(timeout=30)
    assert [r.get(timeout=30) for r in healthy] == [i + i for i in range(400)]
    assert crash_runs(client) == [[poison.id, "1"], [poison.id, "2"], [poison.id, "3"]]
    assert worker.proc.poll() is None  # only its pool processes died
    log = worker.log()
    assert log.count(f"poisontasks.crash[{poison.id}]: the process running it died") == 3
    [letter] = sqlite_dead_letters(client)
    assert letter.message.headers["id"] == poison.id


def test_in_a_process_pool_reject_on_worker_lost_false_fails_at_once(
    start_worker: Any, client: Path
) -> None:
    """Celery's behaviour, asked for per task: FAILURE (WorkerLostError) after one run, the
    message acked rather than dead-lettered."""
    worker = start_worker("-P", "prefork", "-c", "2", app="poisontasks")
    lost = poisontasks.crash_once.delay()
    with pytest.raises(WorkerLostError, match="Worker exited prematurely"):
        lost.get(timeout=30)
    assert poisontasks.add.delay(1, 2).get(timeout=30) == 3
    assert crash_runs(client) == [[lost.id, "1"]]
    assert sqlite_dead_letters(client) == []
    assert worker.proc.poll() is None
    worker.stop()
    assert waiting(client) == 0


# -- the in-process worker, on every transport ---------------------------------------------------

#: Lease of the deliveries the tests lose on purpose, and of the worker's own.
LEASE = 0.3


class Transport:
    """An app on one transport, its store fresh for the test; results in memory (one process)."""

    def __init__(self, kind: str, tmp_path: Path, **settings: Any) -> None:
        self.kind = kind
        name = services.unique("poison")
        options: dict[str, Any] = {"visibility_timeout": LEASE}
        if kind == "memory":
            broker = f"memory://{name}"
        elif kind == "sqlite":
            broker = f"sqlite:///{tmp_path}/broker.sqlite3"
        elif kind == "redis":
            services.require_redis()
            broker = services.redis_url()
            options["global_keyprefix"] = f"{name}:"
        else:
            services.require_rabbitmq()
            broker = services.amqp_url()
            options["name_prefix"] = f"{name}."
        self.options = options
        self.app = Celery(
            "poison",
            broker=broker,
            backend=f"memory://{name}",
            broker_transport_options=options,
            set_as_current=False,
            **settings,
        )

    def lose_deliveries(self, count: int, queue: str = "celery") -> list[int]:
        """Fetch the first message of ``queue`` ``count`` times, each time closing the broker
        without settling it, as a worker process that dies does; the delivery counts seen."""

        async def lose() -> int:
            broker = self.app.create_broker()
            await broker.connect()
            [delivery] = await broker.fetch([queue], 1, 5)
            await broker.close()
            if broker.leases_expire:
                await asyncio.sleep(LEASE)
            return delivery.delivery_count

        return [asyncio.run(lose()) for _ in range(count)]

    def hand_back(self) -> int:
        """Fetch the first waiting message and hand it back unused (``defer`` until now), as a
        worker does with a message it will not start; the delivery count seen. On RabbitMQ that
        also settles where a redelivered message ends up in its queue (at the back)."""

        async def fetch_and_defer() -> int:
            broker = self.app.create_broker()
            await broker.connect()
            try:
                [delivery] = await broker.fetch(["celery"], 1, 5)
                await broker.defer(delivery, time.time())
                return delivery.delivery_count
            finally:
                await broker.close()

        return asyncio.run(fetch_and_defer())

    def dead_letters(self) -> list[Any]:
        async def read() -> list[Any]:
            broker = self.app.create_broker()
            await broker.connect()
            try:
                return await broker.dead_letters()
            finally:
                await broker.close()

        return asyncio.run(read())

    def cleanup(self) -> None:
        self.app.close()
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(services.redis_url())
            keys = list(client.scan_iter(match=f"{self.options['global_keyprefix']}*"))
            if keys:
                client.delete(*keys)
            client.close()
        elif self.kind == "amqp":
            import kombu

            with kombu.Connection(services.amqp_url()) as connection:
                for queue in ("celery", "celeriac.dead_letter"):
                    connection.default_channel.queue_delete(self.options["name_prefix"] + queue)


@pytest.fixture
def transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """``transport(kind, **settings)``: a :class:`Transport`, cleaned up after the test."""
    made: list[Transport] = []

    def make(kind: str, **settings: Any) -> Transport:
        made.append(Transport(kind, tmp_path, **settings))
        return made[-1]

    yield make
    for item in made:
        item.cleanup()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "amqp"])
def test_the_cap_dead_letters_on_every_transport(kind: str, transport: Any) -> None:
    """A message whose deliveries were lost ``max_deliveries`` times is not run again: FAILURE
    (WorkerLostError) for its caller at once, ``task_failure`` and its errback as for any
    failure, the message in the dead letters with the reason; a task beside it runs."""
    where = transport(kind, task_max_deliveries=2)
    app = where.app
    ran: list[str] = []
    failures: list[BaseException] = []
    errbacks: list[str] = []

    @app.task
    def crash() -> None:
        ran.append("crash")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def on_error(task_id: str) -> None:
        errbacks.append(task_id)

    def on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
        if sender is crash and exception is not None:
            failures.append(exception)

    poison = crash.apply_async(link_error=on_error.s(), task_id=str(uuid.uuid4()))
    assert where.lose_deliveries(2) == [1, 2]
    healthy = add.delay(2, 3)
    task_failure.connect(on_failure)
    try:
        with start_worker(app, concurrency=2):
            started = time.monotonic()
            with pytest.raises(WorkerLostError) as raised:
                poison.get(timeout=10)
            assert time.monotonic() - started < 5
            assert healthy.get(timeout=10) == 5
            deadline = time.monotonic() + 5
            while not errbacks and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        task_failure.disconnect(on_failure)
    assert str(raised.value) == (
        f"Task {crash.name}[{poison.id}] was delivered 2 times without finishing "
        "(max_deliveries=2); dead-lettered"
    )
    assert ran == []  # never run by the worker that dead-lettered it
    assert [str(e) for e in failures] == [str(raised.value)]
    assert errbacks == [poison.id]
    [letter] = where.dead_letters()
    assert letter.message.headers["id"] == poison.id
    assert letter.reason == "poison message: delivered 2 times without finishing (max_deliveries=2)"


def test_a_task_without_a_cap_runs_however_often_it_was_delivered(transport: Any) -> None:
    where = transport("memory", task_max_deliveries=1)
    app = where.app

    @app.task(max_deliveries=None, bind=True)
    def uncapped(self: Any) -> int:
        return int(self.request.delivery_count)

    @app.task(max_deliveries=3, bind=True)
    def capped(self: Any) -> int:
        return int(self.request.delivery_count)

    first = uncapped.delay()
    assert where.lose_deliveries(3) == [1, 2, 3]
    second = capped.apply_async(queue="other")
    assert where.lose_deliveries(2, "other") == [1, 2]  # the app's cap is 1; the task's is 3
    with start_worker(app, queues=["celery", "other"]):
        assert first.get(timeout=10) == 4
        assert second.get(timeout=10) == 3


def test_a_redelivered_message_runs_alone(transport: Any) -> None:
    """The message that may have killed its last worker runs with nothing else running or held,
    so that if it kills this worker too, it alone is counted. Messages handed back meanwhile are
    not counted; once it is done, the others run side by side."""
    where = transport("memory")
    app = where.app
    runs: list[tuple[str, float, float, int]] = []

    @app.task(bind=True)
    def nap(self: Any, name: str) -> None:
        started = time.monotonic()
        time.sleep(0.15)
        runs.append((name, started, time.monotonic(), self.request.delivery_count))

    suspect = nap.delay("suspect")
    assert where.lose_deliveries(1) == [1]
    others = [nap.delay(f"other{i}") for i in range(6)]
    with start_worker(app, concurrency=4):
        for result in [suspect, *others]:
            result.get(timeout=10)
    by_name = {name: (start, end, count) for name, start, end, count in runs}
    start, end, count = by_name.pop("suspect")
    assert count == 2
    for other_start, other_end, other_count in by_name.values():
        assert other_end <= start or other_start >= end, runs  # never at the same time
        assert other_count == 1  # handed back unused: not counted
    spans = sorted((s, e) for s, e, _ in by_name.values())
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), runs


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "amqp"])
def test_while_a_message_runs_alone_its_worker_holds_nothing_else(
    kind: str, transport: Any
) -> None:
    """Had the worker died in the middle, only that message would have been counted: every other
    one waits in the broker, including those RabbitMQ had pushed to the worker ahead of time."""
    where = transport(kind)
    app = where.app
    seen: list[tuple[int, int]] = []

    async def waiting() -> int:
        broker = app.create_broker()
        await broker.connect()
        try:
            return await broker.size("celery")
        finally:
            await broker.close()

    @app.task(bind=True)
    def probe(self: Any) -> None:
        seen.append((self.request.delivery_count, asyncio.run(waiting())))

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    suspect = probe.delay()
    assert where.lose_deliveries(1) == [1]
    assert where.hand_back() == 2
    healthy = [add.delay(i, i) for i in range(10)]
    with start_worker(app, concurrency=2):
        suspect.get(timeout=10)
        assert [r.get(timeout=10) for r in healthy] == [i + i for i in range(10)]
    assert seen == [(2, 10)]


def test_warm_shutdown_gives_back_unstarted_messages_uncounted(transport: Any) -> None:
    """A restart must not count against messages the worker held but never started, or rolling
    restarts would push healthy messages towards their max_deliveries."""
    app = transport("memory").app
    started = threading.Event()

    @app.task
    def slow() -> None:
        started.set()
        time.sleep(0.3)

    results = [slow.delay() for _ in range(5)]
    with start_worker(app, concurrency=1) as worker:
        assert started.wait(5)
        assert len(worker._held) > 1  # the prefetch holds more than the running one
    assert results[0].get(timeout=1) is None  # the running one finished before the stop

    async def counts() -> list[int]:
        broker = app.create_broker()
        await broker.connect()
        try:
            got = await broker.fetch(["celery"], 10, 0.5)
            return [d.delivery_count for d in got]
        finally:
            await broker.close()

    assert asyncio.run(counts()) == [1, 1, 1, 1]


# -- settings --------------------------------------------------------------------------------------


def test_cap_and_worker_lost_settings_are_checked() -> None:
    app = Celery("poison-settings", broker="memory://", backend="memory://", set_as_current=False)
    assert (app.conf.task_max_deliveries, app.conf.task_reject_on_worker_lost) == (5, True)
    app.conf.task_max_deliveries = None
    for bad in (0, -1, "5", True, 2.5):
        with pytest.raises(ImproperlyConfigured, match="task_max_deliveries must be an integer"):
            app.conf.task_max_deliveries = bad
    with pytest.raises(ImproperlyConfigured, match="task_reject_on_worker_lost must be True"):
        app.conf.task_reject_on_worker_lost = "yes"

    @app.task(max_deliveries=2, reject_on_worker_lost=False)
    def strict() -> None: ...

    @app.task
    def default() -> None: ...

    assert (strict.resolved_max_deliveries(), strict.resolved_reject_on_worker_lost()) == (2, False)
    assert (default.resolved_max_deliveries(), default.resolved_reject_on_worker_lost()) == (
        None,
        True,
    )
    for bad in (0, "3", False):
        with pytest.raises(ImproperlyConfigured, match=r"max_deliveries of task .* must be"):

            @app.task(max_deliveries=bad)
            def wrong() -> None: ...

    with pytest.raises(ImproperlyConfigured, match=r"reject_on_worker_lost of task .* must be"):

        @app.task(reject_on_worker_lost=1)
        def wrong_too() -> None: ...

    with pytest.raises(UnknownOptionError, match="max_deliveries"):

        @app.task(max_delivery=3)
        def misspelt() -> None: ...
