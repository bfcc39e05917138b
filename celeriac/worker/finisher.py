"""Pipelined completion: results stored, then messages acked, in batches.

Every finished task needs two writes — its result document, then the ack of its message — and
the ack must come after the result is stored. Done one task at a time that is two round trips
per task; here tasks that finish while a flush is under way wait for the next one, so under load
a whole batch costs one ``store_many`` and one ``ack``, and a lone task is flushed at once (no
timer, no added latency). The order result → ack holds for every task in a batch.

A batch is one list of documents, one list of deliveries, and how its end is told: the callbacks
of tasks handed over with :meth:`Finisher.hand_over` (the worker's handlers, which end at once and
leave the rest to the batch: no await, no task step per message), and one future for callers
that await :meth:`Finisher.finish` (shielded, so a cancelled waiter leaves the others alone).
:meth:`Finisher.idle` waits until every batch handed over so far has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from celeriac import states
from celeriac.backends.base import ReplyRoute, ResultBackend
from celeriac.backends.meta import build_meta
from celeriac.brokers.base import Broker, Delivery
from celeriac.exceptions import CeleriacError, EncodeError
from celeriac.worker.logs import logger

#: Told how a batch ended: None once its results are stored and its messages acked, else the
#: error that stopped it (the messages stay with the broker and are delivered again).
Ended = Callable[[BaseException | None], None]


class _Batch:
    """What was handed over while the previous flush was under way, and who to tell its end."""

    __slots__ = ("callbacks", "deliveries", "done", "metas")

    def __init__(self) -> None:
        self.metas: list[tuple[dict[str, Any], ReplyRoute | None]] = []
        self.deliveries: list[Delivery] = []
        self.callbacks: list[Ended] = []
        #: Made for the first caller that awaits the batch (most batches have none).
        self.done: asyncio.Future[None] | None = None

    def ended(self, error: BaseException | None) -> None:
        for callback in self.callbacks:
            try:
                callback(error)
            except Exception:  # a callback's bug must not keep the others from being told
                logger.exception("Internal error after finishing a batch")
        done = self.done
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)


class Finisher:
    """Batches result writes and acks; ``await finish(...)`` returns once both are done."""

    def __init__(self, broker: Broker, backend: ResultBackend) -> None:
        self.broker = broker
        self.backend = backend
        self._next: _Batch | None = None
        #: The task flushing batches, while there are any.
        self._flushing: asyncio.Task[None] | None = None

    def _batch(
        self, meta: dict[str, Any] | None, delivery: Delivery | None, route: ReplyRoute | None
    ) -> _Batch:
        """The batch ``meta`` and ``delivery`` join (the next flush's)."""
        batch = self._next
        if batch is None:
            batch = self._next = _Batch()
        if meta is not None:
            batch.metas.append((meta, route))
        if delivery is not None:
            batch.deliveries.append(delivery)
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush_all())
        return batch

    def hand_over(
        self,
        meta: dict[str, Any] | None,
        delivery: Delivery | None,
        route: ReplyRoute | None,
        ended: Ended,
    ) -> None:
        """Store ``meta`` (if any), then ack ``delivery`` (if any); ``ended`` is called with how
        it went, on the loop, once the batch is done. Returns at once."""
        self._batch(meta, delivery, route).callbacks.append(ended)

    async def finish(
        self,
        meta: dict[str, Any] | None,
        delivery: Delivery | None,
        route: ReplyRoute | None = None,
    ) -> None:
        """Store ``meta`` (if any), then ack ``delivery`` (if any). Raises if either failed."""
        batch = self._batch(meta, delivery, route)
        if batch.done is None:
            batch.done = asyncio.get_running_loop().create_future()
        # Shielded: a waiter cancelled (cold shutdown) must not cancel its batch for the others.
        await asyncio.shield(batch.done)

    @property
    def busy(self) -> bool:
        """Whether batches are being finished."""
        return self._flushing is not None

    async def idle(self) -> None:
        """Wait until every batch handed over so far has ended (stored and acked, or failed)."""
        while self._flushing is not None:
            await asyncio.shield(self._flushing)

    async def store(self, meta: dict[str, Any], route: ReplyRoute | None = None) -> None:
        """Store one document now, in the same pipeline."""
        await self.finish(meta, None, route)

    async def _flush_all(self) -> None:
        try:
            while self._next is not None:
                batch, self._next = self._next, None
                await self._flush(batch)
        finally:
            self._flushing = None

    async def _flush(self, batch: _Batch) -> None:
        try:
            if batch.metas:
                await self._store_all(batch.metas)
            if batch.deliveries:
                await self.broker.ack(batch.deliveries)
        except asyncio.CancelledError:
            batch.ended(asyncio.CancelledError())
            raise
        except Exception as exc:  # everyone learns; their messages stay leased
            batch.ended(exc)
        else:
            batch.ended(None)

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
