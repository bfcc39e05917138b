"""The process pool (``-P prefork``): real child processes, on its own and in real workers.

First the pool itself, started once for the module: where bodies run, what becomes of a child that
dies, of a job that is cancelled, of outcomes that do not pickle. Then whole workers: embedded on
the memory broker, and ``celeriac worker -P prefork`` processes on the embedded SQLite broker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import limittasks
import pytest

from celeriac import states
from celeriac.app.context import Context
from celeriac.backends.meta import exception_to_meta
from celeriac.contrib.testing import start_worker as embedded_worker
from celeriac.exceptions import (
    EncodeError,
    ImproperlyConfigured,
    NotRegistered,
    RemoteTaskError,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    WorkerLostError,
)
from celeriac.worker.execution import Job, Outcome
from celeriac.worker.pools import PoolOptions
from celeriac.worker.prefork import ProcessPool
from celeriac.worker.timelimits import TimeLimits

pytestmark = pytest.mark.e2e

T = TypeVar("T")


class LoopThread:
    """An event loop in a thread of its own, for a pool that outlives one test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class PoolUnderTest:
    def __init__(self, loop: LoopThread, pool: ProcessPool) -> None:
        self.loop = loop
        self.pool = pool

    def run(self, *jobs: Job) -> list[Outcome]:
        async def main() -> list[Outcome]:
            return list(await asyncio.gather(*(self.pool.run(j) for j in jobs)))

        return self.loop.run(main())

    def call(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self.loop.run(make())


@pytest.fixture(scope="module")
def pool() -> Iterator[PoolUnderTest]:
    loop = LoopThread()
    process_pool = ProcessPool(limittasks.app, "prefork-test@host", PoolOptions(2))
    loop.run(process_pool.start())
    try:
        yield PoolUnderTest(loop, process_pool)
    finally:
        loop.run(process_pool.stop(cold=False))
        loop.close()


def job(name: str, *args: Any, hard: float | None = None, soft: float | None = None) -> Job:
    task = limittasks.app.tasks[name if "." in name else f"limittasks.{name}"]
    task_id = uuid.uuid4().hex
    context = Context(id=task_id, task=task.name, args=list(args))
    return Job(task, context, list(args), {}, TimeLimits(hard, soft), f"{task.name}[{task_id}]")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# -- the pool --------------------------------------------------------------------------------------


def test_bodies_run_in_child_processes(pool: PoolUnderTest) -> None:
    outcomes = pool.run(*(job("pid") for _ in range(6)))
    pids = {o.value for o in outcomes}
    assert all(o.state == states.SUCCESS for o in outcomes)
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2  # two children, each reused


def test_a_child_that_dies_is_replaced_and_its_task_is_worker_lost(
    pool: PoolUnderTest, tmp_path: Path
) -> None:
    exited, killed = pool.run(job("exit_now", 3), job("kill_self"))
    assert exited.state == states.FAILURE and exited.worker_lost
    assert isinstance(exited.value, WorkerLostError)
    assert str(exited.value) == "Worker exited prematurely: exitcode 3"
    assert killed.worker_lost
    assert str(killed.value) == "Worker exited prematurely: signal 9 (SIGKILL)"
    # Both children died; their replacements serve at once.
    began = time.monotonic()
    assert [o.state for o in pool.run(job("pid"), job("pid"))] == [states.SUCCESS] * 2
    assert time.monotonic() - began < 1.0


def test_hard_limit_kills_and_the_next_job_is_served_at_once(pool: PoolUnderTest) -> None:
    async def main() -> tuple[list[Outcome], float, list[Outcome], float]:
        began = time.monotonic()
        # Both children are killed: the jobs after them need the replacements.
        spun = await asyncio.gather(*(pool.pool.run(job("spin", hard=0.5)) for _ in range(2)))
        at_limit = time.monotonic() - began
        following = await asyncio.gather(*(pool.pool.run(job("pid")) for _ in range(2)))
        return list(spun), at_limit, list(following), time.monotonic() - began - at_limit

    spun, at_limit, following, served_in = pool.call(main)
    for outcome in spun:
        assert outcome.state == states.FAILURE and not outcome.worker_lost
        assert isinstance(outcome.value, TimeLimitExceeded) and outcome.value.args == (0.5,)
    assert 0.5 <= at_limit < 0.9
    assert all(o.state == states.SUCCESS for o in following)
    assert served_in < 1.0


def test_soft_limit_is_raised_in_the_child(pool: PoolUnderTest) -> None:
    began = time.monotonic()
    caught, interrupted_sleep, uncaught = pool.run(
        job("catch_soft", {"seen": True}, soft=0.3),
        job("sleep_catch_soft", 20, soft=0.3),
        job("spin", soft=0.3, hard=10),
    )
    assert (caught.state, caught.value) == (states.SUCCESS, {"seen": True})
    # SIGUSR1 interrupts a sleep as well: no waiting for the C call to return.
    assert interrupted_sleep.value == "soft limit"
    assert uncaught.state == states.FAILURE
    assert isinstance(uncaught.value, SoftTimeLimitExceeded)
    assert "while True" in (uncaught.traceback or "")
    assert time.monotonic() - began < 2.0


def test_cancelling_a_job_kills_its_child(pool: PoolUnderTest, tmp_path: Path) -> None:
    marker = tmp_path / "pid"

    async def main() -> None:
        running = asyncio.ensure_future(pool.pool.run(job("write_pid_then_sleep", str(marker), 30)))
        while not marker.exists() or not marker.read_text():
            await asyncio.sleep(0.01)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    pool.call(main)
    child = int(marker.read_text())
    wait_until(lambda: not alive(child), timeout=3)
    assert all(o.state == states.SUCCESS for o in pool.run(job("pid"), job("pid")))


def test_outcomes_that_do_not_pickle_still_say_what_happened(pool: PoolUnderTest) -> None:
    error, lock = pool.run(job("raise_needs_two"), job("return_lock"))
    assert error.state == states.FAILURE
    stand_in = error.value
    assert isinstance(stand_in, RemoteTaskError)
    assert (stand_in.exc_type, stand_in.exc_module) == ("NeedsTwo", "limittasks")
    assert "7: seven" in str(stand_in)
    assert "raise NeedsTwo(7, " in (error.traceback or "")
    # Stored exactly as the original exception would have been.
    assert exception_to_meta(stand_in) == exception_to_meta(limittasks.NeedsTwo(7, "seven"))
    assert lock.state == states.FAILURE and isinstance(lock.value, EncodeError)
    assert "cannot be sent from its pool process" in str(lock.value)


def test_a_task_the_children_lack_fails_clearly(pool: PoolUnderTest) -> None:
    @limittasks.app.task(name=f"limittasks.late_{uuid.uuid4().hex}")
    def late() -> None: ...

    try:
        [outcome] = pool.run(job(late.name))
    finally:
        del limittasks.app.tasks[late.name]
    assert outcome.state == states.FAILURE and isinstance(outcome.value, NotRegistered)


def test_a_child_over_the_memory_limit_is_replaced_after_its_task(
    pool: PoolUnderTest, caplog: pytest.LogCaptureFixture
) -> None:
    [baseline] = pool.run(job("peak_kib"))  # a fresh child's peak, in KiB
    limit = baseline.value + 60 * 1024

    async def main() -> list[Outcome]:
        lean = ProcessPool(limittasks.app, "lean@host", PoolOptions(1, max_memory_per_child=limit))
        await lean.start()
        try:
            return [await lean.run(job("grow", mib)) for mib in (1, 1, 120, 1)]
        finally:
            await lean.stop(cold=False)

    small, again, big, after = (o.value for o in pool.call(main))
    assert small == again == big  # the child that grew finished its task ...
    assert after != big  # ... and was replaced after it
    assert f"Pool process {big} uses" in caplog.text
    assert f"more than the max memory per child ({limit} KiB): replacing it" in caplog.text


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        (
            "LIMITTASKS_FAIL_IMPORT",
            "(?s)cannot load the app limittasks:app:.*limittasks refuses to load in this process",
        ),
        ("LIMITTASKS_EXIT_IN_INIT", r"a prefork pool process exited while starting \(exitcode 5\)"),
    ],
)
def test_a_pool_whose_processes_cannot_start_does_not_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, message: str
) -> None:
    monkeypatch.setenv(variable, "1")  # inherited by the pool processes only

    async def main() -> None:
        broken = ProcessPool(limittasks.app, "broken@host", PoolOptions(1))
        with pytest.raises(ImproperlyConfigured, match=message):
            await broken.start()

    began = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - began < 10


