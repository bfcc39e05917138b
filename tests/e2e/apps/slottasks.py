"""Tasks of the concurrency tests: async and sync sleeps that report when they ran, and where.

Used by real worker processes (``celeriac -A slottasks worker``, SQLite from CELERIAC_BROKER_URL /
CELERIAC_RESULT_BACKEND). Each sleep returns its start and end (``time.time()``), so a test can
tell from the results alone how many ran at once.
"""

from __future__ import annotations

import asyncio
import threading
import time

from celeriac import Celery
from celeriac.signals import worker_ready

app = Celery("slottasks")


@worker_ready.connect
def _note_ready(sender: object = None, **_: object) -> None:
    """When the worker began consuming, in ``ready.time`` of its working directory: the start of
    the measured span, which thus includes the first fetches but not the process start-up.

    Only for a worker of this app: the test process imports this module, and the in-process
    workers of other tests send ``worker_ready`` there too."""
    if getattr(sender, "app", None) is not app:
        return
    with open("ready.time", "w", encoding="utf-8") as handle:
        handle.write(repr(time.time()))


@app.task
async def nap(seconds: float) -> tuple[float, float]:
    """I/O-bound: waits on the event loop, holding no thread."""
    started = time.time()
    await asyncio.sleep(seconds)
    return started, time.time()


@app.task
def doze(seconds: float) -> tuple[float, float]:
    """Blocking: holds a pool thread while it sleeps."""
    started = time.time()
    time.sleep(seconds)
    return started, time.time()


@app.task
def pool_threads() -> list[str]:
    """The names of the pool's threads that exist in this worker process now."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("celeriac-task-"))
