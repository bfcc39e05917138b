"""Sync tasks queued in the threads pool (docs/worker.md, "Sync tasks queue in the threads pool"),
through a real embedded worker on memory, SQLite and Redis: what happens at a queued task's start
happens then and not when it is queued, and a warm shutdown gives queued tasks back uncounted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.contrib.testing import start_worker
from tests import services
from tests.services import wait_until

#: Bodies that ran, by the tag they were given.
ran: list[str] = []
release = threading.Event()


def make_app(kind: str, tmp_path: Path) -> Celery:
    app = services.app_on(kind, tmp_path, "queued")

    @app.task
    def doze(tag: str, seconds: float) -> str:
        ran.append(f"{tag} started")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not release.is_set():
            time.sleep(0.01)
        ran.append(tag)
        return tag

    @app.task
    def record(tag: str) -> str:
        ran.append(tag)
        return tag

    @app.task(track_started=True)
    def tracked(tag: str) -> str:
        ran.append(tag)
        return tag

    @app.task(acks_late=False)
    def acked_early(tag: str) -> str:
        ran.append(tag)
        return tag

    return app


@pytest.fixture(params=["memory", "sqlite", "redis"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Celery]:
    ran.clear()
    release.clear()
    app = make_app(request.param, tmp_path)
    yield app
    release.set()
    app.close()


def task(app: Celery, name: str) -> Any:
    return app.tasks[f"{__name__}.{name}"]


def test_a_queued_task_is_started_only_when_a_thread_takes_it(app: Celery) -> None:
    doze, tracked, acked_early = task(app, "doze"), task(app, "tracked"), task(app, "acked_early")
    with start_worker(app, concurrency=1) as worker:
        busy = doze.delay("busy", 0.6)
        wait_until(lambda: "busy started" in ran)
        queued = tracked.delay("tracked")
        early = acked_early.delay("early")
        # Both are fetched and handed to the pool, behind the running one.
        wait_until(lambda: len(worker._queued_in_pool) == 2)
        time.sleep(0.1)
        assert queued.state == states.PENDING  # STARTED is stored when it starts, not before
        assert ran == ["busy started"]
        assert busy.get(timeout=10) == "busy"
        assert queued.get(timeout=10) == "tracked"
        assert early.get(timeout=10) == "early"
    assert ran == ["busy started", "busy", "tracked", "early"]


def test_warm_shutdown_gives_queued_tasks_back_uncounted(app: Celery) -> None:
    doze, record = task(app, "doze"), task(app, "record")
    with start_worker(app, concurrency=1) as worker:
        busy = doze.delay("busy", 0.5)
        wait_until(lambda: "busy started" in ran)
        rest = [record.delay(f"later{i}") for i in range(3)]
        wait_until(lambda: len(worker._queued_in_pool) == 3)
    # The warm stop let the running task end and withdrew the queued ones unstarted.
    assert busy.get(timeout=10) == "busy"
    assert ran == ["busy started", "busy"]

    async def waiting() -> list[tuple[str, int]]:
        broker = await app.abroker()
        deliveries = await broker.fetch([app.conf.task_default_queue], 10, 2.0)
        await broker.ack(deliveries)
        return sorted((d.message.headers["id"], d.delivery_count) for d in deliveries)

    # Handed back as never delivered: the next delivery is each message's first.
    assert app.run_sync(waiting()) == sorted((r.id, 1) for r in rest)
