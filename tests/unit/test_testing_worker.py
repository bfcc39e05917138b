"""celeriac.contrib.testing.start_worker: the production worker, embedded in a test."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import NotRegistered


def make_app(broker: str, backend: str) -> Celery:
    app = Celery("embedded", broker=broker, backend=backend, set_as_current=False)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def aadd(x: int, y: int) -> int:
        await asyncio.sleep(0.001)
        return x + y

    @app.task(bind=True, max_retries=2, default_retry_delay=0.01)
    def always_retry(self: Any) -> None:
        raise self.retry()

    @app.task
    def oops() -> None:
        raise KeyError("missing")

    return app


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_embedded_worker_runs_tasks(kind: str, tmp_path: Path) -> None:
    if kind == "memory":
        name = uuid.uuid4()
        app = make_app(f"memory://{name}", f"memory://{name}")
    else:
        app = make_app(
            f"sqlite:///{tmp_path}/broker.sqlite3", f"sqlite:///{tmp_path}/results.sqlite3"
        )
    add, aadd, oops = (app.tasks[f"{__name__}.{n}"] for n in ("add", "aadd", "oops"))
    with start_worker(app, concurrency=4) as worker:
        assert worker.ready.is_set()
        results = [add.delay(i, i) for i in range(50)] + [aadd.delay(i, 1) for i in range(50)]
        assert [r.get(timeout=10) for r in results] == [i + i for i in range(50)] + [
            i + 1 for i in range(50)
        ]
        failed = oops.delay()
        with pytest.raises(KeyError, match="missing"):
            failed.get(timeout=10)
        assert failed.state == states.FAILURE
        with pytest.raises(NotRegistered):
            app.send_task("nope.never").get(timeout=10)
        gave_up = app.tasks[f"{__name__}.always_retry"].delay()
        with pytest.raises(Exception, match="Can't retry"):
            gave_up.get(timeout=10)
    assert worker.processed >= 103
    app.close()


def test_a_worker_that_cannot_start_raises_in_the_test() -> None:
    app = Celery("broken", broker="nope://", backend="memory://", set_as_current=False)
    with pytest.raises(Exception, match="No broker transport for nope://"), start_worker(app):
        pass


def test_warm_shutdown_gives_back_messages_whose_handler_never_started() -> None:
    """A fetch that returns as the stop arrives leaves handlers cancelled before their first
    step; their messages must still go back to the broker at once, not wait for the lease."""
    from celeriac.brokers.base import BrokerOptions, TransportMessage
    from celeriac.brokers.memory import MemoryBroker
    from celeriac.worker import Worker

    url = f"memory://{uuid.uuid4()}"
    app = make_app(url, url)

    async def scenario() -> int:
        broker = MemoryBroker(url, BrokerOptions(visibility_timeout=60))
        await broker.connect()
        await broker.publish(
            TransportMessage(b"[[1, 2], {}, null]", "application/json", "utf-8"),
            exchange="",
            routing_key="celery",
        )
        worker = Worker(app)
        worker.broker = broker
        for delivery in await broker.fetch(["celery"], 1, 1.0):
            worker._held[delivery.delivery_tag] = delivery
            handler = asyncio.create_task(worker._handle(delivery))
            worker._waiting[delivery.delivery_tag] = handler
        assert await broker.size("celery") == 0  # leased
        await worker._shutdown()  # cancels the handler before it ever ran
        return await broker.size("celery")

    assert asyncio.run(scenario()) == 1