# -- embedded workers, memory broker ----------------------------------------------------------------


@pytest.fixture
def on_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """limittasks on a memory broker of its own; LIMITTASKS_LOG (inherited by children) set."""
    log = tmp_path / "signals.log"
    monkeypatch.setenv("LIMITTASKS_LOG", str(log))
    name = uuid.uuid4().hex
    conf = limittasks.app.conf
    saved = (conf.broker_url, conf.result_backend)
    conf.update(broker_url=f"memory://{name}", result_backend=f"memory://{name}")
    try:
        yield log
    finally:
        limittasks.app.close()
        conf.update(broker_url=saved[0], result_backend=saved[1])


def test_embedded_prefork_worker(on_memory: Path) -> None:
    with embedded_worker(limittasks.app, pool="prefork", concurrency=2, max_tasks_per_child=2):
        results = [limittasks.pid.delay() for _ in range(8)]
        pids = [r.get(timeout=10) for r in results]
        assert os.getpid() not in pids
        # Each child is replaced after two tasks.
        assert max(pids.count(p) for p in pids) <= 2 and len(set(pids)) >= 4
        began = time.monotonic()
        with pytest.raises(TimeLimitExceeded):
            limittasks.spin.apply_async(time_limit=0.5).get(timeout=10)
        # The killed child's replacement (or the other child) serves the next task at once.
        assert limittasks.pid.delay().get(timeout=10) != os.getpid()
        assert time.monotonic() - began < 1.5
    lines = [line.split() for line in on_memory.read_text().splitlines()]
    inits = [int(pid) for kind, pid, *_ in lines if kind == "worker_process_init"]
    # Once per child, in the child; never in the worker process.
    assert os.getpid() not in inits and len(inits) == len(set(inits))
    assert set(pids) <= set(inits)
    prerun = {int(pid) for kind, pid, *_ in lines if kind == "task_prerun"}
    assert set(pids) <= prerun and os.getpid() not in prerun


