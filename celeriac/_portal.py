"""Run coroutines for synchronous callers on one background event loop per process.

celeriac implements every transport once, as asyncio code. Synchronous callers (``delay()``,
``get()``) hand their coroutine to a daemon thread that runs an event loop for the whole process:
one cross-thread hop per call, no event loop created per call, and connections kept open between
calls. After ``fork()`` the child gets a fresh loop and thread (the parent's are not usable there).

The hop costs two thread wake-ups and GIL hand-offs per call, more than a round trip to a local
Redis. So the calls that matter most — publishing, and reading or waiting for a result — skip it
where the transport offers blocking methods (Redis: see ``Celery._publish_sync`` and
``Celery._wait_result_sync``); the loop is started only for what still needs it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    """A background event loop thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        """Whether the loop runs in this process (it is started by the first call)."""
        return self._loop is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The portal's loop, started on first use."""
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name="celeriac-portal", daemon=True)
                thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal loop and return its result (or raise its exception)."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("a synchronous celeriac call cannot be made from the portal loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def _reset_after_fork(self) -> None:
        self._loop = None
        self._lock = threading.Lock()


portal = Portal()
os.register_at_fork(after_in_child=portal._reset_after_fork)
