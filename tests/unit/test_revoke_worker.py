"""Revoke in a real worker (embedded, on its own thread) on memory, SQLite and Redis: a revoked
task never runs, ``terminate=True`` stops a running one, and the worker carries on."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import TaskRevokedError
from celeriac.signals import task_received, task_revoked
from celeriac.worker.worker import Worker
from tests import services
from tests.services import wait_until

#: Bodies that ran, by the tag they were given.
ran: list[str] = []
#: Set at teardown: sync bodies still sleeping in a pool thread stop early.
release = threading.Event()


def make_app(kind: str, tmp_path: Path) -> Celery:
    app = services.app_on(kind, tmp_path, "revoking")

    @app.task
    def record(tag: str) -> str:
        ran.append(tag)
        return tag

    @app.task
    async def nap(tag: str, seconds: float) -> str:
        ran.append(f"{tag} started")
        await asyncio.sleep(seconds)
        ran.append(tag)
        return tag

    @app.task
    def doze(tag: str, seconds: float) -> str:
        ran.append(f"{tag} started")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not release.is_set():
            time.sleep(0.01)
        ran.append(tag)
        return tag

    return app


@pytest.fixture(params=["memory", "sqlite", "redis", "amqp"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Celery]:
    ran.clear()
    release.clear()
    app = make_app(request.param, tmp_path)
    yield app
    release.set()
    app.close()


@pytest.fixture
def revoked_signals() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append({"task": sender.name, "id": kwargs["request"].id, **kwargs})

    task_revoked.connect(receiver)
    yield seen
    task_revoked.disconnect(receiver)


def task(app: Celery, name: str) -> Any:
    return app.tasks[f"{__name__}.{name}"]


def test_a_task_revoked_before_any_worker_runs_never_runs(
    app: Celery, revoked_signals: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    record = task(app, "record")
    doomed = record.delay("doomed")
    doomed.revoke()
    later = record.apply_async(("later",), task_id="revoked-before-it-was-sent")
    app.control.revoke("revoked-before-it-was-sent")
    # The caller sees REVOKED at once, before any worker saw the message.
    assert doomed.state == states.REVOKED
    with caplog.at_level(logging.INFO, logger="celeriac.worker"), start_worker(app):
        assert record.delay("healthy").get(timeout=10) == "healthy"
        wait_until(lambda: len(revoked_signals) == 2)
        with pytest.raises(TaskRevokedError, match="revoked"):
            doomed.get(timeout=5)
        assert later.state == states.REVOKED
    assert ran == ["healthy"]
    assert {(s["id"], s["terminated"], s["signum"], s["expired"]) for s in revoked_signals} == {
        (doomed.id, False, None, False),
        (later.id, False, None, False),
    }
    assert f"Discarding revoked task: {__name__}.record[{doomed.id}]" in caplog.text
    # Dropped and acknowledged: nothing is left to deliver.
    assert app.run_sync(_size(app)) == 0


async def _size(app: Celery) -> int:
    broker = await app.abroker()
    return await broker.size(app.conf.task_default_queue)


def test_a_task_revoked_while_it_waits_for_a_slot_never_starts(
    app: Celery, revoked_signals: list[dict[str, Any]]
) -> None:
    # Both sync: async def tasks have slots of their own and would not wait behind it.
    doze, record = task(app, "doze"), task(app, "record")
    received: list[str] = []

    def on_received(sender: Any, request: Any, **kwargs: Any) -> None:
        received.append(request.id)

    task_received.connect(on_received)
    try:
        with start_worker(app, concurrency=1):
            busy = doze.delay("busy", 0.5)
            waiting = record.delay("waiting")
            # Both fetched: one runs, the other waits for the only slot.
            wait_until(lambda: waiting.id in received and "busy started" in ran)
            waiting.revoke()
            assert busy.get(timeout=10) == "busy"
            wait_until(lambda: len(revoked_signals) == 1)
            assert record.delay("after").get(timeout=10) == "after"
    finally:
        task_received.disconnect(on_received)
    assert "waiting" not in ran
    assert waiting.state == states.REVOKED
    assert revoked_signals[0]["id"] == waiting.id


def test_terminate_stops_a_running_async_task(
    app: Celery, revoked_signals: list[dict[str, Any]]
) -> None:
    nap, record = task(app, "nap"), task(app, "record")
    with start_worker(app, concurrency=1):
        long = nap.delay("long", 30)
        wait_until(lambda: "long started" in ran)
        started = time.monotonic()
        app.control.revoke(long.id, terminate=True, signal="KILL")
        wait_until(lambda: revoked_signals, timeout=5)
        assert time.monotonic() - started < 2
        with pytest.raises(TaskRevokedError):
            long.get(timeout=5)
        # The only slot is free again: the next task runs at once.
        assert record.delay("next").get(timeout=5) == "next"
    assert "long" not in ran
    assert long.state == states.REVOKED
    signal = revoked_signals[0]
    assert (signal["id"], signal["terminated"], signal["signum"]) == (long.id, True, 9)
    assert app.run_sync(_size(app)) == 0


def test_terminate_stops_a_running_sync_task_on_threads(
    app: Celery, revoked_signals: list[dict[str, Any]]
) -> None:
    """A thread cannot be killed: the pool raises in it, which stops Python code at once (a C call
    when it returns). The task ends REVOKED and its slot serves the next task."""
    doze, record = task(app, "doze"), task(app, "record")
    with start_worker(app, concurrency=1):
        long = doze.delay("long", 30)
        wait_until(lambda: "long started" in ran)
        long.revoke(terminate=True)
        wait_until(lambda: revoked_signals)
        assert long.state == states.REVOKED
        assert record.delay("next").get(timeout=5) == "next"
    assert "long" not in ran
    assert long.state == states.REVOKED
    assert (revoked_signals[0]["terminated"], revoked_signals[0]["signum"]) == (True, 15)


def test_without_terminate_a_running_task_runs_to_its_end(app: Celery) -> None:
    """As in Celery: revoke() marks it REVOKED at once, and the task stores its own result."""
    nap = task(app, "nap")
    with start_worker(app, concurrency=1):
        running = nap.delay("running", 0.3)
        wait_until(lambda: "running started" in ran)
        running.revoke()
        assert running.state == states.REVOKED
        wait_until(lambda: "running" in ran)
        running = app.AsyncResult(running.id)
        wait_until(lambda: running.state == states.SUCCESS)
        assert running.get(timeout=5) == "running"


def test_two_workers_share_revokes(app: Celery) -> None:
    record = task(app, "record")
    first, second = Worker(app, concurrency=1), Worker(app, concurrency=1)
    with _running(first), _running(second):
        app.control.revoke([f"shared-{i}" for i in range(4)])
        wait_until(lambda: first._revoked is not None and first._revoked.get("shared-3"))
        wait_until(lambda: second._revoked is not None and second._revoked.get("shared-3"))
        results = [
            record.apply_async((f"t{i}",), task_id=f"shared-{i}" if i < 4 else None)
            for i in range(12)
        ]
        for result in results[4:]:
            result.get(timeout=10)
        wait_until(lambda: all(r.state == states.REVOKED for r in results[:4]))
    assert sorted(ran) == sorted(f"t{i}" for i in range(4, 12))


class _running:
    """A worker on a thread of its own for the length of a ``with`` block."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop = asyncio.new_event_loop()

    def _run(self) -> None:
        self.loop.run_until_complete(self.worker.run())

    def __enter__(self) -> Worker:
        self.thread.start()
        assert self.worker.ready.wait(10)
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.worker.stop)
        self.thread.join(10)
        self.loop.close()


