"""The in-memory transport: ``memory://`` or ``memory://<name>``.

Every broker of one process that names the same store shares it, so a client and an in-process
worker on different event loops or threads see the same queues; a fetch waiting on one loop is
woken at once by a publish from another. Nothing survives the process.

It implements the whole contract of :mod:`celeriac.brokers.base` — leases and redelivery, delays,
priorities, routing, dead letters — with exactly the rules of the SQLite transport (the storage
is described in :mod:`celeriac.brokers._memory_store`), and it really serializes: headers and
properties go through JSON at publish, so a value Redis or RabbitMQ could not carry fails here
too. That makes it the reference implementation the conformance suite holds every transport to.

A deferred delivery (and one fetched by a cancelled ``fetch``) is handed back unused: it does not
count towards ``delivery_count``, which counts deliveries a worker may have acted on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

from celeriac.brokers import _common, _routing
from celeriac.brokers._memory_store import MemoryStore
from celeriac.brokers.base import (
    Broker,
    BrokerOptions,
    DeadLetter,
    Delivery,
    PublishRequest,
    QueueSpec,
)
from celeriac.brokers.ratelimit import RateLimiterStore, shared_in_process
from celeriac.exceptions import ConnectionError
from celeriac.utils.memory_url import parse_memory_url
from celeriac.utils.wakeup import WakeupRegistry

__all__ = ["MemoryBroker", "PublishRequest"]


class _Stores:
    """The process-global stores, by name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[str, MemoryStore] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    def named(self, name: str) -> MemoryStore:
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = self._stores[name] = MemoryStore()
            return store

    def _after_fork(self) -> None:
        # A forked child gets a copy of the stores; locks held by the parent's threads are reset.
        self._lock = threading.Lock()
        for store in self._stores.values():
            store.lock = threading.Lock()


_stores = _Stores()
_wakeups = WakeupRegistry()


class MemoryBroker(Broker):
    """A broker whose queues live in this process, shared by name."""

    keeps_dead_letters = True

    def __init__(self, url: str, options: BrokerOptions) -> None:
        super().__init__(url, options)
        _common.check_options(options)
        _common.check_no_transport_options("memory", options)
        self.name = parse_memory_url(url, "broker")
        self._store: MemoryStore | None = None

    def _connected(self) -> MemoryStore:
        if self._store is None:
            raise ConnectionError(f"memory broker {self.url!r} is not connected")
        return self._store

    async def connect(self) -> None:
        self._store = _stores.named(self.name)

    async def close(self) -> None:
        self._store = None

    async def declare(self, queue: QueueSpec) -> None:
        _routing.check_queue_spec(queue)
        self._connected().declare(queue)

    async def publish_many(self, items: Sequence[PublishRequest]) -> None:
        """Publish several messages at once: all are stored, or none (PublishError)."""
        store = self._connected()
        batch = [_common.prepare_publish(item) for item in items]
        touched = store.publish(batch, time.time())
        if touched:
            _wakeups.notify(self.name, touched)

    async def fetch(
        self, queues: Sequence[str], max_messages: int, timeout: float
    ) -> list[Delivery]:
        names = _common.check_fetch(queues, max_messages, timeout)
        store = self._connected()
        lease_for = self.options.visibility_timeout

        async def claim() -> _common.Claimed:
            now = time.time()
            token = _common.new_lease_token()
            return store.claim(names, max_messages, token, now, now + lease_for)

        # Nothing outside this process changes the store, so no polling: publishes, requeues and
        # defers wake the fetch, and delayed messages and lease expiries are waited for.
        return await _common.claim_or_wait(_wakeups, self.name, names, timeout, claim)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._connected().ack([_common.lease_of(d, "memory") for d in deliveries])

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        _common.check_reason(reason)
        store = self._connected()
        lease = _common.lease_of(delivery, "memory")
        now = time.time()
        if requeue:
            self._wake(store.hand_back([lease], now, now, counted=True))
        else:
            store.dead_letter(lease, reason, now)

    async def defer(self, delivery: Delivery, not_before: float) -> None:
        when = _common.check_defer_time(not_before)
        store = self._connected()
        lease = _common.lease_of(delivery, "memory")
        self._wake(store.hand_back([lease], when, time.time(), counted=False))

    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        store = self._connected()
        leases = [_common.lease_of(d, "memory") for d in deliveries]
        store.renew(leases, time.time() + self.options.visibility_timeout)

    def rate_limiter(self) -> RateLimiterStore:
        """Limits shared by every broker of this process with the same name."""
        return shared_in_process(self.name, f"the memory broker {self.url}")

    async def purge(self, queue: str) -> int:
        return self._connected().purge(_common.check_queue_name(queue), time.time())

    async def size(self, queue: str) -> int:
        return self._connected().size(_common.check_queue_name(queue), time.time())

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self._connected().dead_letters(_common.check_limit(limit))

    def _wake(self, touched: set[str]) -> None:
        if touched:
            _wakeups.notify(self.name, touched)
