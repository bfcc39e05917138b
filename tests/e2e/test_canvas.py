"""group and chain end to end: a worker process on the embedded SQLite broker, and the production
worker embedded on the memory transport."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import e2etasks
import pytest

from celeriac import Celery, chain, group
from celeriac.brokers.base import BrokerOptions
from celeriac.brokers.sqlite import SQLiteBroker
from celeriac.contrib.testing import start_worker as embedded_worker
from celeriac.exceptions import EncodeError

pytestmark = pytest.mark.e2e


def waiting(workdir: Path, queue: str = "celery") -> int:
    async def size() -> int:
        broker = SQLiteBroker(f"sqlite:///{workdir}/broker.sqlite3", BrokerOptions())
        await broker.connect()
        try:
            return await broker.size(queue)
        finally:
            await broker.close()

    return asyncio.run(size())


def test_group_chain_and_bad_arguments_on_sqlite(start_worker: Any, workdir: Path) -> None:
    add = e2etasks.add
    with pytest.raises(EncodeError):
        group([add.s(i, i) for i in range(99)] + [add.s(1, {1, 2})]).apply_async()
    assert waiting(workdir) == 0  # nothing of the group was published

    start_worker("-c", "4")
    result = group(add.s(i, i) for i in range(100)).apply_async()
    assert result.get(timeout=20) == [i + i for i in range(100)]
    assert (add.s(1, 2) | add.s(3) | add.s(4)).apply_async().get(timeout=10) == 10
    # A failed step fails the rest: the chain's result raises the step's error.
    with pytest.raises(ValueError, match="stop"):
        chain(add.s(1, 2), e2etasks.fail.si("stop"), add.s(4)).delay().get(timeout=10)


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    name = uuid.uuid4().hex
    app = Celery("e2ecanvas", broker=f"memory://{name}", backend=f"memory://{name}")

    @app.task(name="e2ecanvas.add")
    def add(x: int, y: int) -> int:
        return x + y

    yield app
    app.close()


def test_group_chain_and_bad_arguments_on_memory(memory_app: Celery) -> None:
    add = memory_app.tasks["e2ecanvas.add"]
    with pytest.raises(EncodeError):
        group([add.s(i, i) for i in range(99)] + [add.s(1, object())]).apply_async()

    async def size() -> int:
        broker = await memory_app.abroker()
        return await broker.size("celery")

    assert memory_app.run_sync(size()) == 0
    with embedded_worker(memory_app, concurrency=4):
        result = group(add.s(i, i) for i in range(100)).apply_async()
        assert result.get(timeout=10) == [i + i for i in range(100)]
        assert (add.s(1, 2) | add.s(3) | add.s(4)).apply_async().get(timeout=10) == 10
