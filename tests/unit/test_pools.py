"""Pools and time limits: which limits apply, where each is refused, and the thread pool's enforcement.

The process pool runs in tests/e2e/test_prefork.py (it starts real processes); the limits as seen
through a whole worker are in tests/e2e/test_time_limits.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.app import calling
from celeriac.app.context import Context
from celeriac.exceptions import (
    ImproperlyConfigured,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    UnknownOptionError,
)
from celeriac.worker import timelimits
from celeriac.worker.execution import Job
from celeriac.worker.pools import (
    JobWithdrawn,
    PoolOptions,
    ThreadPool,
    check_pool,
    pool_options,
)
from celeriac.worker.prefork import describe_exit, locate_app
from celeriac.worker.timelimits import NO_LIMITS, TimeLimits
from celeriac.worker.worker import Worker

APPS = Path(__file__).parents[1] / "e2e" / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))

import limittasks  # noqa: E402 - found through APPS, put on sys.path just above


@pytest.fixture
def app() -> Iterator[Celery]:
    name = uuid.uuid4().hex
    app = Celery(
        "limits", broker=f"memory://{name}", backend=f"memory://{name}", set_as_current=False
    )
    yield app
    app.close()


# -- pool names and options ------------------------------------------------------------------------


def test_pool_names_and_aliases() -> None:
    assert check_pool("prefork") == "prefork"
    assert check_pool("processes") == "prefork"  # Celery's alias
    assert check_pool("threads") == "threads"
    assert check_pool("solo") == "solo"
    with pytest.raises(ImproperlyConfigured, match="pool 'gevent' is not available"):
        check_pool("gevent")
    with pytest.raises(ImproperlyConfigured, match="unknown pool 'forks'"):
        check_pool("forks")


def test_worker_options_win_over_settings(app: Celery) -> None:
    app.conf.update(
        task_time_limit=60,
        task_soft_time_limit=50,
        worker_max_tasks_per_child=100,
        worker_max_memory_per_child=200_000,
    )
    from_settings = pool_options(app, "prefork", 2)
    assert from_settings == PoolOptions(2, TimeLimits(60.0, 50.0), 100, 200_000)
    given = pool_options(
        app,
        "prefork",
        2,
        time_limit=5,
        soft_time_limit=4,
        max_tasks_per_child=3,
        max_memory_per_child=1000,
    )
    assert given == PoolOptions(2, TimeLimits(5.0, 4.0), 3, 1000)
    worker = Worker(app, pool="processes", concurrency=3, time_limit=7)
    assert worker.pool_name == "prefork"
    assert worker.pool_options.limits == TimeLimits(7.0, 50.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time_limit": 0}, "time_limit must be a positive number of seconds, not 0"),
        ({"time_limit": -1.5}, "time_limit must be a positive number"),
        ({"soft_time_limit": math.inf}, "soft_time_limit must be a positive number"),
        ({"time_limit": "10"}, "time_limit must be a positive number"),
        ({"time_limit": 2, "soft_time_limit": 3}, r"soft_time_limit \(3s\) must not be more"),
        ({"max_tasks_per_child": 0}, "max_tasks_per_child must be an integer >= 1"),
        ({"max_memory_per_child": True}, "max_memory_per_child must be an integer >= 1"),
    ],
)
def test_bad_worker_options_are_refused(app: Celery, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        Worker(app, pool="prefork", **options)


def test_per_child_options_belong_to_prefork(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ImproperlyConfigured, match="max_tasks_per_child applies to the prefork"):
        Worker(app, pool="threads", max_tasks_per_child=10)
    with pytest.raises(ImproperlyConfigured, match="max_memory_per_child applies to the prefork"):
        Worker(app, pool="solo", max_memory_per_child=10_000)
    app.conf.worker_max_tasks_per_child = 10  # a setting shared with prefork workers: a warning
    with caplog.at_level(logging.WARNING, logger="celeriac.worker"):
        Worker(app, pool="threads")
    assert "worker_max_tasks_per_child is set but means nothing to the threads pool" in caplog.text


def test_settings_refuse_bad_limits(app: Celery) -> None:
    for name in ("task_time_limit", "task_soft_time_limit"):
        for bad in (0, -1, "5", float("nan"), True):
            with pytest.raises(ImproperlyConfigured, match=f"{name} must be a positive number"):
                app.conf[name] = bad
    app.conf.task_time_limit = 30
    assert app.conf.task_time_limit == 30.0
    for name in ("worker_max_tasks_per_child", "worker_max_memory_per_child"):
        with pytest.raises(ImproperlyConfigured, match=f"{name} must be an integer >= 1"):
            app.conf[name] = 0


# -- which limits apply ---------------------------------------------------------------------------


def test_header_then_task_then_worker_then_settings(app: Celery) -> None:
    @app.task(time_limit=20, soft_time_limit=10)
    def limited() -> None: ...

    @app.task
    def plain() -> None: ...

    worker = TimeLimits(300.0, 200.0)
    # The header wins, limit by limit; 0 and null mean "not given" (Celery's `or`).
    assert timelimits.resolve((5, 4), limited, worker) == TimeLimits(5.0, 4.0)
    # Limit by limit: the task's soft 10 s is not below the header's hard 5 s, so it is dropped.
    assert timelimits.resolve((5, None), limited, worker) == TimeLimits(5.0, None)
    assert timelimits.resolve((0, None), limited, worker) == TimeLimits(20.0, 10.0)
    assert timelimits.resolve((None, None), plain, worker) == TimeLimits(300.0, 200.0)
    assert timelimits.resolve((None, 1), plain, NO_LIMITS) == TimeLimits(None, 1.0)
    assert timelimits.resolve((None, None), plain, NO_LIMITS) is NO_LIMITS
    # A soft limit that is not below the hard one never fires: it is dropped.
    assert timelimits.resolve((3, 3), plain, NO_LIMITS) == TimeLimits(3.0, None)
    # The settings reach the worker's defaults when the worker gives none.
    app.conf.update(task_time_limit=40, task_soft_time_limit=30)
    defaults = pool_options(app, "threads", 1).limits
    assert timelimits.resolve((None, None), plain, defaults) == TimeLimits(40.0, 30.0)
    assert timelimits.resolve((None, None), limited, defaults) == TimeLimits(20.0, 10.0)


def test_the_call_writes_the_timelimit_header(app: Celery) -> None:
    @app.task(time_limit=20, soft_time_limit=10)
    def limited() -> None: ...

    @app.task
    def plain() -> None: ...

    def header(task: Any, **options: Any) -> tuple[float | None, float | None]:
        built = calling.build(app.conf, task.name, (), {}, options, task)
        return built.message.timelimit

    assert header(plain) == (None, None)
    assert header(plain, time_limit=3, soft_time_limit=2.5) == (3.0, 2.5)
    assert header(limited) == (20.0, 10.0)  # the task's own, as Celery's client writes them
    assert header(limited, soft_time_limit=1) == (20.0, 1.0)
    assert header(limited, time_limit=None) == (None, 10.0)  # a given None replaces the task's
    app.conf.task_time_limit = 90
    assert header(plain) == (90.0, None)  # the client's setting, through the task (Celery's)
    # By name (send_task): only what the call gives.
    by_name = calling.build(app.conf, plain.name, (), {}, {"soft_time_limit": 4}, None)
    assert by_name.message.timelimit == (None, 4.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time_limit": 0}, "time_limit must be a positive number of seconds, not 0"),
        ({"time_limit": -5}, "time_limit must be a positive number"),
        ({"soft_time_limit": "1m"}, "soft_time_limit must be a positive number"),
        ({"soft_time_limit": float("inf")}, "soft_time_limit must be a positive number"),
        ({"time_limit": 1, "soft_time_limit": 2}, "must not be more than time_limit"),
        ({"time_limt": 1}, "unknown option 'time_limt'.*'time_limit'"),
    ],
)
def test_bad_call_limits_are_refused_before_sending(
    app: Celery, options: dict[str, Any], message: str
) -> None:
    @app.task
    def plain() -> None: ...

    with pytest.raises((ImproperlyConfigured, UnknownOptionError), match=message):
        plain.apply_async(**options)
    assert app.run_sync(_waiting(app)) == 0  # nothing was sent


async def _waiting(app: Celery) -> int:
    return await (await app.abroker()).size("celery")


def test_bad_task_limits_are_refused_at_the_decorator(app: Celery) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"time_limit of task .* positive number"):

        @app.task(time_limit=-1)
        def negative() -> None: ...

    with pytest.raises(ImproperlyConfigured, match=r"soft_time_limit of task .* positive number"):

        @app.task(soft_time_limit="soon")
        def text() -> None: ...

    with pytest.raises(ImproperlyConfigured, match=r"soft_time_limit \(9s\) must not be more"):

        @app.task(time_limit=5, soft_time_limit=9)
        def upside_down() -> None: ...


# -- helpers ----------------------------------------------------------------------------------------


def test_exit_descriptions_are_celerys() -> None:
    assert describe_exit(-9) == "signal 9 (SIGKILL)"
    assert describe_exit(-15) == "signal 15 (SIGTERM)"
    assert describe_exit(3) == "exitcode 3"
    assert describe_exit(None) == "exit status unknown"


def test_the_app_is_found_by_module_and_attribute() -> None:
    assert locate_app(limittasks.app) == "limittasks:app"
    stray = Celery("stray", broker="memory://", backend="memory://", set_as_current=False)
    with pytest.raises(ImproperlyConfigured, match="not a module-level variable"):
        locate_app(stray)


# -- the thread pool ------------------------------------------------------------------------------


def job(
    name: str,
    *args: Any,
    hard: float | None = None,
    soft: float | None = None,
    wanted: Callable[[], bool] | None = None,
    before_start: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> Job:
    task = limittasks.app.tasks[f"limittasks.{name}"]
    task_id = uuid.uuid4().hex
    context = Context(id=task_id, task=task.name, args=list(args))
    label = f"{task.name}[{task_id}]"
    return Job(task, context, list(args), {}, TimeLimits(hard, soft), label, wanted, before_start)


def run(pool: ThreadPool, *jobs: Job) -> list[Any]:
    async def main() -> list[Any]:
        return list(await asyncio.gather(*(pool.run(j) for j in jobs)))

    return asyncio.run(main())


def test_threads_queue_jobs_beyond_their_size_and_run_them_in_turn() -> None:
    pool = ThreadPool(PoolOptions(2))

    async def main() -> tuple[list[Any], float]:
        began = time.monotonic()
        outcomes = await asyncio.gather(*(pool.run(job("sleep", 0.1)) for _ in range(10)))
        return outcomes, time.monotonic() - began

    outcomes, took = asyncio.run(main())
    assert [outcome.state for outcome in outcomes] == [states.SUCCESS] * 10
    assert 0.5 <= took < 0.9  # two at a time: five rounds of 0.1 s
    assert len(pool._threads) == 2


def test_withdrawn_jobs_never_start_and_the_running_one_ends() -> None:
    pool = ThreadPool(PoolOptions(1))
    asked: list[int] = []

    def wanted(index: int) -> Callable[[], bool]:
        def ask() -> bool:
            asked.append(index)
            return True

        return ask

    async def main() -> None:
        running = asyncio.ensure_future(pool.run(job("sleep", 0.3)))
        queued = [asyncio.ensure_future(pool.run(job("pid", wanted=wanted(i)))) for i in range(3)]
        await asyncio.sleep(0.1)
        assert pool.withdraw_queued() == 3
        for withdrawn in queued:
            with pytest.raises(JobWithdrawn, match="withdrawn before it started"):
                await withdrawn
        assert (await running).state == states.SUCCESS
        assert pool.withdraw_queued() == 0
        # The thread serves new jobs after skipping the withdrawn ones.
        assert (await pool.run(job("pid", wanted=wanted(9)))).state == states.SUCCESS

    asyncio.run(main())
    assert asked == [9]


def test_a_job_no_longer_wanted_is_given_back_unstarted() -> None:
    pool = ThreadPool(PoolOptions(1))
    on_thread: list[bool] = []

    def unwanted() -> bool:
        on_thread.append(threading.current_thread() is not threading.main_thread())
        return False

    async def main() -> None:
        with pytest.raises(JobWithdrawn, match="no longer wanted"):
            await pool.run(job("spin", wanted=unwanted))
        assert (await pool.run(job("pid"))).state == states.SUCCESS

    asyncio.run(main())  # "spin" never returns: had it started, this would hang
    assert on_thread == [True]


def test_before_start_runs_on_the_loop_when_a_thread_takes_the_job() -> None:
    pool = ThreadPool(PoolOptions(1))
    events: list[tuple[str, float]] = []

    def before(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def run_before() -> None:
            assert threading.current_thread() is threading.main_thread()
            events.append((name, time.monotonic()))

        return run_before

    async def main() -> None:
        first = asyncio.ensure_future(pool.run(job("sleep", 0.2, before_start=before("first"))))
        second = asyncio.ensure_future(pool.run(job("sleep", 0.0, before_start=before("second"))))
        await asyncio.sleep(0.1)
        assert [name for name, _ in events] == ["first"]  # the second waits for the only thread
        await asyncio.gather(first, second)

    asyncio.run(main())
    [(_, first_began), (second, second_began)] = events
    assert second == "second"
    assert second_began - first_began >= 0.19  # not before the first body ended


def test_a_failed_before_start_fails_the_run_and_the_body_never_starts() -> None:
    pool = ThreadPool(PoolOptions(1))

    async def refuse() -> None:
        raise ConnectionError("the ack could not be sent")

    async def main() -> None:
        with pytest.raises(ConnectionError, match="the ack could not be sent"):
            await pool.run(job("spin", before_start=refuse))
        assert (await pool.run(job("pid"))).state == states.SUCCESS

    asyncio.run(main())  # "spin" never returns: had it started, this would hang


def test_threads_soft_limit_is_raised_in_the_body() -> None:
    pool = ThreadPool(PoolOptions(1))
    [caught] = run(pool, job("catch_soft", "value seen", soft=0.2))
    assert (caught.state, caught.value) == (states.SUCCESS, "value seen")
    [uncaught] = run(pool, job("spin", soft=0.2, hard=5))
    assert uncaught.state == states.FAILURE
    assert isinstance(uncaught.value, SoftTimeLimitExceeded)
    assert "while True" in uncaught.traceback  # raised in the body itself


def test_threads_hard_limit_answers_at_the_limit_and_stops_python_code() -> None:
    pool = ThreadPool(PoolOptions(1))

    async def main() -> tuple[Any, float, Any, float]:
        began = time.monotonic()
        spun = await pool.run(job("spin", hard=0.3))
        at_limit = time.monotonic() - began
        # TimeLimitExceeded raised in the thread ended the loop: the only thread serves again.
        following = await pool.run(job("pid"))
        return spun, at_limit, following, time.monotonic() - began

    spun, at_limit, following, total = asyncio.run(main())
    assert spun.state == states.FAILURE and isinstance(spun.value, TimeLimitExceeded)
    assert spun.value.args == (0.3,) and not spun.worker_lost
    assert 0.3 <= at_limit < 0.6
    assert following.state == states.SUCCESS
    assert total < at_limit + 0.5


def test_threads_hard_limit_on_a_blocking_call_keeps_the_thread_until_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = ThreadPool(PoolOptions(1))

    async def main() -> tuple[Any, float, float]:
        began = time.monotonic()
        slept = await pool.run(job("sleep", 0.8, hard=0.2))
        at_limit = time.monotonic() - began
        await pool.run(job("pid"))  # waits for the only thread
        return slept, at_limit, time.monotonic() - began

    with caplog.at_level(logging.WARNING, logger="celeriac.worker"):
        slept, at_limit, next_done = asyncio.run(main())
    assert isinstance(slept.value, TimeLimitExceeded)
    assert at_limit < 0.5
    assert next_done >= 0.8
    assert "Hard time limit (0.2s) exceeded for limittasks.sleep[" in caplog.text
    assert "A thread cannot be killed" in caplog.text
    assert "returned after its hard time limit; its pool thread is free again" in caplog.text


def test_threads_cancellation_stops_the_body() -> None:
    pool = ThreadPool(PoolOptions(1))
    limittasks.cancelled_in_thread.clear()

    async def main() -> None:
        running = asyncio.ensure_future(pool.run(job("spin_until_cancelled")))
        await asyncio.sleep(0.2)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # The body saw CancelledError and ended: the thread takes the next job.
        assert (await pool.run(job("pid"))).state == states.SUCCESS

    asyncio.run(main())
    assert limittasks.cancelled_in_thread.is_set()


def test_an_interrupt_reaches_only_its_body() -> None:
    interrupter = timelimits.ThreadInterrupter()
    assert not interrupter.interrupt(SoftTimeLimitExceeded)  # no body runs yet
    seen: list[str] = []

    def body() -> None:
        interrupter.enter()
        try:
            try:
                interrupter.interrupt(SoftTimeLimitExceeded)
                for _ in range(100_000):
                    pass
            except SoftTimeLimitExceeded:
                seen.append("raised in the body")
        finally:
            interrupter.leave()  # withdraws an interrupt not delivered yet
        assert not interrupter.interrupt(SoftTimeLimitExceeded)  # the body is over
        for _ in range(100_000):  # bytecode boundaries galore: nothing may be raised here
            pass
        seen.append("survived")

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(5)
    assert seen == ["raised in the body", "survived"]