# -- worker processes, SQLite broker --------------------------------------------------------------


@pytest.fixture
def client(workdir: Path) -> Iterator[Path]:
    yield workdir
    limittasks.app.close()


def test_prefork_worker_process(start_worker: Any, client: Path) -> None:
    log = client / "signals.log"
    worker = start_worker(
        "-P",
        "prefork",
        "-c",
        "1",
        "--max-tasks-per-child",
        "2",
        app="limittasks",
        env={"LIMITTASKS_LOG": str(log)},
    )
    pids = [limittasks.pid.delay().get(timeout=10) for _ in range(5)]
    # A new child after every second task: [a, a, b, b, c].
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
    assert worker.proc.pid not in pids
    lines = [line.split() for line in log.read_text().splitlines()]
    inits = [int(pid) for kind, pid, *_ in lines if kind == "worker_process_init"]
    assert set(pids) <= set(inits) and worker.proc.pid not in inits
    # The task signals are sent in the child that ran the task.
    postrun = [(int(line[1]), line[3]) for line in lines if line[0] == "task_postrun"]
    assert {pid for pid, _ in postrun} == set(pids)
    assert {state for _, state in postrun} == {states.SUCCESS}
    # A warm stop lets the children go.
    child = limittasks.pid.delay().get(timeout=10)
    assert worker.stop(signal.SIGTERM) == 0
    wait_until(lambda: not alive(child), timeout=5)
