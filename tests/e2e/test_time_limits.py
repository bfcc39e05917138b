"""Time limits through whole workers: every source of a limit, on every kind of body.

A ``celeriac worker -P prefork`` process on the embedded SQLite broker kills CPU-bound bodies at
their hard limit and raises SoftTimeLimitExceeded in them at their soft one; a worker embedded on
the memory broker does the same for bodies on threads and for ``async def`` bodies on its loop.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import limittasks
import pytest

from celeriac import states
from celeriac.contrib.testing import start_worker as embedded_worker
from celeriac.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(workdir: Path) -> Iterator[Path]:
    yield workdir
    limittasks.app.close()


def test_prefork_worker_enforces_every_source_of_a_limit(start_worker: Any, client: Path) -> None:
    # One child only: whatever follows a killed task is served by its replacement.
    worker = start_worker("-P", "prefork", "-c", "1", "--time-limit", "1", app="limittasks")

    # Per call (the message's timelimit header): a CPU-bound loop is killed at 0.5 s ...
    sent = time.monotonic()
    spun = limittasks.spin.apply_async(time_limit=0.5)
    with pytest.raises(TimeLimitExceeded) as raised:
        spun.get(timeout=10)
    assert raised.value.args == (0.5,)
    assert spun.state == states.FAILURE
    # ... and the next task's result arrives within a second of the limit.
    assert limittasks.pid.delay().get(timeout=10) != worker.proc.pid
    assert time.monotonic() - sent < 0.5 + 1.0
    worker.wait_for(f"Hard time limit (0.5s) exceeded for limittasks.spin[{spun.id}]")

    # Per task (@app.task(time_limit=0.5)), and the worker's --time-limit for the others.
    with pytest.raises(TimeLimitExceeded) as raised:
        limittasks.spin_task_limit.delay().get(timeout=10)
    assert raised.value.args == (0.5,)
    with pytest.raises(TimeLimitExceeded) as raised:
        limittasks.spin.delay().get(timeout=10)
    assert raised.value.args == (1.0,)

    # Soft limits, per call and per task: the body catches SoftTimeLimitExceeded and returns.
    caught = limittasks.catch_soft.apply_async(("caught it",), soft_time_limit=0.3)
    assert caught.get(timeout=10) == "caught it"
    assert limittasks.catch_soft_task_limit.delay().get(timeout=10) == "task soft limit"
    worker.wait_for(f"Soft time limit (0.3s) exceeded for limittasks.catch_soft[{caught.id}]")
    assert "not enforced" not in worker.log()


@pytest.fixture
def on_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
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


def test_threads_and_async_bodies_within_their_limits(
    on_memory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with embedded_worker(limittasks.app, pool="threads", concurrency=4):
        began = time.monotonic()
        results = {
            "thread hard": limittasks.spin.apply_async(time_limit=0.3),
            "thread soft": limittasks.catch_soft.apply_async(("thread",), soft_time_limit=0.3),
            "async hard": limittasks.async_sleep.apply_async((30,), time_limit=0.3),
            "async soft": limittasks.async_catch_soft.apply_async(("async",), soft_time_limit=0.3),
        }
        outcomes = {what: r.get(timeout=10, propagate=False) for what, r in results.items()}
        assert time.monotonic() - began < 2.0
        assert isinstance(outcomes["thread hard"], TimeLimitExceeded)
        assert outcomes["thread soft"] == "thread"
        assert isinstance(outcomes["async hard"], TimeLimitExceeded)
        assert outcomes["async soft"] == "async"

        # Waiting on a TaskGroup at the soft limit: the group's tasks are cancelled (asyncio
        # needs the CancelledError for that), and the outcome is still SoftTimeLimitExceeded.
        grouped = limittasks.async_group_under_soft_limit.apply_async(soft_time_limit=0.3)
        with pytest.raises(SoftTimeLimitExceeded):
            grouped.get(timeout=10)
        assert on_memory.read_text().count("group_child_cancelled") == 2

        # A body that swallows its cancellation: the caller still gets TimeLimitExceeded.
        stubborn = limittasks.async_ignores_cancel.apply_async(time_limit=0.3)
        with pytest.raises(TimeLimitExceeded):
            stubborn.get(timeout=10)
        time.sleep(0.4)  # its last 0.2 s on the loop, left alone, before the loop closes
    assert f"limittasks.async_ignores_cancel[{stubborn.id}] is still running" in caplog.text
