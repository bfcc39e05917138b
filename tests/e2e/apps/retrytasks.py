"""Tasks of the retry end-to-end tests, run by real worker processes on the embedded SQLite broker.

The broker and result store come from CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND (SQLite files in
the test's temporary directory, which is also the worker's working directory). Each run appends a
line to a file there, so a test can see how often, and when, a task really ran; signal receivers
do the same, proving they are called in a real worker process.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celeriac import Celery
from celeriac.signals import task_failure, task_retry, worker_ready

app = Celery("retrytasks")


def _record(name: str, *values: object) -> None:
    with open(name, "a", encoding="utf-8") as handle:
        handle.write(" ".join(str(v) for v in values) + "\n")


def _ours(sender: Any) -> bool:
    """Signals are process-wide: record only this app's (the test process imports it too)."""
    return getattr(sender, "app", None) is app


@worker_ready.connect
def _on_ready(sender: Any = None, **kwargs: Any) -> None:
    if _ours(sender):
        _record("signals.log", "worker_ready")


@task_retry.connect
def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **kwargs: Any) -> None:
    if _ours(sender):
        _record("signals.log", "task_retry", sender.name, request.id, request.retries, reason.when)


@task_failure.connect
def _on_failure(
    sender: Any = None, task_id: str = "", exception: Any = None, **kwargs: Any
) -> None:
    if _ours(sender):
        _record("signals.log", "task_failure", sender.name, task_id, type(exception).__name__)


@app.task(bind=True, max_retries=5)
def flaky(self: Any, succeed_after: int) -> int:
    _record("runs.log", "flaky", self.request.id, self.request.retries)
    if self.request.retries < succeed_after:
        raise self.retry(countdown=0.05)
    return int(self.request.retries)


@app.task(bind=True, max_retries=2)
def doomed(self: Any) -> None:
    _record("runs.log", "doomed", self.request.id, self.request.retries)
    raise self.retry(exc=ValueError("boom"), countdown=0.05)


@app.task(bind=True, default_retry_delay=1.5)
def waits(self: Any) -> int:
    _record("runs.log", "waits", self.request.id, self.request.retries, time.time())
    if self.request.retries == 0:
        raise self.retry()
    return int(self.request.retries)


@app.task(
    bind=True,
    autoretry_for=(ConnectionError,),
    retry_backoff=True,
    retry_backoff_max=1,
    max_retries=2,
)
def call_api(self: Any) -> None:
    """Backoff with full jitter, capped at 1 s: each delay is 0 or 1 second."""
    _record("runs.log", "call_api", self.request.id, self.request.retries, time.time())
    raise ConnectionError("api down")


@app.task(bind=True, autoretry_for=(TimeoutError,), retry_kwargs={"countdown": 0.05})
async def afetch(self: Any, url: str) -> str:
    await asyncio.sleep(0.01)
    _record("runs.log", "afetch", self.request.id, self.request.retries)
    if self.request.retries < 2:
        raise TimeoutError(url)
    return f"fetched {url}"
