"""Run a real worker inside a test, as Celery's ``celery.contrib.testing.worker.start_worker``.

    from celeriac.contrib.testing import start_worker

    app = Celery("proj", broker="memory://", backend="memory://")

    def test_add():
        with start_worker(app):
            assert add.delay(2, 3).get(timeout=5) == 5

The worker is the production one — same decoding, acks, result writes — running on its own event
loop in a background thread, so tests exercise what runs in production (with ``memory://`` nothing
leaves the process; with ``sqlite:///`` the files are real). There is no "eager" shortcut that
skips serialization.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from celeriac.worker.worker import Worker

if TYPE_CHECKING:
    from celeriac.app.base import Celery


@contextmanager
def start_worker(
    app: Celery,
    *,
    queues: list[str] | None = None,
    concurrency: int = 1,
    pool: str = "threads",
    ready_timeout: float = 10.0,
    shutdown_timeout: float = 10.0,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
    async_concurrency: int | None = None,
    queue_concurrency: Mapping[str, int] | None = None,
) -> Iterator[Worker]:
    """Start a worker for ``app`` in a background thread; stop it (warm) on exit.

    Raises the worker's own error if it fails to start, and ``TimeoutError`` if it is not ready
    within ``ready_timeout`` seconds or not stopped within ``shutdown_timeout``.

    ``pool="prefork"`` runs sync tasks in child processes, which import the app by its module:
    define the app and its tasks at module level in an importable module (a test module is one).

    ``async_concurrency`` and ``queue_concurrency`` are the worker's ``--async-concurrency`` and
    ``-Q name:N`` (e.g. ``queues=["cpu", "io"], queue_concurrency={"io": 500}``).
    """
    worker = Worker(
        app,
        queues=queues,
        concurrency=concurrency,
        pool=pool,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        max_tasks_per_child=max_tasks_per_child,
        max_memory_per_child=max_memory_per_child,
        async_concurrency=async_concurrency,
        queue_concurrency=queue_concurrency,
    )
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(worker.run())
        except BaseException as exc:  # handed to the test thread below
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="celeriac-test-worker", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not worker.ready.wait(0.01):
        if not thread.is_alive():
            raise failure[0] if failure else RuntimeError("the worker stopped before it was ready")
        if time.monotonic() > deadline:
            loop.call_soon_threadsafe(worker.stop)
            raise TimeoutError(f"the worker was not ready within {ready_timeout}s")
    try:
        yield worker
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(worker.stop)
        thread.join(shutdown_timeout)
        if thread.is_alive():
            raise TimeoutError(f"the worker did not stop within {shutdown_timeout}s")
        if failure:
            raise failure[0]
