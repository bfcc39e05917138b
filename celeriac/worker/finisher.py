"""Pipelined completion: results stored, then messages acked, in batches.

Every finished task needs two writes — its result document, then the ack of its message — and
the ack must come after the result is stored. Done one task at a time that is two round trips
per task; here tasks that finish while a flush is under way wait for the next one, so under load
a whole batch costs one ``store_many`` and one ``ack``, and a lone task is flushed at once (no
timer, no added latency). The order result → ack holds for every task in a batch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from celeriac import states
from celeriac.backends.base import ReplyRoute, ResultBackend
from celeriac.backends.meta import build_meta
from celeriac.brokers.base import Broker, Delivery
from celeriac.exceptions import CeleriacError, EncodeError
from celeriac.worker.logs import logger


@dataclass(slots=True)
class _Item:
    meta: dict[str, Any] | None
    delivery: Delivery | None
    #: Where the task's caller waits for the result (rpc://); other stores ignore it.
    route: ReplyRoute | None
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Finisher:
    """Batches result writes and acks; ``await finish(...)`` returns once both are done."""

    def __init__(self, broker: Broker, backend: ResultBackend) -> None:
        self.broker = broker
        self.backend = backend
        self._pending: list[_Item] = []
        self._flushing = False

    async def finish(
        self,
        meta: dict[str, Any] | None,
        delivery: Delivery | None,
        route: ReplyRoute | None = None,
    ) -> None:
        """Store ``meta`` (if any), then ack ``delivery`` (if any). Raises if either failed."""
        item = _Item(meta, delivery, route)
        self._pending.append(item)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush_all())
        await item.done

    async def store(self, meta: dict[str, Any], route: ReplyRoute | None = None) -> None:
        """Store one document now, in the same pipeline."""
        await self.finish(meta, None, route)

    async def _flush_all(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._flush(batch)
        finally:
            self._flushing = False

    async def _flush(self, batch: list[_Item]) -> None:
        metas = [(item.meta, item.route) for item in batch if item.meta is not None]
        try:
            if metas:
                await self._store_all(metas)
            deliveries = [item.delivery for item in batch if item.delivery is not None]
            if deliveries:
                await self.broker.ack(deliveries)
        except Exception as exc:  # every waiter learns; their messages stay leased
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        for item in batch:
            if not item.done.done():
                item.done.set_result(None)

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
