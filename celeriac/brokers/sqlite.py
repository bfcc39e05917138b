"""The embedded SQLite transport: ``sqlite:///relative/path.sqlite3`` or ``sqlite:////abs/path``.

One database file is a whole broker that several processes share: clients publish into it, workers
lease from it. Unlike kombu's SQLAlchemy transport and huey's SQLite storage, nothing is lost when a
worker dies: a fetch *leases* messages (``lease_token``, ``visible_at``) in one atomic
``UPDATE … RETURNING``; an ack deletes the row; a lease that runs out makes the message
deliverable again, counted in ``delivery_count``; delayed messages wait in the file. The storage
layout is documented in :mod:`celeriac.brokers._sqlite_schema`, the SQL in
:mod:`celeriac.brokers._sqlite_store`. Revoked task ids are kept in the same file, in a table of
their own (:mod:`celeriac.brokers._revocations_sqlite`).

Durability: WAL mode; a committed publish survives a crash of any process. With the default
``synchronous=NORMAL`` a power loss or OS crash may roll back the last commits; the transport
option ``synchronous="FULL"`` makes every commit durable on disk, at a cost in publish rate.

Threads and processes: ``sqlite3`` blocks, so each broker owns one connection used from one
dedicated thread, and its coroutines wait on that thread (a
:class:`~celeriac.utils.sqlite.ConnectionThread`, as in the SQLite result store). The connection is
made by :meth:`SQLiteBroker.connect`; a broker inherited through ``fork()`` opens a fresh one in
the child.
A publish, requeue or defer wakes idle fetches at once: those of its own process directly, those of
other processes through a Unix datagram socket each fetching process binds in ``<file>.wake/`` (see
:mod:`celeriac.utils.file_wakeups` for the layout and what happens when that is not possible). Idle
fetches also poll, from 1 ms backing off to ``polling_interval``, which finds what a lost wake-up
would have announced. Several processes never get the same message while its lease runs: every
write is a ``BEGIN IMMEDIATE`` transaction, serialised by SQLite's write lock.

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
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from celeriac.brokers import _common, _routing
from celeriac.brokers._ratelimit_sqlite import SQLiteRateLimiter
from celeriac.brokers._sqlite_schema import BROKER_FILE
from celeriac.brokers._sqlite_store import Lease, SQLiteStore
from celeriac.brokers.base import (
    Broker,
    BrokerOptions,
    DeadLetter,
    Delivery,
    PublishRequest,
    QueueSpec,
)
from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.exceptions import CeleriacError, ConnectionError, PublishError
from celeriac.utils import sqlite
from celeriac.utils.file_wakeups import FileWakeups
from celeriac.utils.wakeup import WakeupRegistry

__all__ = ["PublishRequest", "SQLiteBroker"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: First pause of an idle fetch; doubled up to ``polling_interval``.
_FIRST_POLL = 0.001

#: Fetches waiting in this process, keyed by database path: a publish wakes them at once.
_wakeups = WakeupRegistry()


def parse_sqlite_url(url: str) -> str:
    """The absolute database path of a ``sqlite:///`` URL (relative to the working directory).

    Symbolic links are resolved: in-process wake-ups are keyed by the path, so two brokers that
    name one file through different links must agree on it.
    """
    return os.path.realpath(sqlite.parse_url(url, BROKER_FILE))


def parse_transport_options(options: Mapping[str, Any]) -> tuple[str, float]:
    """``(synchronous, busy_timeout)`` from ``broker_transport_options``."""
    settings = sqlite.parse_options(options, BROKER_FILE)
    return settings.synchronous, settings.busy_timeout


class SQLiteBroker(Broker):
    """A broker in one SQLite database file, shared by the processes that open it."""

    keeps_dead_letters = True

    def __init__(self, url: str, options: BrokerOptions) -> None:
        super().__init__(url, options)
        _common.check_options(options)
        self.path = parse_sqlite_url(url)
        settings = sqlite.parse_options(options.transport_options, BROKER_FILE)
        self._db = sqlite.ConnectionThread(self.path, BROKER_FILE, settings, SQLiteStore)
        self._declared: set[QueueSpec] = set()
        #: Wakes fetches of this and other processes after each change to a queue.
        self._wake = FileWakeups(self.path, _wakeups, self.path, "SQLite broker")

    async def _run(
        self, op: Callable[[SQLiteStore], _T], error: type[CeleriacError] = ConnectionError
    ) -> _T:
        """``op(store)`` on the broker's connection thread; a driver error is raised as ``error``."""
        return await self._db.run(op, error)

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        self._wake.close()
        await self._db.close()

    # -- the contract -------------------------------------------------------------------------

    async def declare(self, queue: QueueSpec) -> None:
        _routing.check_queue_spec(queue)
        if queue in self._declared:
            return
        await self._run(lambda store: store.declare(queue))
        self._declared.add(queue)

    async def publish_many(self, items: Sequence[PublishRequest]) -> None:
        """Publish several messages in one transaction: all are stored, or none (PublishError)."""
        batch = [_common.prepare_publish(item) for item in items]
        if not batch:
            return
        changed = self._wake.changed
        # Announced on the connection's thread right after the commit, off the event loop.
        await self._run(lambda store: changed(store.publish(batch)), PublishError)

    async def fetch(
        self, queues: Sequence[str], max_messages: int, timeout: float
    ) -> list[Delivery]:
        names = _common.check_fetch(queues, max_messages, timeout)
        if timeout > 0:
            # Bound before the first claim, so a publish the claim misses is announced to it.
            self._wake.listen()
        return await _common.claim_or_wait(
            _wakeups,
            self.path,
            names,
            timeout,
            lambda: self._claim(names, max_messages),
            poll=(_FIRST_POLL, self.options.polling_interval),
        )

    async def _claim(self, names: tuple[str, ...], limit: int) -> _common.Claimed:
        token = _common.new_lease_token()
        lease_for = self.options.visibility_timeout
        future = self._db.submit(lambda store: store.claim(names, limit, token, lease_for))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The claim may still commit on the thread: give what it leased back at once instead
            # of leaving it invisible until the lease runs out.
            future.add_done_callback(self._release_unclaimed)
            raise

    def _release_unclaimed(self, future: concurrent.futures.Future[_common.Claimed]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        leases = [_lease(d) for d in future.result()[0]]
        if not leases:
            return
        changed = self._wake.changed

        def release(store: SQLiteStore) -> None:
            changed(store.hand_back(leases, None, counted=False))

        # Closed already (ConnectionError, or RuntimeError from a thread shutting down): the leases
        # simply run out.
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._db.submit(release).add_done_callback(_log_failure)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        leases = [_lease(d) for d in deliveries]
        if leases:
            await self._run(lambda store: store.ack(leases))

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        _common.check_reason(reason)
        lease = _lease(delivery)
        if requeue:
            changed = self._wake.changed
            await self._run(lambda store: changed(store.hand_back([lease], None, counted=True)))
        else:
            await self._run(lambda store: store.dead_letter(lease, reason))

    async def defer(self, delivery: Delivery, not_before: float) -> None:
        when = _common.check_defer_time(not_before)
        lease = _lease(delivery)
        changed = self._wake.changed
        await self._run(lambda store: changed(store.hand_back([lease], when, counted=False)))

    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        leases = [_lease(d) for d in deliveries]
        lease_for = self.options.visibility_timeout
        if leases:
            await self._run(lambda store: store.renew(leases, lease_for))

    def rate_limiter(self) -> RateLimiterStore:
        """Limits kept in a table of this file (see :mod:`celeriac.brokers._ratelimit_sqlite`)."""
        return SQLiteRateLimiter(
            lambda op: self._run(lambda store: op(store.conn)), f"the SQLite broker {self.path}"
        )

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
