"""Where sync task bodies run. ``async def`` tasks always run on the worker's event loop.

* ``threads`` (default): a thread pool of ``concurrency`` threads, created as needed.
* ``solo``: one thread, one task at a time (the event loop itself stays free, so leases are still
  renewed while a long task runs).

The process pool (``prefork``) arrives with time limits; asking for it now is a clear error.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celeriac.exceptions import ImproperlyConfigured

POOLS = ("threads", "solo")
_NOT_YET = {"prefork", "processes", "eventlet", "gevent"}


def check_pool(name: str) -> str:
    """The canonical pool name, or a clear error."""
    if name in POOLS:
        return name
    if name in _NOT_YET:
        raise ImproperlyConfigured(
            f"pool {name!r} is not available in this version; use 'threads' (default) or 'solo'. "
            "async def tasks always run on the event loop."
        )
    raise ImproperlyConfigured(f"unknown pool {name!r}; choose one of {', '.join(POOLS)}")


class ThreadPool:
    """Runs sync callables on threads, carrying the caller's context variables along."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="celeriac-task")

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on a pool thread within a copy of the current context."""
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, ctx.run, fn)

    def shutdown(self, wait: bool) -> None:
        """Stop the threads (waiting for running bodies when ``wait``)."""
        self._executor.shutdown(wait=wait, cancel_futures=True)
