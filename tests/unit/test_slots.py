"""Concurrency slots: the async limit beside the pool's, per-queue limits, and their prefetch.

The arithmetic is checked on :class:`~celeriac.worker.slots.Slots` itself; the behaviour on
embedded workers (memory broker): async tasks run beside a busy pool, each limit holds, and a
queue whose slots are all busy does not hold back another queue.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from celeriac import Celery
from celeriac.cli.main import main
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import ImproperlyConfigured
from celeriac.worker import Worker
from celeriac.worker import slots as slots_module
from celeriac.worker.slots import (
    AHEAD_HORIZON,
    DEFAULT_ASYNC_CONCURRENCY,
    QueueGroup,
    Slots,
    parse_queues,
)
from tests import services


def make_app(kinds: str = "sync+async") -> Celery:
    name = f"memory://{uuid.uuid4()}"
    app = Celery("slots", broker=name, backend=name, set_as_current=False)
    if "sync" in kinds.split("+"):

        @app.task(name="slots.sync")
        def sync() -> None:
            pass

    if "async" in kinds.split("+"):

        @app.task(name="slots.async")
        async def async_() -> None:
            pass

    return app


def slots(app: Celery, queues: list[str] | None = None, **options: Any) -> Slots:
    settings: dict[str, Any] = {"concurrency": 2, "pool": "threads", "multiplier": 4}
    settings.update(options)
    # Only the tasks made here: shared tasks of other tests' modules would join every app.
    tasks = [task for name, task in app.tasks.items() if name.startswith("slots.")]
    return Slots(queues or ["celery"], tasks=tasks, **settings)


# -- the -Q option --------------------------------------------------------------------------------


def test_queues_with_and_without_their_own_limit() -> None:
    assert parse_queues("cpu:4, io:500 ,celery,") == (
        ["cpu", "io", "celery"],
        {"cpu": 4, "io": 500},
    )
    assert parse_queues("celery") == (["celery"], {})
    assert parse_queues("") == ([], {})


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("a:0", "a:0: a queue runs at least 1 task at once"),
        ("a:x", "a:x: 'x' is not a whole number of tasks; write a:N with N >= 1"),
        ("a:-1", "a:-1: '-1' is not a whole number of tasks"),
        ("a:", "a:: '' is not a whole number of tasks"),
        ("a:1:2", "a:1:2: '1:2' is not a whole number of tasks"),
        (":4", "':4': the queue name is missing before ':'"),
        ("a,b,a", "queue 'a' is listed twice"),
        ("a:2,a:3", "queue 'a' is listed twice"),
    ],
)
def test_bad_queue_specs_are_one_clear_error(spec: str, error: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="^" + _escape(error)):
        parse_queues(spec)


def _escape(text: str) -> str:
    return re.escape(text)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["-Q", "io:0"], "Invalid value for '-Q' / '--queues': io:0: a queue runs at least 1 task"),
        (["-Q", "io:many"], "Invalid value for '-Q' / '--queues': io:many: 'many' is not"),
        (["-Q", "a,a"], "Invalid value for '-Q' / '--queues': queue 'a' is listed twice"),
        (["--async-concurrency", "0"], "Invalid value for '--async-concurrency'"),
    ],
)
def test_the_command_line_refuses_bad_limits_before_starting(args: list[str], error: str) -> None:
    result = CliRunner().invoke(main, ["worker", *args])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: {error}"), result.output


# -- slots and prefetch ------------------------------------------------------------------------


def test_a_worker_without_async_tasks_keeps_celerys_prefetch() -> None:
    only_sync = slots(make_app("sync"), concurrency=3)
    assert only_sync.prefetch == 3 * 4
    assert only_sync.pool_size == 3
    [group] = only_sync.groups
    assert group.slots == 3
    assert group.slot(is_async=False)._value == 3  # the pool's slots, as before


def test_async_tasks_get_their_own_limit_and_prefetch() -> None:
    mixed = slots(make_app(), concurrency=2)
    assert mixed.async_concurrency == DEFAULT_ASYNC_CONCURRENCY
    assert mixed.prefetch == (2 + DEFAULT_ASYNC_CONCURRENCY) * 4
    [group] = mixed.groups
    assert group.slot(is_async=True) is not group.slot(is_async=False)
    assert group.slot(is_async=True)._value == DEFAULT_ASYNC_CONCURRENCY
    assert mixed.pool_size == 2  # the threads stay -c

    # All async: the pool's slots, never used, are not prefetched for.
    only_async = slots(make_app("async"), concurrency=2, async_concurrency=500)
    assert only_async.prefetch == 500 * 4
    # -c above the default also raises the async default: -c 500 still runs 500 at once.
    assert slots(make_app(), concurrency=500).async_concurrency == 500


def test_solo_runs_one_task_at_a_time_of_either_kind_unless_told() -> None:
    solo = slots(make_app(), concurrency=1, pool="solo")
    [group] = solo.groups
    assert solo.shared
    assert group.slot(is_async=True) is group.slot(is_async=False)
    assert solo.prefetch == 4
    told = slots(make_app(), concurrency=1, pool="solo", async_concurrency=50)
    assert not told.shared
    assert told.prefetch == (1 + 50) * 4


def test_each_queue_with_a_limit_has_its_own_slots_prefetch_and_threads() -> None:
    app = make_app()
    per_queue = slots(
        app, ["cpu", "celery", "io"], concurrency=2, queue_concurrency={"io": 500, "cpu": 4}
    )
    default, cpu, io = per_queue.groups
    assert default.queues == ["celery"] and default.limit is None
    assert (cpu.queues, cpu.limit, cpu.prefetch) == (["cpu"], 4, 16)
    assert (io.queues, io.limit, io.prefetch) == (["io"], 500, 2000)
    assert cpu.slot(is_async=True) is cpu.slot(is_async=False)
    assert per_queue.prefetch == default.prefetch + 16 + 2000
    assert per_queue.group_of("io") is io
    assert per_queue.group_of("celery") is default
    # A thread for every sync slot, started only when needed.
    assert per_queue.pool_size == 2 + 4 + 500
    # prefork starts its children up front: they stay -c, shared by every queue.
    prefork = slots(app, ["cpu", "io"], pool="prefork", queue_concurrency={"cpu": 4, "io": 8})
    assert prefork.pool_size == 2
    assert [g.name for g in prefork.groups] == ["cpu", "io"]  # no default group
    assert [g.name for g in prefork.by_size()] == ["io", "cpu"]
    assert "shared by every queue" in prefork.describe()[0]


def test_a_full_queue_leaves_the_others_room() -> None:
    per_queue = slots(make_app(), ["slow", "fast"], queue_concurrency={"slow": 1, "fast": 10})
    slow, fast = per_queue.groups
    slow.fetched(4, 8)  # all there was
    assert slow.room_to_fetch() == 0
    assert fast.room_to_fetch() == fast.prefetch
    # A finished task's room is fetched for while its result and ack are on their way.
    slow.waiting -= 1
    slow.handed_over()
    assert slow.room.is_set()
    assert slow.room_to_fetch() == 1
    slow.ended(handed_over=True)
    assert (slow.held, slow.finishing, slow.room_to_fetch()) == (3, 0, 1)
    # With a backlog (the last fetch was full) and every slot wanted, it waits for half the
    # prefetch: fewer, bigger fetches.
    fast.fetched(fast.prefetch, fast.prefetch)
    for _ in range(fast.prefetch // 2 - 1):
        fast.waiting -= 1
        fast.ended(handed_over=False)
    assert fast.room_to_fetch() == 0
    fast.waiting -= 1
    fast.ended(handed_over=False)
    assert fast.room_to_fetch() == fast.prefetch // 2


def test_queues_are_rotated_within_their_group() -> None:
    default = slots(make_app(), ["a", "b", "c"]).groups[0]
    assert [default.fetch_order() for _ in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"queue_concurrency": {"other": 2}}, "names queue 'other', which this worker does not"),
        ({"queue_concurrency": {"celery": 0}}, "concurrency of queue 'celery' must be an integer"),
        ({"queue_concurrency": {"celery": True}}, "must be an integer >= 1, not True"),
        ({"async_concurrency": 0}, "async_concurrency must be an integer >= 1, not 0"),
        ({"queues": ["a", "a"]}, "queue 'a' is listed twice"),
    ],
)
def test_bad_worker_arguments_are_clear_errors(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=error):
        Worker(make_app(), **options)


def test_the_setting_and_the_argument() -> None:
    app = make_app()
    app.conf.worker_async_concurrency = 7
    assert Worker(app, concurrency=2).async_concurrency == 7
    assert Worker(app, concurrency=2, async_concurrency=9).async_concurrency == 9
    with pytest.raises(ImproperlyConfigured, match="worker_async_concurrency"):
        app.conf.worker_async_concurrency = 0
    worker = Worker(app, queues=["a", "b"], queue_concurrency={"b": 3})
    lines = worker.slots.describe()
    sync, both = worker.concurrency * 4, (worker.concurrency + 7) * 4
    assert lines[0] == (
        f"Concurrency of a: {worker.concurrency} sync task(s) at once (threads pool), "
        f"7 async def task(s) at once (event loop); prefetch {sync} while only sync tasks run, "
        f"28 while only async def tasks run, {both} while both do."
    )
    assert lines[1] == (
        "Concurrency of queue b: 3 task(s) at once, sync or async, in its own slots; prefetch 12."
    )


def test_the_first_fetch_asks_for_the_bigger_share_where_it_fixes_the_prefetch() -> None:
    """On a transport that sizes its consumers by the first fetch (AMQP's basic.qos), asking for
    the pool's share first would keep an async flood to it for good."""
    [group] = slots(make_app(), concurrency=2, async_concurrency=50).groups
    group.bigger_first = True
    assert (group.budget(), group.room_to_fetch()) == (50, 200)
    group.fetched(0, 200)
    assert (group.budget(), group.room_to_fetch()) == (2, 8)  # then it follows what runs


def test_async_tasks_in_a_fetch_of_the_pools_share_let_the_next_fetch_take_theirs() -> None:
    """A flood of async tasks met by a first fetch of the pool's share is fetched up to its own
    budget before any of it starts (that fetch only: the tasks' slots tell from then on)."""
    [group] = slots(make_app(), concurrency=2, async_concurrency=50).groups
    assert (group.budget(), group.room_to_fetch()) == (2, 8)
    group.fetched(8, 8)
    assert not group.expects_async(["sync"] * 8, lambda kind: kind == "async")
    assert group.room_to_fetch() == 0
    assert group.expects_async(["sync", "async"], lambda kind: kind == "async")
    assert (group.budget(assume_async=True), group.room_to_fetch(assume_async=True)) == (50, 192)
    group.fetched(192, 192)
    assert (group.budget(), group.room_to_fetch()) == (2, 0)

    async def while_an_async_task_runs() -> bool:
        async with group.slot(is_async=True):
            return group.expects_async(["async"], lambda kind: kind == "async")

    assert asyncio.run(while_an_async_task_runs()) is False  # its slot already says so
    [only_sync] = slots(make_app("sync"), concurrency=2).groups
    assert not only_sync.expects_async(["async"], lambda kind: True)  # no async share to take


def test_short_tasks_are_fetched_one_batch_ahead_while_the_queues_have_a_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One more prefetch's worth, only while the last fetch was full, tasks have been short and
    one ended lately; Celery's count otherwise."""
    clock = [100.0]
    monkeypatch.setattr(slots_module.time, "monotonic", lambda: clock[0])
    [group] = slots(make_app("sync"), concurrency=2).groups
    group.ahead = True
    group.fetched(8, 8)  # a full fetch: the queues have more
    assert group.room_to_fetch() == 0  # no task has ended yet: nothing known of their length
    group.ran(0.0002)
    assert group.room_to_fetch() == 8  # 8 held, 8 more ahead
    group.fetched(8, 8)
    assert group.room_to_fetch() == 0  # never past twice the prefetch
    clock[0] += slots_module.AHEAD_HORIZON * 2
    group.held = 8
    assert (
        group.room_to_fetch() == 0
    )  # nothing ended lately: every slot may be busy with a long one
    group.ran(0.0002)
    assert group.room_to_fetch() == 8
    group.fetched(2, 8)  # the queues ran dry
    group.held = 8
    assert group.room_to_fetch() == 0
    group.fetched(8, 8)
    group.held = 8
    for _ in range(5):
        group.ran(0.05)  # tasks got long: the average follows within a few
    assert group.runtime is not None and group.runtime * group.multiplier > AHEAD_HORIZON
    assert group.room_to_fetch() == 0
    group.runtime, group.ahead = 0.0001, False  # worker_prefetch_ahead = False
    assert group.room_to_fetch() == 0
    group.ahead = True
    assert group.room_to_fetch() == 8
    assert group.room_to_fetch(assume_async=True) == 0  # an async flood's own fetch is exact


def test_with_both_kinds_the_prefetch_follows_what_runs() -> None:
    """Sync traffic is prefetched as Celery does, async traffic by its own limit, whatever the
    idle slots of the other kind."""
    [group] = slots(make_app(), concurrency=2, async_concurrency=50).groups
    # The first fetch asks for the pool's share, as every fetch while nothing runs: a worker that
    # starts on a backlog of sync tasks takes what Celery would.
    assert (group.budget(), group.room_to_fetch()) == (2, 8)
    group.fetched(0, 8)

    async def scenario() -> list[tuple[int, int]]:
        seen = [(group.budget(), group.room_to_fetch())]  # nothing runs: the pool's share
        async with group.slot(is_async=True):
            assert group.room.is_set()  # the consumer is told the budget grew
            seen.append((group.budget(), group.room_to_fetch()))
            async with group.slot(is_async=False):
                seen.append((group.budget(), group.room_to_fetch()))
        async with group.slot(is_async=False):
            seen.append((group.budget(), group.room_to_fetch()))
        return seen

    assert asyncio.run(scenario()) == [(2, 8), (50, 200), (52, 208), (2, 8)]
    # One kind only: the budget never changes, and nothing wakes the consumer.
    [only_sync] = slots(make_app("sync"), concurrency=2).groups
    only_sync.slot(is_async=False)
    assert not only_sync.room.is_set()
    assert only_sync.budget() == 2


# -- on embedded workers --------------------------------------------------------------------------

#: Tasks running now, and the most seen at once, per label.
running: dict[str, int] = defaultdict(int)
peak: dict[str, int] = defaultdict(int)
finished: list[tuple[str, float]] = []
release = threading.Event()


def _enter(label: str) -> None:
    running[label] += 1
    peak[label] = max(peak[label], running[label])


def _leave(label: str) -> None:
    running[label] -= 1
    finished.append((label, time.monotonic()))


def embedded_app(kind: str, tmp_path: Path) -> Celery:
    """An app on ``kind`` whose tasks record how many of them run at once."""
    running.clear()
    peak.clear()
    finished.clear()
    release.clear()
    if kind == "memory":
        name = f"memory://{uuid.uuid4()}"
        app = Celery("slots_embedded", broker=name, backend=name, set_as_current=False)
    elif kind == "sqlite":
        app = Celery(
            "slots_embedded",
            broker=f"sqlite:///{tmp_path}/broker.sqlite3",
            backend=f"sqlite:///{tmp_path}/results.sqlite3",
            set_as_current=False,
        )
    elif kind == "redis":
        services.require_redis()
        prefix = services.unique("slots") + ":"
        app = Celery(
            "slots_embedded",
            broker=services.redis_url(),
            backend=services.redis_url(),
            broker_transport_options={"global_keyprefix": prefix},
            result_backend_transport_options={"global_keyprefix": prefix},
            set_as_current=False,
        )
    else:
        services.require_rabbitmq()
        app = Celery(
            "slots_embedded",
            broker=services.amqp_url(),
            backend=f"sqlite:///{tmp_path}/results.sqlite3",
            set_as_current=False,
        )

    @app.task(name="nap")
    async def nap(label: str, seconds: float) -> None:
        _enter(label)
        try:
            await asyncio.sleep(seconds)
        finally:
            _leave(label)

    @app.task(name="noop")
    def noop() -> None:
        pass

    @app.task(name="block")
    def block(label: str) -> None:
        _enter(label)
        try:
            release.wait(10)
        finally:
            _leave(label)

    return app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    app = embedded_app("memory", tmp_path)
    yield app
    release.set()
    app.close()


@pytest.fixture(params=["memory", "sqlite", "redis", "amqp"])
def any_broker_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Celery]:
    app = embedded_app(request.param, tmp_path)
    yield app
    release.set()
    app.close()


