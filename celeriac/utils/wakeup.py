"""Wake coroutines waiting for a change the moment another thread or event loop makes it.

A worker and a client often share one process (tests, the in-process worker, a web app that also
consumes) but run on different event loops or threads. A change made by one of them — a message
published, a result stored — must wake a coroutine waiting on another at once, instead of after
its next poll or its timeout. Stores keep one :class:`WakeupRegistry` per process and key it by
store (a memory store's name, an SQLite file's path); a waiter names the *channels* it waits on
(queues, task ids), so a change on one channel wakes only the waiters of that channel.

Changes made by other *processes* are not seen here: stores kept in a file (SQLite) learn of those
through :mod:`celeriac.utils.file_wakeups`, which turns them into :meth:`WakeupRegistry.notify`
calls in each waiting process, and poll as a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Waiter:
    """One waiting coroutine: an :class:`asyncio.Event` on the loop that runs it."""

    __slots__ = ("_event", "_loop")

    def __init__(self) -> None:
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
    """Process-global registry of waiters by store and channel; safe to use from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (store key, channel) -> waiters; a notify looks up only the channels it touched.
        self._waiters: dict[tuple[str, str], set[Waiter]] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The parent's waiters live on its event loops, and its lock may have been held by a
        # thread that does not exist in the child.
        self._lock = threading.Lock()
        self._waiters = {}

    @contextmanager
    def waiting(self, key: str, channels: Iterable[str]) -> Iterator[Waiter]:
        """Register a waiter for ``channels`` of store ``key`` for the duration of the block.

        Register *before* checking the store: a change that lands between the check and the wait
        then still sets the event, so no wake-up is lost.
        """
        waiter = Waiter()
        slots = [(key, channel) for channel in frozenset(channels)]
        with self._lock:
            for slot in slots:
                self._waiters.setdefault(slot, set()).add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                for slot in slots:
                    waiters = self._waiters.get(slot)
                    if waiters is not None:
                        waiters.discard(waiter)
                        if not waiters:
                            del self._waiters[slot]

    def notify_all(self, key: str) -> None:
        """Wake every waiter of store ``key`` (when which channels changed is not known)."""
        with self._lock:
            woken = {w for (k, _), waiters in self._waiters.items() if k == key for w in waiters}
        for waiter in woken:
            waiter.wake()

    def notify(self, key: str, channels: Iterable[str]) -> None:
        """Wake every waiter of store ``key`` that waits on one of ``channels``."""
        touched = frozenset(channels)
        woken: set[Waiter] = set()
        with self._lock:
            for channel in touched:
                woken.update(self._waiters.get((key, channel), ()))
        for waiter in woken:
            waiter.wake()
