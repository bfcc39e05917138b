"""Pipelined completion: results stored, then messages acked, in batches.

Every finished task needs two writes — its result document, then the ack of its message — and
the ack must come after the result is stored. Done one task at a time that is two round trips
per task; here tasks that finish while a flush is under way wait for the next one, so under load
a whole batch costs one ``store_many`` and one ``ack``, and a lone task is flushed at once (no
timer, no added latency). The order result → ack holds for every task in a batch.

A batch is one list of documents, one list of deliveries and one future every waiter of the
batch awaits (shielded, so a cancelled waiter leaves the others alone): handing a task over costs
two appends, not an object and a future of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

from celeriac import states
from celeriac.backends.base import ReplyRoute, ResultBackend
from celeriac.backends.meta import build_meta
from celeriac.brokers.base import Broker, Delivery
from celeriac.exceptions import CeleriacError, EncodeError
from celeriac.worker.logs import logger


class _Batch:
    """What was handed over while the previous flush was under way, and its waiters' future."""

    __slots__ = ("deliveries", "done", "metas")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.metas: list[tuple[dict[str, Any], ReplyRoute | None]] = []
        self.deliveries: list[Delivery] = []
        self.done = done


class Finisher:
    """Batches result writes and acks; ``await finish(...)`` returns once both are done."""

    def __init__(self, broker: Broker, backend: ResultBackend) -> None:
        self.broker = broker
        self.backend = backend
        self._next: _Batch | None = None
        self._flushing = False

    async def finish(
        self,
        meta: dict[str, Any] | None,
        delivery: Delivery | None,
        route: ReplyRoute | None = None,
    ) -> None:
        """Store ``meta`` (if any), then ack ``delivery`` (if any). Raises if either failed."""
        batch = self._next
        if batch is None:
            batch = self._next = _Batch(asyncio.get_running_loop().create_future())
        if meta is not None:
            batch.metas.append((meta, route))
        if delivery is not None:
            batch.deliveries.append(delivery)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_all())
        # Shielded: a waiter cancelled (cold shutdown) must not cancel its batch for the others.
        await asyncio.shield(batch.done)

    async def store(self, meta: dict[str, Any], route: ReplyRoute | None = None) -> None:
        """Store one document now, in the same pipeline."""
        await self.finish(meta, None, route)

    async def _flush_all(self) -> None:
        try:
            while self._next is not None:
                batch, self._next = self._next, None
                await self._flush(batch)
        finally:
            self._flushing = False

    async def _flush(self, batch: _Batch) -> None:
        try:
            if batch.metas:
                await self._store_all(batch.metas)
            if batch.deliveries:
                await self.broker.ack(batch.deliveries)
        except Exception as exc:  # every waiter learns; their messages stay leased
            batch.done.set_exception(exc)
        else:
            batch.done.set_result(None)

    async def _store_all(self, metas: list[tuple[dict[str, Any], ReplyRoute | None]]) -> None:
        try:
            await self.backend.store_many_routed(metas)
        except CeleriacError:
            if len(metas) == 1:
                await self._store_one(*metas[0])
                return
            for meta, route in metas:  # find the one that cannot be stored; store the rest
                await self._store_one(meta, route)

    async def _store_one(self, meta: dict[str, Any], route: ReplyRoute | None) -> None:
        try:
            await self.backend.store_routed(meta, route)
        except EncodeError as exc:
            if meta["status"] != states.SUCCESS:
                raise
            # The return value itself cannot be stored (not serializable): store why instead,
            # so the caller sees an error rather than waiting forever. Any other error (the store
            # is unreachable) is raised: the message stays leased and the task runs again, rather
            # than a success being recorded as a failure.
            logger.error("Cannot store the result of %s: %s", meta["task_id"], exc)
            await self.backend.store_routed(build_meta(meta["task_id"], states.FAILURE, exc), route)