def test_async_tasks_run_beside_a_busy_pool_within_their_own_limit(app: Celery) -> None:
    nap, block = app.tasks["nap"], app.tasks["block"]
    with start_worker(app, concurrency=1, async_concurrency=4):
        blocked = block.delay("sync")
        naps = [nap.delay("async", 0.05) for _ in range(12)]
        # The only pool slot is taken, yet every async task runs, 4 at a time.
        for result in naps:
            result.get(timeout=10)
        assert running["sync"] == 1
        assert peak["async"] == 4
        release.set()
        blocked.get(timeout=10)


def test_solo_runs_async_tasks_one_at_a_time(app: Celery) -> None:
    nap = app.tasks["nap"]
    with start_worker(app, pool="solo"):
        for result in [nap.delay("async", 0.02) for _ in range(4)]:
            result.get(timeout=10)
    assert peak["async"] == 1


def test_a_queue_whose_slots_are_busy_does_not_hold_back_another(any_broker_app: Celery) -> None:
    """Each group of queues fetches on its own, concurrently, from the same broker connection."""
    app = any_broker_app
    nap = app.tasks["nap"]
    one, many = services.unique("one"), services.unique("many")
    with start_worker(app, queues=[one, many], queue_concurrency={one: 1, many: 3}):
        ones = [nap.apply_async(("one", 0.1), queue=one) for _ in range(4)]
        manys = [nap.apply_async(("many", 0.1), queue=many) for _ in range(6)]
        for result in ones + manys:
            result.get(timeout=10)
    assert peak == {"one": 1, "many": 3}
    # 6 tasks, 3 at a time: two rounds, done while "one" is still at its second or third task.
    last_many = max(t for label, t in finished if label == "many")
    ones_before = sum(1 for label, t in finished if label == "one" and t <= last_many)
    assert ones_before <= 3


