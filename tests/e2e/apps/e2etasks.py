"""Tasks run by the end-to-end tests in real worker processes.

The broker and result store come from CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND (SQLite files
in the test's temporary directory); E2E_ACCEPT and E2E_VISIBILITY tune the worker per test.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from celeriac import Celery

app = Celery("e2etasks")
app.conf.update(
    accept_content=os.environ.get("E2E_ACCEPT", "json").split(","),
    broker_transport_options={"visibility_timeout": float(os.environ.get("E2E_VISIBILITY", "30"))},
)


def _record(name: str, value: object) -> None:
    """Append a line to a file in the working directory: proves a task really ran, and how often."""
    with open(name, "a", encoding="utf-8") as handle:
        handle.write(f"{value}\n")


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="test_celery.add_together")
def add_together(x: int, y: int) -> int:
    return x + y


@app.task
async def async_add(x: int, y: int) -> int:
    await asyncio.sleep(0.01)
    return x + y


@app.task
async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.task
def sleep_then_add(seconds: float, x: int, y: int) -> int:
    time.sleep(seconds)
    return x + y


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


@app.task
def fail_custom() -> None:
    class LocalError(Exception):
        pass

    raise LocalError("only the worker knows this class")


@app.task(bind=True)
def describe(self: Any) -> dict[str, Any]:
    r = self.request
    return {
        "id": r.id,
        "task": r.task,
        "args": r.args,
        "kwargs": r.kwargs,
        "retries": r.retries,
        "hostname": r.hostname,
        "root_id": r.root_id,
        "parent_id": r.parent_id,
        "delivery_info": r.delivery_info,
    }


@app.task(bind=True, max_retries=5, default_retry_delay=0.05)
def flaky(self: Any, succeed_after: int) -> int:
    _record("flaky.log", f"{self.request.id} {self.request.retries}")
    if self.request.retries < succeed_after:
        raise self.retry(countdown=0.05)
    return self.request.retries


@app.task
def record(tag: str) -> str:
    _record("record.log", tag)
    return tag


@app.task
def slow_record(tag: str, seconds: float) -> str:
    _record("started.log", tag)
    time.sleep(seconds)
    _record("record.log", tag)
    return tag


@app.task(bind=True)
def spawn_child(self: Any, x: int) -> str:
    return describe.delay().id


@app.task
def wait_inside(x: int) -> int:
    return int(add.delay(x, x).get(timeout=5))


@app.task
def echo(value: Any) -> Any:
    return value
