"""The broker contract: the few primitives every transport implements.

Delivery semantics are part of the contract, so no transport can be at-most-once by accident:

* :meth:`Broker.publish_many` returns only once the broker holds every message of the batch
  durably (a commit, publisher confirms, a reply to the enqueue command); otherwise it raises
  :class:`PublishError` and has stored none of them. :meth:`Broker.publish` is a batch of one.
* :meth:`Broker.fetch` *leases* messages: a fetched message stays in the broker until it is
  :meth:`acked <Broker.ack>`; if the lease runs out (its worker died) it is delivered again, with
  ``redelivered`` set and ``delivery_count`` counted up. :meth:`Broker.renew` extends the leases of
  messages whose tasks are still running, so a long task is not redelivered while its worker lives.
* A lease is identified by its ``delivery_tag``, fresh for every delivery: a late ack from a worker
  whose lease expired does not remove the copy delivered to someone else.
* Messages published with ``not_before`` (ETA/countdown) wait **in the broker**, never in worker
  memory; :meth:`Broker.defer` puts a delivered message back to wait until a given time.
* :meth:`Broker.reject` without requeue moves the message to a dead-letter store with a reason where
  the transport can keep one.

All methods are coroutines and are used from one event loop per broker instance; the app keeps one
instance per loop. Driver exceptions never leave a transport: they are translated to
:class:`celeriac.exceptions.ConnectionError` / :class:`PublishError` at this boundary.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.protocol.envelope import TransportMessage

# TransportMessage is re-exported: the message is part of the broker contract.
__all__ = [
    "Broker",
    "BrokerOptions",
    "DeadLetter",
    "Delivery",
    "PublishRequest",
    "QueueSpec",
    "TransportMessage",
]


@dataclass(slots=True)
class Delivery:
    """A leased message handed to a consumer. Ack it, reject it, or defer it: exactly once."""

    message: TransportMessage
    queue: str
    #: Identifies this delivery's lease; fresh for every delivery of the same message.
    delivery_tag: str
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    #: 1 on the first delivery, counted up on each redelivery (poison-message detection).
    delivery_count: int = 1
    #: Transport-private handle (row id, broker tag, …).
    handle: Any = None


@dataclass(slots=True, frozen=True)
class QueueSpec:
    """A queue and the binding that routes messages to it."""

    name: str
    exchange: str = ""
    routing_key: str = ""
    exchange_type: str = "direct"
    durable: bool = True
    max_priority: int | None = None
    #: ``"classic"`` or ``"quorum"`` (RabbitMQ's ``x-queue-type``); other transports ignore it.
    queue_type: str = "classic"


class PublishRequest(NamedTuple):
    """One message of a :meth:`Broker.publish_many` batch: the arguments of :meth:`Broker.publish`."""

    message: TransportMessage
    exchange: str
    routing_key: str
    not_before: float | None = None


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A message the broker refused to deliver again, with the reason."""

    queue: str
    message: TransportMessage
    reason: str
    dead_lettered_at: float


@dataclass(slots=True, frozen=True)
class BrokerOptions:
    """What a transport needs from the app's configuration."""

    #: Seconds a fetched message stays leased before it is delivered again (renewed while running).
    visibility_timeout: float = 30.0
    #: Seconds between polls of transports that cannot push (SQLite), when idle.
    polling_interval: float = 0.05
    #: ``broker_transport_options``: transport-specific extras, validated by each transport.
    transport_options: dict[str, Any] = field(default_factory=dict)