def _forget_queue(kind: str, queue: str) -> None:
    """Delete a test's queue from RabbitMQ (Redis keys and SQLite files go with their prefix and
    directory)."""
    if kind != "amqp":
        return
    import kombu

    with kombu.Connection(services.amqp_url()) as connection:
        connection.default_channel.queue_delete(queue)


async def _waiting(app: Celery, queue: str) -> int:
    broker = app.create_broker()
    await broker.connect()
    try:
        return await broker.size(queue)
    finally:
        await broker.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "amqp"])
def test_a_worker_starting_on_a_backlog_of_sync_tasks_takes_what_celery_would(
    kind: str, tmp_path: Path
) -> None:
    """The app has an ``async def`` task too, so its async share (100 x 4) exists; a backlog of
    long sync tasks is still taken ``-c`` x multiplier at a time from the first fetch on, and the
    rest stays for other workers. Only on AMQP, whose ``basic.qos`` the first fetch fixes, does
    the first fetch ask for the bigger share."""
    app = embedded_app(kind, tmp_path)
    block = app.tasks["block"]
    queue = services.unique("backlog")
    try:
        results = [block.apply_async(("sync",), queue=queue) for _ in range(30)]
        with start_worker(app, queues=[queue], concurrency=2) as worker:
            [group] = worker.slots.groups
            assert group.bigger_first is (kind == "amqp")
            services.wait_until(lambda: running["sync"] == 2, what="both threads busy")
            time.sleep(0.2)  # time for any further fetch
            if kind != "amqp":  # (AMQP counts what it buffered as waiting)
                assert asyncio.run(_waiting(app, queue)) == 30 - 2 * 4
            release.set()
            for result in results:
                result.get(timeout=10)
    finally:
        release.set()
        app.close()
        _forget_queue(kind, queue)


