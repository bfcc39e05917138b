"""Wake a waiting ``fetch`` the moment a message becomes ready in the same process.

A worker and a client often share one process (tests, the in-process worker, a web app that also
consumes) but run on different event loops or threads. A publish from one of them must wake a fetch
waiting on another at once, instead of after the next poll. Transports keep one
:class:`WakeupRegistry` per process and key it by store (the memory store's name, the SQLite file's
path); waiters say which queues they wait on, so a publish to queue A does not wake fetches of B.

Wake-ups from other *processes* are not seen here: the SQLite transport polls for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Waiter:
    """One waiting fetch: an :class:`asyncio.Event` on the loop that runs it."""

    __slots__ = ("_event", "_loop", "queues")

    def __init__(self, queues: Iterable[str]) -> None:
        self.queues = frozenset(queues)
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def wake(self) -> None:
        """Set the event from any thread (the loop's own thread included)."""
        # A RuntimeError means the waiter's loop is closed: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._event.set)

    def clear(self) -> None:
        """Forget earlier wake-ups; call before checking the store again."""
        self._event.clear()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True if woken, False on timeout."""
        if self._event.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


class WakeupRegistry:
    """Process-global registry of waiters, keyed by store; safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Waiter]] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The parent's waiters live on its event loops, and its lock may have been held by a
        # thread that does not exist in the child.
        self._lock = threading.Lock()
        self._waiters = {}

    @contextmanager
    def waiting(self, key: str, queues: Iterable[str]) -> Iterator[Waiter]:
        """Register a waiter for ``queues`` of store ``key`` for the duration of the block.

        Register *before* checking the store: a publish that lands between the check and the wait
        then still sets the event, so no wake-up is lost.
        """
        waiter = Waiter(queues)
        with self._lock:
            self._waiters.setdefault(key, set()).add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiters[key]

    def notify(self, key: str, queues: Iterable[str]) -> None:
        """Wake every waiter of store ``key`` that waits on one of ``queues``."""
        touched = frozenset(queues)
        with self._lock:
            waiters = [w for w in self._waiters.get(key, ()) if not w.queues.isdisjoint(touched)]
        for waiter in waiters:
            waiter.wake()
