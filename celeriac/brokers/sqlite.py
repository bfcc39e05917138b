"""The embedded SQLite transport: ``sqlite:///relative/path.sqlite3`` or ``sqlite:////abs/path``.

One database file is a whole broker that several processes share: clients publish into it, workers
lease from it. Unlike kombu's SQLAlchemy transport and huey's SQLite storage, nothing is lost when a
worker dies: a fetch *leases* messages (``lease_token``, ``visible_at``) in one atomic
``UPDATE … RETURNING``; an ack deletes the row; a lease that runs out makes the message
deliverable again, counted in ``delivery_count``; delayed messages wait in the file. The storage
layout is documented in :mod:`celeriac.brokers._sqlite_schema`, the SQL in
:mod:`celeriac.brokers._sqlite_store`.

Durability: WAL mode; a committed publish survives a crash of any process. With the default
``synchronous=NORMAL`` a power loss or OS crash may roll back the last commits; the transport
option ``synchronous="FULL"`` makes every commit durable on disk, at a cost in publish rate.

Threads and processes: ``sqlite3`` blocks, so each broker owns one connection used from one
dedicated thread, and its coroutines wait on that thread. The connection is made by
:meth:`SQLiteBroker.connect`; a broker inherited through ``fork()`` opens a fresh one in the child.
Idle fetches poll (from 1 ms, backing off to ``polling_interval``), and a publish in the same
process wakes them at once. Several processes never get the same message while its lease runs:
every write is a ``BEGIN IMMEDIATE`` transaction, serialised by SQLite's write lock.

Transport options: ``synchronous`` (``"NORMAL"`` or ``"FULL"``) and ``busy_timeout`` (seconds to
wait for another process's write lock, default 5).

As in the memory transport, a deferred delivery (and one fetched by a cancelled ``fetch``) is handed
back unused: it does not count towards ``delivery_count``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from celeriac.brokers import _common, _routing
from celeriac.brokers._common import PublishRequest
from celeriac.brokers._sqlite_store import Lease, SQLiteStore
from celeriac.brokers._wakeup import WakeupRegistry
from celeriac.brokers.base import (
    Broker,
    BrokerOptions,
    DeadLetter,
    Delivery,
    QueueSpec,
    TransportMessage,
)
from celeriac.exceptions import (
    CeleriacError,
    ConnectionError,
    ImproperlyConfigured,
    PublishError,
)

__all__ = ["PublishRequest", "SQLiteBroker"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_SCHEME = "sqlite:///"
_URL_FORMS = "sqlite:///relative/path.sqlite3 or sqlite:////absolute/path.sqlite3"
_SYNCHRONOUS = ("NORMAL", "FULL")
_KNOWN_OPTIONS = ("busy_timeout", "synchronous")
#: First pause of an idle fetch; doubled up to ``polling_interval``.
_FIRST_POLL = 0.001

#: Fetches waiting in this process, keyed by database path: a publish wakes them at once.
_wakeups = WakeupRegistry()
#: Stores inherited through fork(): SQLite must not use, or even close, a parent's connection in
#: the child, so they are only kept from being garbage-collected.
_inherited: list[SQLiteStore] = []


def parse_sqlite_url(url: str) -> str:
    """The absolute database path of a ``sqlite:///`` URL (relative to the working directory)."""
    if not isinstance(url, str) or not url.startswith(_SCHEME):
        raise ImproperlyConfigured(f"expected a broker URL of the form {_URL_FORMS}, got {url!r}")
    path = url[len(_SCHEME) :]
    if "?" in path or "#" in path:
        raise ImproperlyConfigured(
            f"the SQLite transport takes no URL options ({url!r}); expected {_URL_FORMS}, "
            "and set options in broker_transport_options"
        )
    if not path or path.endswith("/"):
        raise ImproperlyConfigured(f"no database file in {url!r}; expected {_URL_FORMS}")
    if ":memory:" in path:
        raise ImproperlyConfigured(
            f"{url!r}: an in-memory SQLite database is private to one connection and cannot be "
            "shared by clients and workers; use memory:// for an in-process broker"
        )
    return os.path.realpath(path)