class Broker(abc.ABC):
    """One connection to one broker. See the module docstring for the semantics."""

    #: Whether :meth:`dead_letters` can list what :meth:`reject` dead-lettered.
    keeps_dead_letters: bool = False
    #: Whether the prefetch of the consumers is fixed by the first fetch's ``max_messages`` (AMQP's
    #: ``basic.qos`` when no ``prefetch_count`` is given): a worker's first fetch then asks for
    #: the biggest budget it may need. False where every fetch takes what it asks for.
    prefetch_fixed_by_first_fetch: bool = False
    #: Whether a higher priority is served first (AMQP and celeriac's own transports). False on
    #: Redis, where kombu serves priority 0 first: a fleet mixing Celery and celeriac must agree.
    higher_priority_first: bool = True
    #: Whether a fanout exchange stores a copy in every bound queue (AMQP). False where fanout is
    #: a broadcast to the consumers subscribed at that moment (Redis pub/sub, as kombu does).
    durable_fanout: bool = True
    #: Whether a lease runs out after ``visibility_timeout`` unless :meth:`renew` extends it. False
    #: where the broker holds a delivery for as long as the consumer's connection lives (AMQP):
    #: there, a lease is lost with the connection, and ``renew`` has nothing to do.
    leases_expire: bool = True
    #: Whether :meth:`size` and :meth:`purge` count messages waiting for their ``not_before``.
    #: False where delayed messages wait outside their queue (RabbitMQ's shared delay queues).
    size_counts_delayed: bool = True
    #: Seconds by which a delayed message may arrive after its ``not_before`` beyond delivery
    #: latency: 0 where delays are exact, 1 where the broker counts whole seconds (AMQP, rounding
    #: up, so never early).
    delay_granularity: float = 0.0
    #: Whether every queue serves higher priorities first. False where only a queue declared with
    #: ``max_priority`` does (RabbitMQ); other queues are first in, first out.
    priority_without_declaration: bool = True

    def __init__(self, url: str, options: BrokerOptions) -> None:
        self.url = url
        self.options = options

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection and create whatever storage the transport needs."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection. Unacked deliveries are left to their lease."""

    @abc.abstractmethod
    async def declare(self, queue: QueueSpec) -> None:
        """Create the queue (and its exchange and binding) if it does not exist."""

    @abc.abstractmethod
    async def publish_many(self, items: Sequence[PublishRequest]) -> None:
        """Store every message of ``items``: all are stored, or none (PublishError).

        Returns once the broker holds them durably. One round trip (one commit) for the batch is
        what makes publishing many messages cheap.
        """

    async def publish(
        self,
        message: TransportMessage,
        *,
        exchange: str,
        routing_key: str,
        not_before: float | None = None,
    ) -> None:
        """Store ``message``; return once the broker holds it durably, else raise PublishError.

        ``exchange == ""`` routes to the queue named ``routing_key`` (AMQP's default exchange).
        ``not_before`` (UNIX time) keeps the message invisible until then.
        """
        await self.publish_many([PublishRequest(message, exchange, routing_key, not_before)])

    @abc.abstractmethod
    async def fetch(
        self, queues: Sequence[str], max_messages: int, timeout: float
    ) -> list[Delivery]:
        """Lease up to ``max_messages`` ready messages from ``queues``.

        Waits up to ``timeout`` seconds for the first one; returns ``[]`` when none arrived.
        Higher priority first, then oldest first; ``queues`` are served in the order given for
        equal priority.
        """

    @abc.abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove delivered messages for good. A delivery whose lease was lost is ignored."""

    @abc.abstractmethod
    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        """Give a delivery back: to its queue (``requeue``) or to the dead letters with ``reason``."""

    @abc.abstractmethod
    async def defer(self, delivery: Delivery, not_before: float) -> None:
        """Release a delivery to wait in the broker until ``not_before`` (UNIX time)."""

    @abc.abstractmethod
    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Extend the leases of deliveries whose tasks are still running."""

    def rate_limiter(self) -> RateLimiterStore | None:
        """The store of cluster-wide rate limits kept in this broker, or None if it keeps none.

        Transports that can decide a grant atomically for every worker (SQLite, Redis, memory)
        return one that works through this broker's connection; RabbitMQ keeps no counters.
        """
        return None

    async def release_prefetched(self) -> None:
        """Give back, uncounted, messages the broker pushed here that :meth:`fetch` never handed out.

        Only push-based transports (AMQP) hold such messages; lease-based ones hold nothing that
        was not fetched, so the default does nothing. A worker calls it before a message runs alone.
        """
        return None

    def is_lost(self, delivery: Delivery) -> bool:
        """Whether the broker has already taken ``delivery`` back and will deliver it again.

        True on transports whose deliveries live and die with a connection (AMQP) once that
        connection is gone: a consumer must not start such a message, as the broker's redelivery
        will run it. Lease-based transports return False: an expired lease is noticed by
        :meth:`ack`, and a renewed one is never taken back.
        """
        return False

    @abc.abstractmethod
    async def purge(self, queue: str) -> int:
        """Delete every waiting message of ``queue``; return how many were deleted."""

    @abc.abstractmethod
    async def size(self, queue: str) -> int:
        """Number of messages in ``queue`` that are not leased (ready or delayed)."""

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first, where the transport keeps them."""
        raise NotImplementedError(f"{type(self).__name__} keeps no dead letters")