@pytest.mark.parametrize(
    ("kind", "ahead"),
    [
        ("memory", True),
        ("memory", False),
        ("sqlite", True),
        ("redis", True),
        ("amqp", True),
        ("amqp", False),
    ],
)
def test_a_backlog_of_short_tasks_is_fetched_one_batch_ahead(
    kind: str, ahead: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No-op tasks: the messages held and not finished go past Celery's ``-c`` x multiplier (8)
    while the backlog lasts, and never past twice that; with ``worker_prefetch_ahead = False``,
    never past it."""
    held: list[int] = []
    fetched = QueueGroup.fetched

    def recording(group: QueueGroup, count: int, asked: int) -> None:
        fetched(group, count, asked)
        held.append(group.held - group.finishing)

    monkeypatch.setattr(QueueGroup, "fetched", recording)
    app = embedded_app(kind, tmp_path)
    app.conf.worker_prefetch_ahead = ahead
    noop = app.tasks["noop"]
    queue = services.unique("ahead")
    try:
        # (On AMQP the first fetch takes the async share, 408, which sets basic.qos: more, then.)
        count = 1_200 if kind == "amqp" else 400
        results = [noop.apply_async(queue=queue) for _ in range(count)]
        with start_worker(app, queues=[queue], concurrency=2) as worker:
            [group] = worker.slots.groups
            assert group.ahead is ahead
            for result in results:
                result.get(timeout=20)
        if kind == "amqp":
            held = held[1:]
        assert max(held) <= 16
        if group.ahead:
            assert max(held) > 8, held
        else:
            assert max(held) <= 8, held
    finally:
        app.close()
        _forget_queue(kind, queue)