def parse_transport_options(options: Mapping[str, Any]) -> tuple[str, float]:
    """``(synchronous, busy_timeout)`` from ``broker_transport_options``."""
    unknown = sorted(set(options) - set(_KNOWN_OPTIONS))
    if unknown:
        raise ImproperlyConfigured(
            f"unknown SQLite transport option(s) {unknown}; the known ones are "
            f"{list(_KNOWN_OPTIONS)}"
        )
    synchronous = options.get("synchronous", "NORMAL")
    if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
        raise ImproperlyConfigured(
            f"SQLite transport option synchronous must be one of {list(_SYNCHRONOUS)}, "
            f"got {synchronous!r}"
        )
    busy_timeout = options.get("busy_timeout", 5.0)
    if (
        not isinstance(busy_timeout, int | float)
        or isinstance(busy_timeout, bool)
        or not math.isfinite(busy_timeout)
        or busy_timeout <= 0
    ):
        raise ImproperlyConfigured(
            f"SQLite transport option busy_timeout must be a positive number of seconds, "
            f"got {busy_timeout!r}"
        )
    return synchronous.upper(), float(busy_timeout)


class SQLiteBroker(Broker):
    """A broker in one SQLite database file, shared by the processes that open it."""

    keeps_dead_letters = True

    def __init__(self, url: str, options: BrokerOptions) -> None:
        super().__init__(url, options)
        _common.check_options(options)
        self.path = parse_sqlite_url(url)
        self._synchronous, self._busy_timeout = parse_transport_options(options.transport_options)
        self._connected = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        #: Touched only on the executor thread (created there by the first operation).
        self._store: SQLiteStore | None = None
        self._pid = os.getpid()
        self._declared: set[QueueSpec] = set()

    # -- the dedicated thread -----------------------------------------------------------------

    def _submit(
        self, op: Callable[[SQLiteStore], _T], error: type[CeleriacError] = ConnectionError
    ) -> concurrent.futures.Future[_T]:
        if not self._connected:
            raise ConnectionError(f"SQLite broker {self.path} is not connected")
        executor = self._executor
        if executor is None or self._pid != os.getpid():
            executor = self._start_thread()
        return executor.submit(self._on_thread, op, error)

    async def _run(
        self, op: Callable[[SQLiteStore], _T], error: type[CeleriacError] = ConnectionError
    ) -> _T:
        return await asyncio.wrap_future(self._submit(op, error))

    def _start_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pid != os.getpid():
            # Inherited through fork(): the parent's thread does not exist in this process, and
            # its executor and connection must not be touched here (their locks may be held).
            if self._store is not None:
                _inherited.append(self._store)
            self._store = None
            self._pid = os.getpid()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="celeriac-sqlite-broker"
        )
        return self._executor

    def _on_thread(self, op: Callable[[SQLiteStore], _T], error: type[CeleriacError]) -> _T:
        try:
            if self._store is None:
                self._store = SQLiteStore.open(
                    self.path, synchronous=self._synchronous, busy_timeout=self._busy_timeout
                )
            return op(self._store)
        except sqlite3.Error as exc:
            raise self._translate(exc, error) from exc

    def _translate(self, exc: sqlite3.Error, error: type[CeleriacError]) -> CeleriacError:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return error(
                f"SQLite broker {self.path}: the database stayed locked for longer than "
                f"busy_timeout={self._busy_timeout:g}s (is a process holding a long write "
                f"transaction?): {exc}"
            )
        return error(f"SQLite broker {self.path}: {type(exc).__name__}: {exc}")

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connected and self._pid == os.getpid():
            return
        self._connected = True
        try:
            await self._run(lambda store: None)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if not self._connected:
            return
        own = self._pid == os.getpid()
        executor, self._executor = self._executor, None
        self._connected = False
        if executor is None or not own:
            return
        try:
            await asyncio.wrap_future(executor.submit(self._close_on_thread))
        finally:
            executor.shutdown(wait=False)

    def _close_on_thread(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except sqlite3.Error as exc:
                raise self._translate(exc, ConnectionError) from exc

    # -- the contract -------------------------------------------------------------------------

    async def declare(self, queue: QueueSpec) -> None:
        _routing.check_queue_spec(queue)
        if queue in self._declared:
            return
        await self._run(lambda store: store.declare(queue))
        self._declared.add(queue)

    async def publish(
        self,
        message: TransportMessage,
        *,
        exchange: str,
        routing_key: str,
        not_before: float | None = None,
    ) -> None:
        await self.publish_many([PublishRequest(message, exchange, routing_key, not_before)])

    async def publish_many(self, items: Sequence[PublishRequest]) -> None:
        """Publish several messages in one transaction: all are stored, or none (PublishError)."""
        batch = [_common.prepare_publish(item) for item in items]
        if not batch:
            return
        touched = await self._run(lambda store: store.publish(batch), PublishError)
        _wakeups.notify(self.path, touched)

    async def fetch(
        self, queues: Sequence[str], max_messages: int, timeout: float
    ) -> list[Delivery]:
        names = _common.check_fetch(queues, max_messages, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = _FIRST_POLL
        with _wakeups.waiting(self.path, names) as waiter:
            while True:
                waiter.clear()
                deliveries, next_due = await self._claim(names, max_messages)
                if deliveries:
                    return deliveries
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                wait = min(pause, remaining)
                if next_due is not None:
                    wait = min(wait, max(next_due - time.time(), 0.0))
                if await waiter.wait(wait):
                    pause = _FIRST_POLL
                else:
                    pause = min(pause * 2, self.options.polling_interval)

    async def _claim(
        self, names: tuple[str, ...], limit: int
    ) -> tuple[list[Delivery], float | None]:
        token = _common.new_lease_token()
        lease_for = self.options.visibility_timeout
        future = self._submit(lambda store: store.claim(names, limit, token, lease_for))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The claim may still commit on the thread: give what it leased back at once instead
            # of leaving it invisible until the lease runs out.
            future.add_done_callback(self._release_unclaimed)
            raise

    def _release_unclaimed(
        self, future: concurrent.futures.Future[tuple[list[Delivery], float | None]]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        leases = [_lease(d) for d in future.result()[0]]
        if not leases or self._executor is None:
            return
        path = self.path

        def release(store: SQLiteStore) -> None:
            _wakeups.notify(path, store.hand_back(leases, None, counted=False))

        # A RuntimeError means the executor is shut down already: the leases simply run out.
        with contextlib.suppress(RuntimeError):
            self._executor.submit(self._on_thread, release, ConnectionError).add_done_callback(
                _log_failure
            )

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        leases = [_lease(d) for d in deliveries]
        if leases:
            await self._run(lambda store: store.ack(leases))

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        _common.check_reason(reason)
        lease = _lease(delivery)
        if requeue:
            touched = await self._run(lambda store: store.hand_back([lease], None, counted=True))
            _wakeups.notify(self.path, touched)
        else:
            await self._run(lambda store: store.dead_letter(lease, reason))

    async def defer(self, delivery: Delivery, not_before: float) -> None:
        when = _common.check_defer_time(not_before)
        lease = _lease(delivery)
        touched = await self._run(lambda store: store.hand_back([lease], when, counted=False))
        _wakeups.notify(self.path, touched)

    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        leases = [_lease(d) for d in deliveries]
        lease_for = self.options.visibility_timeout
        if leases:
            await self._run(lambda store: store.renew(leases, lease_for))

    async def purge(self, queue: str) -> int:
        name = _common.check_queue_name(queue)
        return await self._run(lambda store: store.purge(name))

    async def size(self, queue: str) -> int:
        name = _common.check_queue_name(queue)
        return await self._run(lambda store: store.size(name))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        count = _common.check_limit(limit)
        return await self._run(lambda store: store.dead_letters(count))


def _lease(delivery: Delivery) -> Lease:
    return _common.lease_of(delivery, "SQLite")


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        logger.warning("could not release the leases of a cancelled fetch: %s", exc)
