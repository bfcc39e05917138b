"""The data structure behind the memory transport: leased, delayed, prioritised queues in a dict.

Layout (one :class:`MemoryStore` per ``memory://<name>``, guarded by its lock):

* ``queues[name].messages`` — every message of the queue that is not acked, by id. A message is
  in one of two lanes, exactly as in the SQLite transport:

  - *ready* (``ready=True``): deliverable now, in the ``ready`` heap ordered by
    ``(-priority, id)``;
  - *waiting* (``ready=False``): delayed until ``visible_at`` or leased until ``visible_at``, in
    the ``waiting`` heap ordered by ``visible_at``. Each fetch first moves due entries to the ready
    lane: that is how delayed messages become ready and expired leases are redelivered, with no
    reaper.

  Heap entries carry the message's ``generation`` at push time; any change of lane bumps it, so an
  entry whose generation or message is gone is stale and skipped (lazy deletion). Heaps are rebuilt
  when stale entries outnumber live messages.
* ``lease_token`` — set on delivery, cleared when the message is handed back; ack, renew, reject
  and defer only act when the delivery's token still matches. An expired lease keeps its token
  until the message is delivered again, so a slow worker can still ack it until then.
* ``exchanges`` / ``bindings`` — declared named exchanges and their ``(binding key, queue)`` pairs.
* ``holder`` — message id to its queue, to find a lease without a scan.
* ``dead`` — what :meth:`MemoryStore.dead_letter` removed, oldest first, with reason and time.

Headers and properties are kept as JSON text, so every delivery gets fresh dicts and a message
carries only what a networked transport could carry.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from celeriac.brokers import _routing
from celeriac.brokers._common import Outgoing, decode_message, delivery_tag
from celeriac.brokers.base import DeadLetter, Delivery, QueueSpec
from celeriac.exceptions import ImproperlyConfigured, RoutingError

#: Message ids are unique in the process, so a delivery of one store never matches another's.
_ids = itertools.count(1)


@dataclass(slots=True, eq=False)
class _Message:
    id: int
    queue: str
    exchange: str
    routing_key: str
    priority: int
    body: bytes
    content_type: str
    content_encoding: str
    headers: str
    properties: str
    visible_at: float
    ready: bool = False
    lease_token: str | None = None
    #: Deliveries so far; the next delivery is number ``delivery_count + 1``.
    delivery_count: int = 0
    generation: int = 0


class _Queue:
    __slots__ = ("max_priority", "messages", "ready", "waiting")

    def __init__(self) -> None:
        self.messages: dict[int, _Message] = {}
        self.ready: list[tuple[int, int, int]] = []  # (-priority, id, generation)
        self.waiting: list[tuple[float, int, int]] = []  # (visible_at, id, generation)
        self.max_priority: int | None = None

    def make_ready(self, msg: _Message) -> None:
        msg.ready = True
        msg.generation += 1
        heapq.heappush(self.ready, (-msg.priority, msg.id, msg.generation))

    def make_waiting(self, msg: _Message, until: float) -> None:
        msg.ready = False
        msg.visible_at = until
        msg.generation += 1
        heapq.heappush(self.waiting, (until, msg.id, msg.generation))

    def place(self, msg: _Message, visible_at: float, now: float) -> None:
        """Put a message in the lane its visibility time says."""
        if visible_at <= now:
            msg.visible_at = visible_at
            self.make_ready(msg)
        else:
            self.make_waiting(msg, visible_at)

    def _live(self, message_id: int, generation: int) -> _Message | None:
        msg = self.messages.get(message_id)
        return msg if msg is not None and msg.generation == generation else None

    def promote(self, now: float) -> None:
        """Move due delayed messages and expired leases to the ready lane."""
        while self.waiting and self.waiting[0][0] <= now:
            _, message_id, generation = heapq.heappop(self.waiting)
            msg = self._live(message_id, generation)
            if msg is not None:
                self.make_ready(msg)

    def next_due(self) -> float | None:
        """When the earliest waiting message becomes ready (None if nothing waits)."""
        while self.waiting and self._live(self.waiting[0][1], self.waiting[0][2]) is None:
            heapq.heappop(self.waiting)
        return self.waiting[0][0] if self.waiting else None

    def take(self, limit: int) -> list[_Message]:
        """Pop up to ``limit`` ready messages, best first (they must be leased or put back)."""
        taken: list[_Message] = []
        while self.ready and len(taken) < limit:
            _, message_id, generation = heapq.heappop(self.ready)
            msg = self._live(message_id, generation)
            if msg is not None:
                taken.append(msg)
        return taken

    def put_back(self, msg: _Message) -> None:
        heapq.heappush(self.ready, (-msg.priority, msg.id, msg.generation))

    def waiting_count(self, now: float) -> int:
        """Messages not under a live lease: ready, delayed, or leased past their expiry."""
        return sum(
            1 for m in self.messages.values() if m.lease_token is None or m.visible_at <= now
        )

    def compact(self) -> None:
        """Rebuild the heaps when stale entries outnumber live messages."""
        if len(self.ready) + len(self.waiting) <= 2 * len(self.messages) + 64:
            return
        self.ready = [(-m.priority, m.id, m.generation) for m in self.messages.values() if m.ready]
        self.waiting = [
            (m.visible_at, m.id, m.generation) for m in self.messages.values() if not m.ready
        ]
        heapq.heapify(self.ready)
        heapq.heapify(self.waiting)


class MemoryStore:
    """All queues, exchanges and dead letters of one ``memory://<name>``. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._queues: dict[str, _Queue] = {}
        self._exchanges: dict[str, str] = {}
        self._bindings: dict[str, list[tuple[str, str]]] = {}
        #: Which queue holds each message, so a lease is found without a scan.
        self._holder: dict[int, _Queue] = {}
        self._dead: list[tuple[_Message, str, float]] = []

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    def declare(self, spec: QueueSpec) -> None:
        with self.lock:
            if spec.exchange:
                known = self._exchanges.get(spec.exchange)
                if known is not None and known != spec.exchange_type:
                    raise ImproperlyConfigured(
                        f"exchange {spec.exchange!r} is already declared as {known!r}, "
                        f"not {spec.exchange_type!r}"
                    )
                self._exchanges[spec.exchange] = spec.exchange_type
                bindings = self._bindings.setdefault(spec.exchange, [])
                if (spec.routing_key, spec.name) not in bindings:
                    bindings.append((spec.routing_key, spec.name))
            self._queue(spec.name).max_priority = spec.max_priority

    def _targets(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":
            return [_routing.default_exchange_queue(routing_key)]
        exchange_type = self._exchanges.get(exchange)
        if exchange_type is None:
            raise RoutingError(
                f"exchange {exchange!r} is not declared; declare a queue bound to it"
            )
        return _routing.route(exchange, exchange_type, self._bindings[exchange], routing_key)

    def publish(self, batch: Sequence[Outgoing], now: float) -> set[str]:
        """Store every message of ``batch`` or none of them; return the queues that got one."""
        with self.lock:
            routed = [(out, self._targets(out.exchange, out.routing_key)) for out in batch]
            touched: set[str] = set()
            for out, targets in routed:
                visible_at = now if out.not_before is None else out.not_before
                for name in targets:
                    queue = self._queue(name)
                    msg = _Message(
                        id=next(_ids),
                        queue=name,
                        exchange=out.exchange,
                        routing_key=out.routing_key,
                        priority=_routing.clamp_priority(out.priority, queue.max_priority),
                        body=out.body,
                        content_type=out.content_type,
                        content_encoding=out.content_encoding,
                        headers=out.headers,
                        properties=out.properties,
                        visible_at=visible_at,
                    )
                    queue.messages[msg.id] = msg
                    self._holder[msg.id] = queue
                    queue.place(msg, visible_at, now)
                    touched.add(name)
            return touched

    def claim(
        self, names: Sequence[str], limit: int, token: str, now: float, lease_until: float
    ) -> tuple[list[Delivery], float | None]:
        """Lease up to ``limit`` ready messages; also return when the next waiting one is due."""
        with self.lock:
            queues = [self._queue(name) for name in names]
            candidates: list[tuple[int, int, int, _Message]] = []
            for position, queue in enumerate(queues):
                queue.promote(now)
                candidates.extend((-m.priority, position, m.id, m) for m in queue.take(limit))
            candidates.sort(key=lambda c: c[:3])
            deliveries: list[Delivery] = []
            for index, (_, position, _, msg) in enumerate(candidates):
                queue = queues[position]
                if index >= limit:
                    queue.put_back(msg)
                    continue
                msg.lease_token = token
                msg.delivery_count += 1
                queue.make_waiting(msg, lease_until)
                deliveries.append(_delivery(msg, token))
            due = [d for d in (q.next_due() for q in queues) if d is not None]
            for queue in queues:
                queue.compact()
            return deliveries, min(due, default=None)

    def _leased(self, message_id: int, token: str) -> tuple[_Queue, _Message] | None:
        queue = self._holder.get(message_id)
        if queue is None:
            return None
        msg = queue.messages[message_id]
        return (queue, msg) if msg.lease_token == token else None

    def _remove(self, queue: _Queue, message_id: int) -> None:
        del queue.messages[message_id]
        del self._holder[message_id]

    def ack(self, leases: Iterable[tuple[int, str]]) -> None:
        with self.lock:
            for message_id, token in leases:
                found = self._leased(message_id, token)
                if found is not None:
                    self._remove(found[0], message_id)

    def renew(self, leases: Iterable[tuple[int, str]], lease_until: float) -> None:
        with self.lock:
            for message_id, token in leases:
                found = self._leased(message_id, token)
                if found is not None:
                    found[0].make_waiting(found[1], lease_until)

    def hand_back(
        self, leases: Iterable[tuple[int, str]], visible_at: float, now: float, *, counted: bool
    ) -> set[str]:
        """Release leases: ready again at ``visible_at``. Uncounted deliveries are undone."""
        touched: set[str] = set()
        with self.lock:
            for message_id, token in leases:
                found = self._leased(message_id, token)
                if found is None:
                    continue
                queue, msg = found
                msg.lease_token = None
                if not counted:
                    msg.delivery_count -= 1
                queue.place(msg, visible_at, now)
                touched.add(msg.queue)
        return touched

    def dead_letter(self, lease: tuple[int, str], reason: str, now: float) -> None:
        with self.lock:
            found = self._leased(*lease)
            if found is None:
                return
            queue, msg = found
            self._remove(queue, msg.id)
            self._dead.append((msg, reason, now))

    def purge(self, name: str, now: float) -> int:
        with self.lock:
            queue = self._queues.get(name)
            if queue is None:
                return 0
            doomed = [
                m.id
                for m in queue.messages.values()
                if m.lease_token is None or m.visible_at <= now
            ]
            for message_id in doomed:
                self._remove(queue, message_id)
            queue.compact()
            return len(doomed)

    def size(self, name: str, now: float) -> int:
        with self.lock:
            queue = self._queues.get(name)
            return 0 if queue is None else queue.waiting_count(now)

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        with self.lock:
            newest = self._dead[: -limit - 1 : -1]
        return [
            DeadLetter(
                queue=msg.queue,
                message=decode_message(
                    msg.body, msg.content_type, msg.content_encoding, msg.headers, msg.properties
                ),
                reason=reason,
                dead_lettered_at=at,
            )
            for msg, reason, at in newest
        ]


def _delivery(msg: _Message, token: str) -> Delivery:
    return Delivery(
        message=decode_message(
            msg.body, msg.content_type, msg.content_encoding, msg.headers, msg.properties
        ),
        queue=msg.queue,
        delivery_tag=delivery_tag(msg.id, token),
        exchange=msg.exchange,
        routing_key=msg.routing_key,
        redelivered=msg.delivery_count > 1,
        delivery_count=msg.delivery_count,
        handle=(msg.id, token),
    )