def test_the_worker_keeps_the_newest_revocations_and_forgets_expired_ones(
    app: Celery, revoked_signals: list[dict[str, Any]]
) -> None:
    record = task(app, "record")
    app.conf.update(worker_revokes_max=3, worker_revoke_expires=0.6)
    app.control.revoke([f"r{i}" for i in range(5)])  # only r2, r3 and r4 are kept
    with start_worker(app) as worker:
        assert worker._revoked is not None and len(worker._revoked) == 3
        # revoke() marked every id REVOKED; the one the cap dropped runs and stores SUCCESS.
        record.apply_async(("r0",), task_id="r0")
        wait_until(lambda: app.AsyncResult("r0").state == states.SUCCESS)
        record.apply_async(("r4",), task_id="r4")
        wait_until(lambda: [s["id"] for s in revoked_signals] == ["r4"])  # dropped
        time.sleep(0.6)  # past the revocations' lifetime
        record.apply_async(("r3",), task_id="r3")
        wait_until(lambda: app.AsyncResult("r3").state == states.SUCCESS)
    assert ran == ["r0", "r3"]


def test_a_following_worker_keeps_at_most_its_limit() -> None:
    from celeriac.brokers._revocations import MemoryRevocations, Revocation
    from celeriac.worker.revocations import RevokedTasks

    name = services.unique("follow")
    terminated: list[str] = []

    async def main() -> None:
        writer = MemoryRevocations(name)
        await writer.connect()
        known = RevokedTasks(
            MemoryRevocations(name),
            limit=2,
            lifetime=60,
            on_terminate=lambda r: terminated.append(r.task_id),
        )
        await known.start()
        try:
            expires = time.time() + 60
            await writer.revoke([Revocation(f"t{i}", expires) for i in range(3)], limit=100)
            await writer.revoke([Revocation("t3", expires, True, "SIGTERM")], limit=100)
            deadline = time.monotonic() + 5
            while known.get("t3") is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert len(known) == 2
            assert [known.get(f"t{i}") is not None for i in range(4)] == [False, False, True, True]
        finally:
            await known.stop()
            await writer.close()

    asyncio.run(main())
    assert terminated == ["t3"]
