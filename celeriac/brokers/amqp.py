"""The RabbitMQ transport: ``amqp://``, ``amqps://`` and ``pyamqp://`` (AMQP 0-9-1).

URLs and connection options (heartbeat, TLS, connect timeout) are read by
:mod:`celeriac.brokers._amqp_url`; message encoding by :mod:`celeriac.brokers._amqp_codec`; the
entities declared, identical to Celery's, by :mod:`celeriac.brokers._amqp_topology`.

Client library: aiormq, not aio-pika. aio-pika is a layer over aiormq (every frame still goes
through aiormq) adding object wrappers and a "robust" connection that replays declarations and
consumers after a reconnect. This transport has to own that replay (deliveries of a dead channel
must be recognised as stale, consumers resumed with the prefetch the worker asked for, Celery's
delay topology redeclared), so aio-pika's would be a second, competing mechanism; and its wrappers
cost CPU: publishing 10,000 confirmed messages one ``basic_publish`` each measured ~1.3x faster on
aiormq than on aio-pika (3,700 vs 2,700 msgs/s here). Both are maintained by the same author;
the ``amqp`` extra installs aiormq. Even aiormq's ``basic_publish`` writes each
message separately and encodes headers with pamqp; a batch is therefore written with
:func:`_publish_pipelined` (celeriac's encoder, one socket write per 256 messages, aiormq's own
confirm bookkeeping), about twice as fast again. Consuming likewise: the deliveries of the
consuming channel are read off the socket by :mod:`celeriac.brokers._amqp_tap` (through aiormq's
``TransportFactory`` hook) and decoded by celeriac's decoder, never reaching aiormq's frame
reader, pamqp or its per-delivery tasks; acks are written as frames (:func:`_write_acks`). A worker
draining a queue went from ~5,200 to ~8,400 tasks/s here with that. Everything else on the
connection (replies, ``basic.get``, returns, errors, heartbeats) is still aiormq's.

Semantics, mapped onto the broker contract (:mod:`celeriac.brokers.base`):

* **Publishing** — publisher confirms are always on and every message is ``mandatory``:
  :meth:`AMQPBroker.publish_many` sends the whole batch, then waits for all the confirms (one
  pipeline, not a round trip per message). A message RabbitMQ returns as unroutable raises
  :class:`~celeriac.exceptions.RoutingError`; a nack or a lost connection raises
  :class:`~celeriac.exceptions.PublishError`. Before sending, the batch's exchanges are checked to
  exist (a missing one fails the batch with nothing sent); a routing key that matches no binding is
  only found by RabbitMQ, message by message, so a batch that fails that way may have stored its
  other messages (AMQP has no atomic batch with confirms). Publishing to the default exchange
  ``""`` declares the queue named by the routing key when it does not exist (Celery's
  ``task_create_missing_queues``), with the transport's default queue type.
* **Consuming** — ``fetch`` maps onto ``basic.consume`` with manual acks: one consumer per queue on
  one channel, per-consumer prefetch (``basic.qos`` with ``global=False``, the only kind quorum
  queues accept). The prefetch count is the transport option ``prefetch_count``, else the first
  fetch's ``max_messages`` (a worker asks for its whole prefetch window first). Delivered messages
  are buffered; ``fetch`` hands out up to ``max_messages`` of them, highest priority first across
  the queues' heads, then in the queue order given. A fetch that cannot be served from the buffer
  first synchronises with the queues (a passive declare of each on the consuming channel, then a
  no-op ``basic.qos``: RabbitMQ sends every delivery it already dispatched before that reply) and,
  when a consumer's prefetch window is full because the caller holds its deliveries, takes the
  remainder with ``basic.get``. Messages buffered but not yet handed out are held by this
  connection; :meth:`size` and :meth:`purge` count them as waiting.
* **Leases** — RabbitMQ keeps a delivered message for as long as the channel it was delivered on
  lives (no visibility timeout): :meth:`renew` has nothing to do, and a worker that dies loses its
  connection, which puts its messages back (``redelivered`` set).
* **Delivery counts** — quorum queues count returned deliveries themselves (``x-delivery-count``).
  Classic queues only flag a redelivery, so the transport counts, in the header
  ``x-celeriac-delivery-count`` (the deliveries before this copy of the message was published). A
  message redelivered after a connection died is counted inside :meth:`fetch`: a copy carrying
  its count is published (confirmed) to the back of its queue and the original acked; the copy is
  what gets handed out. That costs a confirmed publish and an ack per such redelivery (after a
  worker died: rarely), and the message loses its place in the queue. ``reject(requeue=True)``
  keeps the message's place when RabbitMQ's flag will say enough (the first delivery of its copy;
  this connection remembers the count, for the last 10,000), else it publishes a counted copy too.
  :meth:`defer` and :meth:`release_prefetched` (messages pushed to this connection but never
  handed out; :meth:`close` calls it) carry the count unchanged: neither a deferral nor a restart
  counts as a delivery. Counts are exact but for two cases: a requeue in place followed by a lost
  connection counts one too few, and a message a consumer cancelled by RabbitMQ had buffered,
  then received by another connection, one too many. A connection lost between a copy's confirm
  and the original's ack leaves both (at least once, as for :meth:`defer`).
  RabbitMQ's ``consumer_timeout`` (30 min by default) closes a channel whose oldest delivery stays
  unacknowledged longer; the transport then reconnects and the message is delivered again, as for a
  dead worker. For tasks that run longer, raise ``consumer_timeout`` in ``rabbitmq.conf`` (or per
  queue with a ``consumer-timeout`` policy); on RabbitMQ >= 3.12 the transport option
  ``consumer_timeout`` (seconds) sets it for this transport's consumers (``x-consumer-timeout``).
* **Acks** — an ack of a batch is pipelined: one ``basic.ack`` with ``multiple=True`` for the
  longest run of oldest deliveries the batch settles entirely, single acks for the rest. A
  delivery already settled, or delivered on a channel that has since died, is ignored: RabbitMQ
  delivers it again (at least once), and an unknown delivery tag would close the channel.
* **Dead letters** — ``reject(requeue=False)`` publishes a copy (confirmed) with the reason to the
  queue ``celeriac.dead_letter`` (transport option ``dead_letter_queue``), then acks the original:
  Celery's queue arguments stay untouched and :meth:`dead_letters` can list them (it browses that
  queue: every message is fetched and put back, so it costs a round trip per dead letter). With
  the transport option ``dead_letter_exchange`` the copy goes to that exchange instead (routing key:
  the queue's name) and this transport keeps none. On quorum queues the transport option
  ``delivery_limit`` sets ``x-delivery-limit``: RabbitMQ itself dead-letters a message delivered
  more often into the same dead-letter queue (:meth:`dead_letters` reports its ``x-death`` reason).
* **Delays** (``not_before``, :meth:`defer`) — messages wait in RabbitMQ, never in the worker,
  through Celery 5.5's delayed-delivery topology (see :mod:`celeriac.brokers._amqp_topology`),
  declared exactly as kombu declares it, so celeriac and Celery workers can share it. Delays are
  whole seconds: a delay is rounded **up** (a message never arrives early; it may arrive up to a
  second late, plus RabbitMQ's dead-lettering hops). Each declared queue is bound to
  ``celery_delayed_delivery`` with ``#.<routing key>`` and ``#.<queue name>``. ``defer`` publishes a
  copy (confirmed) into the topology and acks the delivery. As in Celery, a delayed message is
  routed by its routing key alone when it falls due (to every queue whose binding key matches,
  whatever the exchange), a delayed message that then matches no queue is dropped by RabbitMQ, and
  delayed publishing to a ``fanout`` exchange is refused (its queues have no routing key to match).
  A message whose ``expiration`` is shorter than its delay leaves the delay queues early (RabbitMQ
  dead-letters it on expiry; Celery's topology behaves the same): the worker defers it again by
  its ``eta`` header. Delayed messages are not counted by :meth:`size` (they wait in shared
  queues). The topology is declared once per connection, with the first declaration or delay.
* **Connection loss** — the transport reconnects with backoff (0.1 s doubling to 5 s), redeclares
  what it declared and resumes consuming; the caller restarts nothing. An operation during the
  outage waits up to ``min(connect_timeout, 5)`` seconds for the connection, then raises
  :class:`~celeriac.exceptions.ConnectionError`. Deliveries of the lost channel are stale: their
  ack/reject/defer are ignored (RabbitMQ redelivers them).
* ``name_prefix`` (transport option) prefixes every queue and exchange name this transport uses
  (not the default exchange, nor the shared delay topology; delayed routing keys carry it too), so
  several applications can share one vhost without seeing each other's queues. Names reported in
  deliveries and dead letters are without it.

Other transport options: ``queue_type`` (``classic``/``quorum``) for queues the transport declares
itself and as a default for declarations (a ``QueueSpec`` asking for ``quorum`` wins),
``delayed_delivery_queue_type`` (``quorum``, Celery's default, or ``classic``), ``confirm_timeout``
(seconds a publish waits for its confirms, default 30: a resource alarm blocks publishers), plus
the connection options of :mod:`celeriac.brokers._amqp_url` (``heartbeat``, ``connect_timeout``,
``ssl``, ``connection_name``). An unknown option is refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import logging
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from celeriac.brokers import _amqp_codec as codec
from celeriac.brokers import _amqp_topology as topology
from celeriac.brokers import _common, _routing
from celeriac.brokers._amqp_tap import DeliverySink, DeliveryTap, tap_factory
from celeriac.brokers._amqp_url import AMQPParams, parse_amqp_url
from celeriac.brokers._amqp_url import connect as amqp_connect
from celeriac.brokers.base import (
    Broker,
    BrokerOptions,
    DeadLetter,
    Delivery,
    PublishRequest,
    QueueSpec,
    TransportMessage,
)
from celeriac.exceptions import (
    CeleriacError,
    ConnectionError,
    ImproperlyConfigured,
    PublishError,
    RoutingError,
)

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage

__all__ = ["AMQPBroker", "AMQPSettings"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_DEAD_LETTER_QUEUE = "celeriac.dead_letter"
#: Delivery counts of requeued messages remembered by one connection (the oldest are forgotten).
_REMEMBERED_REQUEUES = 10_000
#: Queue, message id, correlation id, task id, digest of the body.
_Identity = tuple[str, str, str, str, bytes]
#: Reconnection backoff: first pause and longest pause, in seconds.
_BACKOFF = (0.1, 5.0)
#: Longest an operation waits for a lost connection to come back.
_MAX_OPERATION_WAIT = 5.0
#: While every consumer's prefetch window is full, how often a waiting fetch polls with basic.get.
_SATURATED_POLL = (0.05, 1.0)

_TRANSPORT_OPTIONS = frozenset(
    {
        "prefetch_count",
        "queue_type",
        "delivery_limit",
        "dead_letter_queue",
        "dead_letter_exchange",
        "delayed_delivery_queue_type",
        "name_prefix",
        "consumer_timeout",
        "confirm_timeout",
    }
)


@dataclass(frozen=True, slots=True)
class AMQPSettings:
    """The transport options of :class:`AMQPBroker` (connection options aside)."""

    prefetch_count: int | None = None
    queue_type: str = "classic"
    delivery_limit: int | None = None
    dead_letter_queue: str = DEFAULT_DEAD_LETTER_QUEUE
    dead_letter_exchange: str | None = None
    delayed_delivery_queue_type: str = "quorum"
    name_prefix: str = ""
    #: Seconds; sent as the ``x-consumer-timeout`` consumer argument (RabbitMQ >= 3.12).
    consumer_timeout: float | None = None
    #: Seconds a publish waits for RabbitMQ's confirms before it fails with PublishError.
    confirm_timeout: float = 30.0

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> AMQPSettings:
        unknown = sorted(set(options) - _TRANSPORT_OPTIONS)
        if unknown:
            raise ImproperlyConfigured(
                f"unknown transport option(s) {unknown} for the AMQP transport; known: "
                f"{sorted(_TRANSPORT_OPTIONS | {'heartbeat', 'connect_timeout', 'ssl'})}"
            )
        values: dict[str, Any] = {}
        for name in ("prefetch_count", "delivery_limit"):
            value = options.get(name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**16:
                    raise ImproperlyConfigured(
                        f"transport option {name} must be an integer 1-65535, got {value!r}"
                    )
                values[name] = value
        for name in ("queue_type", "delayed_delivery_queue_type"):
            value = options.get(name)
            if value is not None:
                if value not in _routing.QUEUE_TYPES:
                    raise ImproperlyConfigured(
                        f"transport option {name} must be one of {sorted(_routing.QUEUE_TYPES)}, "
                        f"got {value!r}"
                    )
                values[name] = value
        for name in ("dead_letter_queue", "dead_letter_exchange"):
            value = options.get(name)
            if value is not None:
                if not isinstance(value, str) or not value:
                    raise ImproperlyConfigured(
                        f"transport option {name} must be a non-empty name, got {value!r}"
                    )
                values[name] = value
        prefix = options.get("name_prefix", "")
        if not isinstance(prefix, str) or len(prefix) > 100:
            raise ImproperlyConfigured(
                f"transport option name_prefix must be a string of at most 100 characters, "
                f"got {prefix!r}"
            )
        values["name_prefix"] = prefix
        for name in ("consumer_timeout", "confirm_timeout"):
            timeout = options.get(name)
            if timeout is not None:
                if (
                    isinstance(timeout, bool)
                    or not isinstance(timeout, int | float)
                    or not math.isfinite(timeout)
                    or timeout <= 0
                ):
                    raise ImproperlyConfigured(
                        f"transport option {name} must be a positive number of seconds, "
                        f"got {timeout!r}"
                    )
                values[name] = float(timeout)
        settings = cls(**values)
        if settings.delivery_limit is not None and settings.queue_type != "quorum":
            logger.debug("delivery_limit applies to quorum queues only")
        return settings


# -- state of one connection -------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Consumer:
    """One ``basic.consume`` on one queue."""

    queue: str  # as the caller names it
    wire: str  # as RabbitMQ names it (with the name prefix)
    tag: str = ""
    buffer: collections.deque[Delivery] = field(default_factory=collections.deque)
    #: Deliveries through this consumer not yet acked/rejected: what counts against the prefetch.
    outstanding: int = 0


@dataclass(eq=False, slots=True)
class _Consumption:
    """The consuming channel and everything delivered on it: stale as a whole once it dies."""

    channel: AbstractChannel
    generation: int
    consumers: dict[str, _Consumer] = field(default_factory=dict)  # by wire queue name
    #: The same consumers by consumer tag, from just before their basic.consume is sent.
    by_tag: dict[str, _Consumer] = field(default_factory=dict)
    #: Unsettled delivery tag → the consumer it came through (None: from basic.get).
    unsettled: dict[int, _Consumer | None] = field(default_factory=dict)
    #: Whether ``unsettled`` was filled in delivery tag order (so its first key is its oldest),
    #: and the last tag it was given.
    in_order: bool = True
    last_tag: int = 0
    prefetch: int | None = None
    #: Takes this channel's deliveries from the connection's tap (None: no tap).
    sink: DeliverySink | None = None

    @property
    def alive(self) -> bool:
        return not self.channel.is_closed


@dataclass(eq=False, slots=True)
class _Handle:
    """What a :class:`Delivery` of this transport carries as its ``handle``."""

    consumption: _Consumption
    tag: int
    consumer: _Consumer | None
    wire_queue: str
    message: TransportMessage
    #: The ``message_id`` and ``correlation_id`` properties as sent (an automatic id included).
    ids: tuple[str, str]
    #: The delivery's number (:attr:`Delivery.delivery_count`).
    count: int = 1
    #: Redelivered with a count RabbitMQ did not keep: :meth:`AMQPBroker.fetch` counts it.
    uncounted: bool = False
    #: Whether a requeue in place keeps the count: RabbitMQ counts returns (quorum queues), or
    #: this is the first delivery of its copy (so "redelivered" means exactly one more).
    requeue_in_place: bool = True

    @property
    def identity(self) -> _Identity:
        """What identifies the message across its redeliveries (see :func:`_identity`); worked
        out only when needed (a redelivery, a requeue), as it digests the body."""
        return _identity(self.wire_queue, self.ids, self.message)


@dataclass(eq=False)
class _Link:
    """One connection and its channels."""

    connection: AbstractConnection
    #: Reads the consuming channel's deliveries off the socket (None: the client reads them).
    tap: DeliveryTap | None = None
    publish: AbstractChannel | None = None
    admin: AbstractChannel | None = None
    consumption: _Consumption | None = None
    known_queues: set[str] = field(default_factory=set)
    #: Exchanges known to exist: wire name → type, or None when declared by someone else.
    known_exchanges: dict[str, str | None] = field(default_factory=dict)
    delay_ready: bool = False
    delay_bound: set[tuple[str, str]] = field(default_factory=set)
    dead_letter_ready: bool = False
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    publish_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def alive(self) -> bool:
        return not self.connection.is_closed


@dataclass(slots=True)
class _Outgoing:
    """A message ready to publish, and where it goes on the wire."""

    exchange: str  # as the caller names it
    routing_key: str  # as the caller gives it
    encoded: codec.Encoded
    delay: int  # whole seconds, 0 = now
    wire_exchange: str = ""
    wire_key: str = ""


class AMQPBroker(Broker):
    """A connection to RabbitMQ (or any AMQP 0-9-1 broker). See the module docstring."""

    keeps_dead_letters = True
    #: A delivery stays leased while the connection lives; there is no visibility timeout.
    leases_expire = False
    #: Delayed messages wait in the shared delay queues, not in their destination queue.
    size_counts_delayed = False
    #: Delays are whole seconds, rounded up.
    delay_granularity = 1.0
    #: RabbitMQ orders by priority only in queues declared with ``max_priority``.
    priority_without_declaration = False

    def __init__(self, url: str, options: BrokerOptions) -> None:
        super().__init__(url, options)
        _common.check_options(options)
        self.params: AMQPParams
        self.params, rest = parse_amqp_url(url, options.transport_options)
        self.settings = AMQPSettings.parse(rest)
        if self.settings.dead_letter_exchange is not None:
            self.keeps_dead_letters = False
        self._prefix = self.settings.name_prefix
        self._link: _Link | None = None
        self._open = False
        self._reconnector: asyncio.Task[None] | None = None
        self._link_changed: asyncio.Event | None = None
        self._last_error: BaseException | None = None
        self._setup_lock: asyncio.Lock | None = None
        #: One event per waiting fetch, set when a delivery arrives or the connection changes.
        self._waiters: set[asyncio.Event] = set()
        self._resume_failures = 0
        self._generation = 0
        #: What was declared, in order (a dict as an ordered set), redeclared after a reconnect.
        self._declared: dict[QueueSpec, None] = {}
        #: Queues consumed (wire name → caller's name), resumed after a reconnect.
        self._consuming: dict[str, str] = {}
        self._prefetch: int | None = self.settings.prefetch_count
        self.prefetch_fixed_by_first_fetch = self._prefetch is None
        self._wants_delay = False
        self._wants_dead_letter = False
        #: Exchange types this transport declared: wire name → type.
        self._exchange_types: dict[str, str] = {}
        #: Background tasks (a consumer resumed after a channel error), kept from the collector.
        self._tasks: set[asyncio.Task[None]] = set()
        #: Delivery counts of messages this connection gave back to their place in the queue, by
        #: identity: taken when the message comes back (see "Delivery counts" above).
        self._requeued: collections.OrderedDict[_Identity, int] = collections.OrderedDict()

    # -- names -----------------------------------------------------------------------------------

    def _wire(self, name: str) -> str:
        """``name`` as RabbitMQ knows it (with the name prefix); the default exchange stays ''."""
        wire = self._prefix + name if name else name
        if len(wire.encode()) > 255:
            raise ImproperlyConfigured(f"AMQP names are at most 255 bytes: {wire[:40]!r}…")
        return wire

    def _user(self, wire: str) -> str:
        if self._prefix and wire.startswith(self._prefix):
            return wire[len(self._prefix) :]
        return wire

    @property
    def _dead_letter_wire(self) -> str:
        return self._wire(self.settings.dead_letter_queue)

    # -- connection --------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._open and self._link is not None and self._link.alive:
            return
        self._setup_lock = asyncio.Lock()
        self._link_changed = asyncio.Event()
        self._open = True
        try:
            await self._open_link()
        except BaseException:
            self._open = False
            raise

    async def close(self) -> None:
        self._open = False
        # A closed broker consumes nothing: a later connect() starts afresh (declarations stay).
        self._consuming.clear()
        self._prefetch = self.settings.prefetch_count
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None:
            reconnector.cancel()
            with contextlib.suppress(BaseException):
                await reconnector
        await self.release_prefetched()
        link, self._link = self._link, None
        if link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.connection.close(), 5.0)
        if self._link_changed is not None:
            self._link_changed.set()
        self._wake_fetches()

    async def release_prefetched(self) -> None:
        """Stop consuming and give back, uncounted, what RabbitMQ pushed to this connection but
        :meth:`fetch` never handed out; the next fetch consumes again.

        RabbitMQ pushes up to the prefetch count whether or not anyone fetches, and returns what
        a dead connection held flagged redelivered, so the next consumer counts deliveries nobody
        used. A worker calls this before a message runs alone (a redelivered one, perhaps a
        poison message) and :meth:`close` calls it, so that a process that dies is charged only
        with what it really held, and a restart with nothing. Best effort: what cannot be given
        back now, RabbitMQ returns itself.
        """
        link = self._link
        if link is not None:
            await self._return_unused(link)

    async def _return_unused(self, link: _Link) -> None:
        consumption = link.consumption
        if consumption is None or not consumption.alive or not link.alive:
            return
        try:
            for consumer in list(consumption.consumers.values()):
                if consumer.tag:
                    # After CancelOk nothing more is delivered to this consumer.
                    await asyncio.wait_for(consumption.channel.basic_cancel(consumer.tag), 5.0)
                consumption.consumers.pop(consumer.wire, None)
                consumption.by_tag.pop(consumer.tag, None)
                unused = [d for d in consumer.buffer if self._live(self._handle(d))]
                consumer.buffer.clear()
                if unused:
                    await self._publish_prepared(link, [self._counted_copy(d) for d in unused])
                    await self._ack_originals(unused)
        except Exception as exc:  # RabbitMQ returns them itself, counted
            logger.info("Could not give back prefetched messages: %s", exc)

    def _client_properties(self) -> dict[str, Any]:
        if self.params.connection_name:
            return {}
        return {"connection_name": f"celeriac broker {socket.gethostname()} pid {os.getpid()}"}

    async def _open_link(self) -> _Link:
        factory = tap_factory()
        connection = await amqp_connect(
            self.params, client_properties=self._client_properties(), transport_factory=factory
        )
        link = _Link(connection, tap=factory.tap if factory is not None else None)
        try:
            await self._restore(link)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2.0)
            if isinstance(exc, Exception) and not isinstance(exc, CeleriacError):
                raise ConnectionError(
                    f"RabbitMQ at {self.params.display()}: setting up the connection failed: "
                    f"{exc!r}"
                ) from exc
            raise
        if not self._open:  # closed while connecting
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2.0)
            raise ConnectionError(f"AMQP broker {self.params.display()} is not connected")
        self._link = link
        self._last_error = None
        connection.closing.add_done_callback(lambda _: self._on_connection_lost(link))
        assert self._link_changed is not None
        self._link_changed.set()
        self._link_changed = asyncio.Event()
        return link

    def _on_connection_lost(self, link: _Link) -> None:
        if link is not self._link or not self._open:
            return
        logger.warning("Connection to RabbitMQ at %s lost; reconnecting.", self.params.display())
        self._wake_fetches()
        self._start_reconnector()

    def _start_reconnector(self) -> None:
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        pause = _BACKOFF[0]
        while self._open:
            if self._link is not None and self._link.alive:
                return
            try:
                await self._open_link()
                logger.info("Reconnected to RabbitMQ at %s.", self.params.display())
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep trying: the caller restarts nothing
                self._last_error = exc
                logger.warning(
                    "Cannot reconnect to RabbitMQ at %s (%s); retrying in %.1fs.",
                    self.params.display(),
                    exc,
                    pause,
                )
                if self._link_changed is not None:
                    self._link_changed.set()
                    self._link_changed = asyncio.Event()
            await asyncio.sleep(pause)
            pause = min(pause * 2, _BACKOFF[1])

    async def _require_link(self) -> _Link:
        """The live connection, waiting a little for a lost one to come back."""
        if not self._open:
            raise ConnectionError(
                f"AMQP broker {self.params.display()} is not connected (call connect() first)"
            )
        link = self._link
        if link is not None and link.alive:
            return link
        self._start_reconnector()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.params.connect_timeout, _MAX_OPERATION_WAIT)
        while True:
            link = self._link
            if link is not None and link.alive:
                return link
            if not self._open:
                raise ConnectionError(f"AMQP broker {self.params.display()} is not connected")
            remaining = deadline - loop.time()
            if remaining <= 0:
                cause = f": {self._last_error}" if self._last_error else ""
                raise ConnectionError(
                    f"connection to RabbitMQ at {self.params.display()} is lost and not back "
                    f"yet{cause}"
                )
            assert self._link_changed is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._link_changed.wait(), remaining)

    def _lost(self, link: _Link, exc: BaseException, what: str) -> CeleriacError:
        """The error to raise for a driver failure during ``what``; starts a reconnect if needed."""
        if not link.alive and self._open:
            self._start_reconnector()
        return ConnectionError(f"RabbitMQ at {self.params.display()}: {what} failed: {exc!r}")

    async def _restore(self, link: _Link) -> None:
        """Declare again what this broker declared, and resume consuming (after a reconnect)."""
        if self._wants_delay:
            await self._ensure_delay_topology(link)
        if self._wants_dead_letter:
            await self._ensure_dead_letter_queue(link)
        for spec in list(self._declared):
            try:
                await self._declare_on(link, spec)
            except ImproperlyConfigured as exc:
                # Someone redeclared it differently meanwhile: say so, and keep the connection.
                logger.error(
                    "Could not declare queue %r again after reconnecting: %s", spec.name, exc
                )
        if self._consuming:
            consumption = await self._ensure_consumption(link)
            for wire, queue in list(self._consuming.items()):
                await self._start_consumer(link, consumption, queue, wire)

    # -- channels --------------------------------------------------------------------------------

    async def _admin(self, link: _Link) -> AbstractChannel:
        """The channel for declarations and passive checks (reopened after a channel error)."""
        channel = link.admin
        if channel is None or channel.is_closed:
            channel = link.admin = await link.connection.channel(publisher_confirms=False)
        return channel

    async def _admin_call(
        self, link: _Link, call: Callable[[AbstractChannel], Awaitable[_T]]
    ) -> _T:
        async with link.admin_lock:
            channel = await self._admin(link)
            return await call(channel)

    async def _publisher(self, link: _Link) -> AbstractChannel:
        channel = link.publish
        if channel is None or channel.is_closed:
            async with link.publish_lock:
                channel = link.publish
                if channel is None or channel.is_closed:
                    channel = link.publish = await link.connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
        return channel

    # -- declarations --------------------------------------------------------------------------

    async def declare(self, queue: QueueSpec) -> None:
        _routing.check_queue_spec(queue)
        self._wire(queue.exchange)
        link = await self._require_link()
        if queue in self._declared and self._wire(queue.name) in link.known_queues:
            return
        assert self._setup_lock is not None
        async with self._setup_lock:
            await self._declare_on(link, queue)
        self._declared[queue] = None

    def _queue_type(self, spec_type: str) -> str:
        return "quorum" if "quorum" in (spec_type, self.settings.queue_type) else "classic"

    async def _declare_on(self, link: _Link, spec: QueueSpec) -> None:
        from aiormq import exceptions as amqp_errors

        wire = self._wire(spec.name)
        exchange = self._wire(spec.exchange)
        queue_type = self._queue_type(spec.queue_type)
        arguments = topology.queue_arguments(
            spec.name,
            queue_type=queue_type,
            max_priority=spec.max_priority,
            durable=spec.durable,
            delivery_limit=self.settings.delivery_limit,
            dead_letter_queue=self._dead_letter_wire if self.keeps_dead_letters else None,
        )
        await self._ensure_delay_topology(link)
        kind, name = "exchange", spec.exchange
        try:
            if queue_type == "quorum" and self.settings.delivery_limit is not None:
                await self._ensure_dead_letter_queue(link)
            if exchange:
                await self._admin_call(
                    link,
                    lambda ch: ch.exchange_declare(
                        exchange, exchange_type=spec.exchange_type, durable=spec.durable
                    ),
                )
                link.known_exchanges[exchange] = spec.exchange_type
                self._exchange_types[exchange] = spec.exchange_type
            kind, name = "queue", spec.name
            await self._admin_call(
                link,
                lambda ch: ch.queue_declare(
                    wire, durable=spec.durable, arguments=arguments or None
                ),
            )
            link.known_queues.add(wire)
            kind = "binding of queue"
            if exchange:
                await self._admin_call(
                    link, lambda ch: ch.queue_bind(wire, exchange, routing_key=spec.routing_key)
                )
            keys = {wire}
            if exchange and spec.exchange_type != "fanout" and spec.routing_key:
                keys.add(self._prefix + spec.routing_key)
            await self._bind_for_delay(link, wire, keys)
        except amqp_errors.ChannelPreconditionFailed as exc:
            raise ImproperlyConfigured(
                topology.explain_precondition(kind, name, _reply_text(exc))
            ) from exc
        except amqp_errors.ChannelAccessRefused as exc:
            raise ImproperlyConfigured(
                f"RabbitMQ refused to declare {kind} {name!r}: {_reply_text(exc)}"
            ) from exc
        except CeleriacError:
            raise
        except Exception as exc:
            raise self._lost(link, exc, f"declaring {kind} {name!r}") from exc

    async def _ensure_delay_topology(self, link: _Link) -> None:
        """Declare Celery's delayed-delivery exchanges and queues (once per connection)."""
        from aiormq import exceptions as amqp_errors

        if link.delay_ready:
            return
        levels = topology.delay_levels(self.settings.delayed_delivery_queue_type)
        try:
            async with link.admin_lock:
                for level in levels:
                    channel = await self._admin(link)
                    await channel.exchange_declare(level.name, exchange_type="topic", durable=True)
                    try:
                        await channel.queue_declare(
                            level.name, durable=True, arguments=level.arguments
                        )
                    except amqp_errors.ChannelPreconditionFailed as exc:
                        # Declared by someone with another queue type: it routes the same.
                        logger.info(
                            "Delay queue %s exists with other arguments: %s", level.name, exc
                        )
                        channel = await self._admin(link)
                        await channel.queue_declare(level.name, passive=True)
                    await channel.queue_bind(level.name, level.name, routing_key=level.queue_key)
                channel = await self._admin(link)
                for level in levels:
                    if level.down is not None:
                        lower, key = level.down
                        await channel.exchange_bind(
                            destination=lower, source=level.name, routing_key=key
                        )
                await channel.exchange_declare(
                    topology.DELIVERY_EXCHANGE, exchange_type="topic", durable=True
                )
                await channel.exchange_bind(
                    destination=topology.DELIVERY_EXCHANGE,
                    source=topology.level_name(0),
                    routing_key=topology.DELIVERY_KEY,
                )
        except amqp_errors.ChannelPreconditionFailed as exc:
            raise ImproperlyConfigured(
                "Celery's delayed-delivery topology (celery_delayed_*) exists with other settings: "
                f"{_reply_text(exc)}"
            ) from exc
        except CeleriacError:
            raise
        except Exception as exc:
            raise self._lost(link, exc, "declaring the delayed-delivery topology") from exc
        link.delay_ready = True
        self._wants_delay = True

    async def _bind_for_delay(self, link: _Link, wire_queue: str, keys: Iterable[str]) -> None:
        """Bind a queue to the delay topology's delivery exchange for each routing key."""
        await self._ensure_delay_topology(link)
        async with link.admin_lock:
            for key in keys:
                if (wire_queue, key) in link.delay_bound:
                    continue
                channel = await self._admin(link)
                await channel.queue_bind(
                    wire_queue,
                    topology.DELIVERY_EXCHANGE,
                    routing_key=topology.delivery_binding_key(key),
                )
                link.delay_bound.add((wire_queue, key))

    async def _ensure_dead_letter_queue(self, link: _Link) -> None:
        if link.dead_letter_ready or not self.keeps_dead_letters:
            return
        wire = self._dead_letter_wire
        await self._admin_call(link, lambda ch: ch.queue_declare(wire, durable=True))
        link.known_queues.add(wire)
        link.dead_letter_ready = True
        self._wants_dead_letter = True

    async def _queue_exists(self, link: _Link, wire: str) -> int | None:
        """Ready messages in queue ``wire``, or None when it does not exist."""
        from aiormq import exceptions as amqp_errors

        try:
            ok = await self._admin_call(link, lambda ch: ch.queue_declare(wire, passive=True))
        except amqp_errors.ChannelNotFoundEntity:
            link.known_queues.discard(wire)
            return None
        link.known_queues.add(wire)
        return int(ok.message_count or 0)

    async def _ensure_queue(self, link: _Link, wire: str) -> None:
        """Make sure queue ``wire`` exists; declare it as Celery would when it does not."""
        if wire in link.known_queues:
            return
        if await self._queue_exists(link, wire) is not None:
            return
        spec = QueueSpec(self._user(wire), queue_type=self.settings.queue_type)
        arguments = topology.queue_arguments(
            spec.name,
            queue_type=spec.queue_type,
            max_priority=None,
            durable=True,
            delivery_limit=self.settings.delivery_limit,
            dead_letter_queue=self._dead_letter_wire if self.keeps_dead_letters else None,
        )
        if spec.queue_type == "quorum" and self.settings.delivery_limit is not None:
            await self._ensure_dead_letter_queue(link)
        await self._admin_call(
            link, lambda ch: ch.queue_declare(wire, durable=True, arguments=arguments or None)
        )
        link.known_queues.add(wire)

    async def _ensure_exchange(self, link: _Link, wire: str, name: str) -> str | None:
        """The type of exchange ``wire`` (None if unknown); RoutingError if it does not exist."""
        from aiormq import exceptions as amqp_errors

        if wire in link.known_exchanges:
            return link.known_exchanges[wire]
        try:
            await self._admin_call(link, lambda ch: ch.exchange_declare(wire, passive=True))
        except amqp_errors.ChannelNotFoundEntity as exc:
            raise RoutingError(
                f"exchange {name!r} is not declared on the broker; declare a queue bound to it "
                "first"
            ) from exc
        kind = self._exchange_types.get(wire)
        link.known_exchanges[wire] = kind
        return kind

    # -- publishing ----------------------------------------------------------------------------

    async def publish_many(self, items: Sequence[PublishRequest]) -> None:
        prepared = [self._prepare(item) for item in items]
        if not prepared:
            return
        link = await self._require_link()
        await self._send(link, prepared)

    def _prepare(self, item: PublishRequest) -> _Outgoing:
        message, exchange, routing_key, not_before = item
        for what, value in (("exchange", exchange), ("routing_key", routing_key)):
            if not isinstance(value, str):
                raise PublishError(f"{what} must be a string, got {value!r}")
        when = _common.check_not_before(not_before)
        delay = 0 if when is None else _delay_seconds(when)
        extra = {codec.ROUTE_HEADER: [exchange, routing_key]} if delay else None
        encoded = codec.encode(message, extra_headers=extra)
        if exchange == "" and not routing_key:
            raise RoutingError(
                "publishing to the default exchange '' needs the queue name as routing key"
            )
        if len(routing_key.encode()) > 200:
            raise PublishError(f"routing key is too long for AMQP: {routing_key[:40]!r}…")
        return _Outgoing(exchange, routing_key, encoded, delay)

    async def _send(self, link: _Link, batch: list[_Outgoing]) -> None:
        """Check the routes of ``batch``, publish it, and wait for every confirm."""

        try:
            for out in batch:
                await self._route(link, out)
            channel = await self._publisher(link)
        except CeleriacError:
            raise
        except Exception as exc:
            raise self._lost(link, exc, "preparing a publish") from exc
        await self._confirmed(link, channel, batch)

    async def _confirmed(
        self, link: _Link, channel: AbstractChannel, batch: Sequence[_Outgoing]
    ) -> None:
        """Publish ``batch`` on ``channel``; raise unless RabbitMQ confirmed every message."""
        from aiormq import exceptions as amqp_errors

        timeout = self.settings.confirm_timeout
        try:
            results = await asyncio.wait_for(_publish_pipelined(channel, batch), timeout)
        except TimeoutError as exc:
            raise PublishError(
                f"RabbitMQ at {self.params.display()} did not confirm {len(batch)} message(s) "
                f"within {timeout:g} s (confirm_timeout; a resource alarm blocking publishers?); "
                "they may or may not be stored"
            ) from exc
        except Exception as exc:
            raise PublishError(
                f"publishing to RabbitMQ at {self.params.display()} failed: {exc!r}"
            ) from exc
        for out, result in zip(batch, results, strict=True):
            if isinstance(result, amqp_errors.PublishError):
                raise RoutingError(
                    f"no queue is bound to exchange {out.exchange!r} for routing key "
                    f"{out.routing_key!r}; declare the queue first "
                    f"(RabbitMQ returned the message: {result.args[0]})"
                )
        for out, result in zip(batch, results, strict=True):
            if isinstance(result, amqp_errors.DeliveryError):
                raise PublishError(
                    f"RabbitMQ refused the message for exchange {out.exchange!r}, routing key "
                    f"{out.routing_key!r} (nack: a full queue or an internal error)"
                )
            if isinstance(result, BaseException):
                # (A CancelledError here is a confirm the closing channel gave up on: had this
                # task been cancelled, gather would have raised it.)
                if not link.alive:
                    self._start_reconnector()
                raise PublishError(
                    f"publishing to RabbitMQ at {self.params.display()} failed before every "
                    f"message was confirmed (some may be stored): {result!r}"
                ) from result

    async def _route(self, link: _Link, out: _Outgoing) -> None:
        """Fill in the wire exchange and routing key of ``out``, checking the destination exists."""
        if out.exchange == "":
            wire_queue = self._wire(out.routing_key)
            await self._ensure_queue(link, wire_queue)
            if not out.delay:
                out.wire_exchange, out.wire_key = "", wire_queue
                return
            await self._bind_for_delay(link, wire_queue, [wire_queue])
            target = wire_queue
        else:
            wire_exchange = self._wire(out.exchange)
            kind = await self._ensure_exchange(link, wire_exchange, out.exchange)
            if not out.delay:
                out.wire_exchange, out.wire_key = wire_exchange, out.routing_key
                return
            if kind == "fanout":
                raise PublishError(
                    f"cannot delay a message to fanout exchange {out.exchange!r}: RabbitMQ's "
                    "delay topology routes by routing key, which fanout bindings do not have"
                )
            await self._ensure_delay_topology(link)
            target = self._prefix + out.routing_key
        out.wire_exchange = topology.TOP_EXCHANGE
        out.wire_key = topology.delay_routing_key(out.delay, target)

    # -- consuming -------------------------------------------------------------------------------

    async def _ensure_consumption(self, link: _Link) -> _Consumption:
        consumption = link.consumption
        if consumption is not None and consumption.alive:
            return consumption
        channel = await link.connection.channel(publisher_confirms=False)
        self._generation += 1
        consumption = _Consumption(channel, self._generation)
        if link.tap is not None:
            consumption.sink = self._sink(consumption)
            link.tap.divert(channel.number, consumption.sink)
        channel.on_consumer_cancel_callbacks.add(
            lambda frame: self._on_cancelled(consumption, frame)
        )
        channel.closing.add_done_callback(lambda _: self._on_consumption_lost(link, consumption))
        if self._prefetch is not None:
            await channel.basic_qos(prefetch_count=self._prefetch)
            consumption.prefetch = self._prefetch
        link.consumption = consumption
        return consumption

    def _on_consumption_lost(self, link: _Link, consumption: _Consumption) -> None:
        if link.tap is not None:
            link.tap.stop_diverting(consumption.channel.number, consumption.sink)
        if link.consumption is consumption:
            link.consumption = None
        self._wake_fetches()
        if self._open and link is self._link and link.alive and self._consuming:
            # The channel died but the connection lives (e.g. consumer_timeout): consume again.
            task = asyncio.get_running_loop().create_task(self._resume(link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resume(self, link: _Link) -> None:
        # A channel closing with its connection is seen first: let the connection's state settle.
        # Repeated failures back off, so a channel error that recurs cannot spin.
        await asyncio.sleep(min(0.05 * 2**self._resume_failures, _BACKOFF[1]))
        try:
            assert self._setup_lock is not None
            async with self._setup_lock:
                if not link.alive or link is not self._link or not self._open:
                    return
                consumption = await self._ensure_consumption(link)
                for wire, queue in list(self._consuming.items()):
                    await self._start_consumer(link, consumption, queue, wire)
            self._resume_failures = 0
        except Exception as exc:
            self._resume_failures += 1
            logger.warning("Could not resume consuming after a channel error: %s", exc)

    def _on_cancelled(self, consumption: _Consumption, frame: Any) -> None:
        consumer = consumption.by_tag.pop(frame.consumer_tag, None)
        if consumer is not None:
            consumption.consumers.pop(consumer.wire, None)
            if self._link is not None:
                self._link.known_queues.discard(consumer.wire)
            logger.warning(
                "RabbitMQ cancelled the consumer of queue %r (deleted?); it is consumed again "
                "at the next fetch.",
                consumer.queue,
            )
            self._give_back(consumption, consumer)

    def _give_back(self, consumption: _Consumption, consumer: _Consumer) -> None:
        """Requeue what a consumer that is gone had buffered: nobody would ever fetch it."""
        handles = [d.handle for d in consumer.buffer if isinstance(d.handle, _Handle)]
        consumer.buffer.clear()
        handles = [h for h in handles if h.tag in consumption.unsettled]
        if handles and consumption.alive:
            task = asyncio.get_running_loop().create_task(self._requeue(handles))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requeue(self, handles: list[_Handle]) -> None:
        try:
            for handle in handles:
                self._remember(handle.identity, handle.count - 1)  # never handed out: uncounted
                await handle.consumption.channel.basic_reject(handle.tag, requeue=True)
                # Settled only once the reject is on its way: until then a multiple ack of a
                # later tag stops below this one and cannot ack it by accident.
                self._settle(handle)
        except Exception as exc:  # the channel died: RabbitMQ requeues them itself
            logger.debug("Could not requeue %d buffered message(s): %s", len(handles), exc)

    async def _start_consumer(
        self, link: _Link, consumption: _Consumption, queue: str, wire: str
    ) -> None:
        from aiormq import exceptions as amqp_errors

        if wire in consumption.consumers:
            return
        await self._ensure_queue(link, wire)
        consumer = _Consumer(queue, wire)
        arguments: dict[str, Any] = {}
        if self.settings.consumer_timeout is not None:
            arguments["x-consumer-timeout"] = int(self.settings.consumer_timeout * 1000)

        async def on_message(message: DeliveredMessage) -> None:
            self._on_delivery(consumption, consumer, message)

        # The tag is chosen here, not by the client, so that deliveries the tap reads right
        # after consume-ok (before the client has parsed it) know their consumer.
        consumer.tag = f"ctag{consumption.channel.number}.{uuid.uuid4().hex}"
        consumption.consumers[wire] = consumer
        consumption.by_tag[consumer.tag] = consumer
        try:
            await consumption.channel.basic_consume(
                wire, on_message, arguments=arguments or None, consumer_tag=consumer.tag
            )
        except BaseException as exc:
            consumption.consumers.pop(wire, None)
            consumption.by_tag.pop(consumer.tag, None)
            link.known_queues.discard(wire)  # deleted meanwhile? declared again next time
            if isinstance(
                exc, amqp_errors.ChannelAccessRefused | amqp_errors.ChannelLockedResource
            ):
                # Not ours to consume (permissions, an exclusive queue): stop trying.
                self._consuming.pop(wire, None)
                raise ImproperlyConfigured(
                    f"RabbitMQ refused to let this connection consume queue {queue!r}: "
                    f"{_reply_text(exc)}"
                ) from exc
            raise

    def _sink(self, consumption: _Consumption) -> DeliverySink:
        """What takes the deliveries of ``consumption``'s channel from the connection's tap."""

        def take(
            consumer_tag: str,
            delivery_tag: int,
            redelivered: bool,
            exchange: str,
            routing_key: str,
            properties: bytes,
            body: bytes,
        ) -> bool:
            # A consumer cancelled is out of by_tag only once RabbitMQ sends it nothing more
            # (after its cancel-ok, or its basic.cancel from RabbitMQ).
            consumer = consumption.by_tag.get(consumer_tag)
            if consumer is None:
                return False  # not a consumer of ours: the client's callback, if any, has it
            # Decoded before anything is recorded: should it fail, the client decodes it.
            decoded = codec.decode_properties(properties)
            delivery = self._delivery(
                consumption,
                consumer,
                consumer.wire,
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
                body,
                decoded,
            )
            self._buffer(consumption, consumer, delivery)
            return True

        return take

    def _on_delivery(
        self, consumption: _Consumption, consumer: _Consumer, message: DeliveredMessage
    ) -> None:
        """A delivery the client decoded (without a tap, or one the tap left to it)."""
        self._buffer(
            consumption, consumer, self._to_delivery(consumption, consumer, message, consumer.wire)
        )

    def _buffer(self, consumption: _Consumption, consumer: _Consumer, delivery: Delivery) -> None:
        consumer.buffer.append(delivery)
        if consumption.consumers.get(consumer.wire) is not consumer:
            self._give_back(consumption, consumer)  # arrived after its consumer was cancelled
            return
        self._wake_fetches()

    def _to_delivery(
        self,
        consumption: _Consumption,
        consumer: _Consumer | None,
        raw: DeliveredMessage,
        wire_queue: str,
    ) -> Delivery:
        """A delivery (``basic.deliver`` or ``basic.get-ok``) as the client decoded it."""
        frame: Any = raw.delivery
        return self._delivery(
            consumption,
            consumer,
            wire_queue,
            int(frame.delivery_tag or 0),
            bool(frame.redelivered),
            str(frame.exchange or ""),
            str(frame.routing_key or ""),
            bytes(raw.body),
            codec.wire_properties(raw.header.properties),
        )

    def _delivery(
        self,
        consumption: _Consumption,
        consumer: _Consumer | None,
        wire_queue: str,
        tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: codec.WireProperties,
    ) -> Delivery:
        """The :class:`Delivery` of a message delivered on ``consumption``'s channel with delivery
        tag ``tag``, recorded as unsettled (through ``consumer``; None: from ``basic.get``)."""
        message, added = codec.from_wire(body, properties)
        route = added.get(codec.ROUTE_HEADER) if added else None
        if isinstance(route, list) and len(route) == 2 and all(isinstance(r, str) for r in route):
            exchange, routing_key = route
        else:
            routing_key = topology.strip_delay_prefix(routing_key)
            if exchange == "":
                routing_key = self._user(routing_key)
            exchange = self._user(exchange)
        before, returned = codec.previous_deliveries(added) if added else (0, None)
        amqp = properties.amqp
        ids = (amqp.get("message_id") or "", amqp.get("correlation_id") or "")
        uncounted = False
        count: int
        if returned is not None:
            count = before + returned + 1  # a quorum queue counted the returns of this copy
        elif not redelivered:
            count = before + 1
        elif (
            requeued := self._requeued.pop(_identity(wire_queue, ids, message), None)
        ) is not None:
            count = requeued + 1  # given back by this connection, which knows its count
        else:
            # Returned when a connection died: at least one delivery more than the copy says.
            # fetch() republishes it with that count before anyone can run it.
            count, uncounted = before + 2, True
        if tag > consumption.last_tag:
            consumption.last_tag = tag
        else:  # a delivery the client decoded, late: min() finds the oldest from now on
            consumption.in_order = False
        consumption.unsettled[tag] = consumer
        if consumer is not None:
            consumer.outstanding += 1
        return Delivery(
            message=message,
            queue=consumer.queue if consumer is not None else self._user(wire_queue),
            delivery_tag=f"{consumption.generation}.{tag}",
            exchange=exchange,
            routing_key=routing_key,
            redelivered=count > 1,
            delivery_count=count,
            handle=_Handle(
                consumption,
                tag,
                consumer,
                wire_queue,
                message,
                ids,
                count,
                uncounted,
                requeue_in_place=returned is not None or count == before + 1,
            ),
        )

    def is_lost(self, delivery: Delivery) -> bool:
        """True once the channel that delivered ``delivery`` is gone (RabbitMQ requeued it)."""
        handle = delivery.handle
        return isinstance(handle, _Handle) and not handle.consumption.alive

    def _wake_fetches(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    async def fetch(
        self, queues: Sequence[str], max_messages: int, timeout: float
    ) -> list[Delivery]:
        names = _common.check_fetch(queues, max_messages, timeout)
        wires = [self._wire(name) for name in names]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter = asyncio.Event()
        self._waiters.add(waiter)
        try:
            while True:
                link = await self._require_link()
                try:
                    got = await self._fetch_on(link, names, wires, max_messages, deadline, waiter)
                except CeleriacError:
                    raise
                except Exception as exc:
                    error = self._lost(link, exc, "fetching")
                    if not self._open or loop.time() >= deadline:
                        raise error from exc
                    # A lost connection or channel: consume again on the new one, within the
                    # time the caller gave.
                    logger.info("Fetching again after %s", exc)
                    await asyncio.sleep(0.05)
                    continue
                got = await self._count_redeliveries(got)
                if got or loop.time() >= deadline:
                    return got
        finally:
            self._waiters.discard(waiter)

    async def _fetch_on(
        self,
        link: _Link,
        names: Sequence[str],
        wires: Sequence[str],
        limit: int,
        deadline: float,
        waiter: asyncio.Event,
    ) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        consumption = await self._consume(link, names, wires, limit)
        got = await self._fetch_now(consumption, wires, limit)
        poll = _SATURATED_POLL[0]
        while not got:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waiter.clear()
            if link.consumption is not consumption or not consumption.alive:
                if not link.alive:
                    raise _LinkLost("the connection was lost while fetching")
                consumption = await self._consume(link, names, wires, limit)
            got = self._take(consumption, wires, limit)
            if got:
                break
            saturated = self._saturated(consumption, wires)
            try:
                await asyncio.wait_for(
                    waiter.wait(), min(remaining, poll) if saturated else remaining
                )
            except TimeoutError:
                if saturated and consumption.alive:
                    # The caller holds a full prefetch window: look for more with basic.get.
                    poll = min(poll * 2, _SATURATED_POLL[1])
                    got = await self._get_more(consumption, wires, limit, None)
                continue
            if link.consumption is consumption and consumption.alive:
                got = self._take(consumption, wires, limit)
        return got

    async def _consume(
        self, link: _Link, names: Sequence[str], wires: Sequence[str], max_messages: int
    ) -> _Consumption:
        """The consuming channel, with a consumer on each of ``wires``."""
        consumption = link.consumption
        if (
            consumption is not None
            and consumption.alive
            and all(w in consumption.consumers for w in wires)
        ):
            return consumption
        assert self._setup_lock is not None
        async with self._setup_lock:
            if self._prefetch is None:
                self._prefetch = max_messages
            consumption = await self._ensure_consumption(link)
            for name, wire in zip(names, wires, strict=True):
                self._consuming.setdefault(wire, name)
                await self._start_consumer(link, consumption, name, wire)
            return consumption

    async def _fetch_now(
        self, consumption: _Consumption, wires: Sequence[str], limit: int
    ) -> list[Delivery]:
        buffered = sum(
            len(c.buffer) for w in wires if (c := consumption.consumers.get(w)) is not None
        )
        if buffered >= limit:
            return self._take(consumption, wires, limit)
        ready = await self._sync(consumption, wires)
        got = self._take(consumption, wires, limit)
        if len(got) < limit:
            got += await self._get_more(consumption, wires, limit - len(got), ready)
        return got

    async def _sync(self, consumption: _Consumption, wires: Sequence[str]) -> dict[str, int]:
        """Ready counts of ``wires``; on return every delivery dispatched before has arrived.

        The passive declares go through each queue's process (which sent its deliveries to the
        channel before answering); the ``basic.qos`` after them is answered by the channel only
        once those deliveries are on their way to us.
        """
        channel = consumption.channel
        ready: dict[str, int] = {}
        for wire in wires:
            if wire in consumption.consumers:
                ok = await channel.queue_declare(wire, passive=True)
                ready[wire] = int(ok.message_count or 0)
        if consumption.prefetch is not None:
            await channel.basic_qos(prefetch_count=consumption.prefetch)
        # The tap hands deliveries over as they are read, before the reply is; the client's
        # consumer callbacks (without a tap) are tasks: let them run.
        await asyncio.sleep(0)
        return ready

    def _saturated(self, consumption: _Consumption, wires: Sequence[str]) -> bool:
        prefetch = consumption.prefetch
        if prefetch is None:
            return False
        consumers = [c for w in wires if (c := consumption.consumers.get(w)) is not None]
        return bool(consumers) and all(c.outstanding >= prefetch for c in consumers)

    async def _get_more(
        self,
        consumption: _Consumption,
        wires: Sequence[str],
        limit: int,
        ready: dict[str, int] | None,
    ) -> list[Delivery]:
        """``basic.get`` from queues whose consumer's prefetch window is full (in queue order)."""
        from pamqp.commands import Basic

        prefetch = consumption.prefetch
        got: list[Delivery] = []
        if prefetch is None:
            return got
        for wire in wires:
            consumer = consumption.consumers.get(wire)
            if consumer is None or consumer.outstanding < prefetch:
                continue
            if ready is not None and not ready.get(wire):
                continue
            while len(got) < limit and consumption.alive:
                raw = await consumption.channel.basic_get(wire, no_ack=False)
                if not isinstance(raw.delivery, Basic.GetOk):
                    break
                got.append(self._to_delivery(consumption, None, raw, wire))
            if len(got) >= limit:
                break
        return got

    async def _count_redeliveries(self, got: list[Delivery]) -> list[Delivery]:
        """Republish the redeliveries among ``got`` whose count RabbitMQ did not keep; the rest.

        Each such message goes back to its queue as a copy (confirmed) carrying its count, and
        the original is acked; the copy is delivered later, counted (see "Delivery counts" in the
        module docstring). Should the copy fail, the original is handed out as it is, with the
        lowest count it can have.
        """
        unknown = [d for d in got if d.handle.uncounted]  # handles of this transport
        if not unknown:
            return got
        settled: set[int] = set()
        # A delivery of a channel that died is RabbitMQ's again: it delivers it once more.
        live = []
        for delivery in unknown:
            if self._live(self._handle(delivery)):
                live.append(delivery)
            else:
                settled.add(id(delivery))
        copies: list[_Outgoing] = []
        counted: list[Delivery] = []
        for delivery in live:
            try:
                copies.append(self._counted_copy(delivery))
                counted.append(delivery)
            except PublishError as exc:  # a header celeriac cannot write back
                logger.warning("Cannot count a redelivered message again (%s)", exc)
        if counted:
            try:
                link = await self._require_link()
                await self._publish_prepared(link, copies)
            except CeleriacError as exc:
                logger.warning(
                    "Could not count %d redelivered message(s) (%s); they run with the lowest "
                    "delivery count they can have.",
                    len(counted),
                    exc,
                )
            else:
                await self._ack_originals(counted)
                settled.update(id(d) for d in counted)
        return [d for d in got if id(d) not in settled]

    def _counted_copy(self, delivery: Delivery, *, used: bool = False) -> _Outgoing:
        """A copy of ``delivery`` for the back of its own queue, carrying its count: with this
        delivery counted (``used``: it was requeued) or not (handed back unused, or a lost
        delivery's redelivery, whose count already includes the lost one)."""
        handle = self._handle(delivery)
        headers = _copy_headers(delivery, used=used)
        encoded = codec.encode(delivery.message, extra_headers=headers)
        out = _Outgoing("", delivery.queue, encoded, 0)
        out.wire_exchange, out.wire_key = "", handle.wire_queue
        return out

    async def _ack_originals(self, deliveries: Sequence[Delivery]) -> None:
        """Ack deliveries whose copies RabbitMQ confirmed (those still held by a live channel)."""
        by_consumption: dict[_Consumption, list[int]] = {}
        for delivery in deliveries:
            handle = self._handle(delivery)
            if self._live(handle):
                self._settle(handle)
                by_consumption.setdefault(handle.consumption, []).append(handle.tag)
        for consumption, tags in by_consumption.items():
            await self._send_acks(consumption, tags)

    def _take(self, consumption: _Consumption, wires: Sequence[str], limit: int) -> list[Delivery]:
        """Up to ``limit`` buffered deliveries: highest priority among the heads, then queue order."""
        consumers = [c for w in wires if (c := consumption.consumers.get(w)) is not None]
        got: list[Delivery] = []
        while len(got) < limit:
            best: _Consumer | None = None
            best_priority = -1
            for consumer in consumers:
                if consumer.buffer:
                    priority = consumer.buffer[0].message.priority
                    if priority > best_priority:
                        best, best_priority = consumer, priority
            if best is None:
                break
            got.append(best.buffer.popleft())
        return got

    # -- settling --------------------------------------------------------------------------------

    def _handle(self, delivery: Delivery) -> _Handle:
        handle = delivery.handle if isinstance(delivery, Delivery) else None
        if not isinstance(handle, _Handle):
            raise ImproperlyConfigured(
                f"delivery {getattr(delivery, 'delivery_tag', delivery)!r} was not fetched from "
                "an AMQP broker"
            )
        return handle

    def _live(self, handle: _Handle) -> bool:
        """Whether ``handle`` can still be settled: its channel lives and it is not settled."""
        link = self._link
        consumption = handle.consumption
        return (
            link is not None
            and link.consumption is consumption
            and consumption.alive
            and handle.tag in consumption.unsettled
        )

    def _settle(self, handle: _Handle) -> None:
        consumption = handle.consumption
        consumer = consumption.unsettled.pop(handle.tag, None)
        if consumer is not None:
            consumer.outstanding -= 1

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        handles = [self._handle(d) for d in deliveries]
        # Only deliveries of the current consuming channel are live (see _live).
        link = self._link
        consumption = link.consumption if link is not None else None
        if consumption is None or not consumption.alive:
            return
        unsettled = consumption.unsettled
        tags: list[int] = []
        for handle in handles:
            if handle.consumption is consumption and handle.tag in unsettled:
                self._settle(handle)
                tags.append(handle.tag)
        if tags:
            await self._send_acks(consumption, tags)

    async def _send_acks(self, consumption: _Consumption, tags: list[int]) -> None:
        """Ack ``tags`` (just settled): ``multiple`` for the run of oldest tags, singles after."""
        tags.sort()
        remaining = consumption.unsettled
        oldest_left: int | None = None
        if remaining:
            oldest_left = next(iter(remaining)) if consumption.in_order else min(remaining)
        cut = len(tags) if oldest_left is None else _count_below(tags, oldest_left)
        frames: list[tuple[int, bool]] = []
        if cut > 1:
            frames.append((tags[cut - 1], True))
        elif cut == 1:
            frames.append((tags[0], False))
        frames += [(tag, False) for tag in tags[cut:]]
        channel = consumption.channel
        try:
            if _writes_frames(channel):
                await _write_acks(channel, frames)
            else:
                for i, (tag, multiple) in enumerate(frames):
                    await channel.basic_ack(tag, multiple=multiple, wait=i == len(frames) - 1)
        except Exception as exc:
            # The channel died: RabbitMQ puts these messages back and delivers them again.
            logger.warning(
                "Could not ack %d message(s) (%s); RabbitMQ will deliver them again.",
                len(tags),
                exc,
            )

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        _common.check_reason(reason)
        handle = self._handle(delivery)
        if not self._live(handle):
            return
        if requeue and not handle.requeue_in_place:
            # RabbitMQ would bring it back flagged, which says less than its count: the copy
            # carries the count, at the back of the queue.
            try:
                copy = self._counted_copy(delivery, used=True)
            except PublishError as exc:  # a header celeriac cannot write back: requeue in place
                logger.warning("Cannot count a requeued message (%s)", exc)
            else:
                link = await self._require_link()
                await self._publish_prepared(link, [copy])
                await self._ack_originals([delivery])
                return
        if requeue:
            self._remember(handle.identity, delivery.delivery_count)
            try:
                await handle.consumption.channel.basic_reject(handle.tag, requeue=True)
            except Exception as exc:
                logger.warning("Could not requeue a message (%s); RabbitMQ will redeliver it.", exc)
            self._settle(handle)  # after the reject is queued: see _requeue
            return
        await self._dead_letter(delivery, handle, reason)

    def _remember(self, identity: _Identity, count: int) -> None:
        """Note the count of a message given back to its place in the queue by this connection."""
        self._requeued[identity] = count
        self._requeued.move_to_end(identity)
        while len(self._requeued) > _REMEMBERED_REQUEUES:
            self._requeued.popitem(last=False)

    async def _dead_letter(self, delivery: Delivery, handle: _Handle, reason: str) -> None:
        link = await self._require_link()
        extra = {
            codec.REASON_HEADER: reason,
            codec.QUEUE_HEADER: delivery.queue,
            codec.DEAD_AT_HEADER: time.time(),
            codec.ROUTE_HEADER: [delivery.exchange, delivery.routing_key],
        }
        encoded = codec.encode(delivery.message, extra_headers=extra)
        if self.settings.dead_letter_exchange is not None:
            exchange = self._wire(self.settings.dead_letter_exchange)
            out = _Outgoing(exchange, delivery.queue, encoded, 0)
            out.wire_exchange, out.wire_key = exchange, delivery.queue
        else:
            try:
                await self._ensure_dead_letter_queue(link)
            except Exception as exc:
                raise self._lost(link, exc, "declaring the dead-letter queue") from exc
            out = _Outgoing("", self.settings.dead_letter_queue, encoded, 0)
            out.wire_exchange, out.wire_key = "", self._dead_letter_wire
        await self._publish_prepared(link, [out])
        if self._live(handle):
            self._settle(handle)
            await self._send_acks(handle.consumption, [handle.tag])

    async def _publish_prepared(self, link: _Link, batch: list[_Outgoing]) -> None:
        """Publish messages whose wire route is already set (no route checks)."""
        try:
            channel = await self._publisher(link)
        except Exception as exc:
            raise PublishError(
                f"publishing to RabbitMQ at {self.params.display()} failed: {exc!r}"
            ) from exc
        await self._confirmed(link, channel, batch)

    async def defer(self, delivery: Delivery, not_before: float) -> None:
        when = _common.check_defer_time(not_before)
        handle = self._handle(delivery)
        if not self._live(handle):
            return
        link = await self._require_link()
        delay = _delay_seconds(when)
        wire_queue = handle.wire_queue
        # Handed back unused: the copy's first delivery has this delivery's number.
        encoded = codec.encode(delivery.message, extra_headers=_copy_headers(delivery))
        out = _Outgoing(delivery.exchange, delivery.routing_key, encoded, delay)
        if delay:
            try:
                await self._bind_for_delay(link, wire_queue, [wire_queue])
            except CeleriacError:
                raise
            except Exception as exc:
                raise self._lost(link, exc, "binding the queue for delayed delivery") from exc
            out.wire_exchange = topology.TOP_EXCHANGE
            out.wire_key = topology.delay_routing_key(delay, wire_queue)
        else:
            out.wire_exchange, out.wire_key = "", wire_queue
        await self._publish_prepared(link, [out])
        if self._live(handle):
            self._settle(handle)
            await self._send_acks(handle.consumption, [handle.tag])

    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        # RabbitMQ holds a delivery for as long as its channel lives: nothing to extend.
        for delivery in deliveries:
            self._handle(delivery)

    # -- queue inspection --------------------------------------------------------------------------

    def _buffered(self, wire: str) -> list[Delivery]:
        link = self._link
        consumption = link.consumption if link is not None else None
        consumer = consumption.consumers.get(wire) if consumption is not None else None
        return list(consumer.buffer) if consumer is not None else []

    async def size(self, queue: str) -> int:
        name = _common.check_queue_name(queue)
        link = await self._require_link()
        wire = self._wire(name)
        try:
            ready = await self._queue_exists(link, wire)
        except Exception as exc:
            raise self._lost(link, exc, f"counting queue {name!r}") from exc
        return (ready or 0) + len(self._buffered(wire))

    async def purge(self, queue: str) -> int:
        name = _common.check_queue_name(queue)
        link = await self._require_link()
        wire = self._wire(name)
        try:
            if await self._queue_exists(link, wire) is None:
                return 0
            ok = await self._admin_call(link, lambda ch: ch.queue_purge(wire))
        except Exception as exc:
            raise self._lost(link, exc, f"purging queue {name!r}") from exc
        purged = int(ok.message_count or 0)
        consumption = link.consumption
        consumer = consumption.consumers.get(wire) if consumption is not None else None
        if consumption is not None and consumer is not None and consumer.buffer:
            # Buffered here, so not purged by RabbitMQ: they were waiting too — delete them.
            dropped = list(consumer.buffer)
            consumer.buffer.clear()
            await self.ack(dropped)
            purged += len(dropped)
        return purged

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        count = _common.check_limit(limit)
        if not self.keeps_dead_letters:
            raise NotImplementedError(
                "dead letters go to the exchange "
                f"{self.settings.dead_letter_exchange!r}; this transport keeps none"
            )
        link = await self._require_link()
        wire = self._dead_letter_wire
        try:
            waiting = await self._queue_exists(link, wire)
            if not waiting:
                return []
            letters = await self._browse(link, wire, waiting)
        except CeleriacError:
            raise
        except Exception as exc:
            raise self._lost(link, exc, "reading the dead letters") from exc
        letters.reverse()
        return letters[:count]

    async def _browse(self, link: _Link, wire: str, waiting: int) -> list[DeadLetter]:
        """Read every message of queue ``wire`` without removing any (oldest first)."""
        from pamqp.commands import Basic

        channel = await link.connection.channel(publisher_confirms=False)
        letters: list[DeadLetter] = []
        try:
            for _ in range(waiting):
                raw = await channel.basic_get(wire, no_ack=False)
                if not isinstance(raw.delivery, Basic.GetOk):
                    break
                letters.append(self._dead_letter_of(raw))
        finally:
            # Closing the channel puts every message fetched back, in its place.
            with contextlib.suppress(Exception):
                await channel.close()
        return letters

    def _dead_letter_of(self, raw: DeliveredMessage) -> DeadLetter:
        message, added = codec.from_amqp(raw.body, raw.header.properties)
        reason = added.get(codec.REASON_HEADER)
        if isinstance(reason, str):
            queue = added.get(codec.QUEUE_HEADER)
            stamp = added.get(codec.DEAD_AT_HEADER)
            return DeadLetter(
                queue=queue if isinstance(queue, str) else "",
                message=message,
                reason=reason,
                dead_lettered_at=float(stamp) if isinstance(stamp, int | float) else 0.0,
            )
        # Dead-lettered by RabbitMQ itself (the quorum delivery limit): read its x-death record.
        deaths = message.headers.pop("x-death", None)
        for key in list(message.headers):
            if key.startswith(("x-first-death-", "x-last-death-")):
                del message.headers[key]
        death = deaths[0] if isinstance(deaths, list) and deaths else {}
        queue = death.get("queue", "") if isinstance(death, dict) else ""
        why = death.get("reason", "") if isinstance(death, dict) else ""
        when = death.get("time") if isinstance(death, dict) else None
        return DeadLetter(
            queue=self._user(queue if isinstance(queue, str) else ""),
            message=message,
            reason=f"dead-lettered by RabbitMQ: {why}",
            dead_lettered_at=when.timestamp() if isinstance(when, datetime.datetime) else 0.0,
        )


class _LinkLost(Exception):
    """The connection died under an operation that may be tried again on the next one."""


def _delay_seconds(when: float) -> int:
    """Whole seconds to wait until ``when``, rounded up (0 when due); PublishError past the max."""
    delay = when - time.time()
    if delay <= 0:
        return 0
    seconds = math.ceil(delay)
    if seconds > topology.MAX_DELAY:
        raise PublishError(
            f"cannot delay a message by {delay:.0f} s: RabbitMQ's delay topology holds at most "
            f"{topology.MAX_DELAY} s (about 8.5 years)"
        )
    return seconds


def _identity(wire_queue: str, ids: tuple[str, str], message: TransportMessage) -> _Identity:
    """What identifies a message when it comes back: its queue, the ids its sender gave it
    (``message_id`` and ``correlation_id`` as sent), and a digest of its body (two messages alike
    in all of these are the same call)."""
    task_id = message.headers.get("id")
    return (
        wire_queue,
        ids[0],
        ids[1],
        task_id if isinstance(task_id, str) else "",
        hashlib.blake2b(message.body, digest_size=16).digest(),
    )


def _copy_headers(delivery: Delivery, *, used: bool = False) -> dict[str, Any]:
    """Headers of a copy of ``delivery`` published by this transport: where it was first sent,
    and the deliveries before the copy (this one included if it was ``used``)."""
    headers: dict[str, Any] = {codec.ROUTE_HEADER: [delivery.exchange, delivery.routing_key]}
    before = delivery.delivery_count if used else delivery.delivery_count - 1
    if before:
        headers[codec.DELIVERY_COUNT_HEADER] = before
    return headers


def _count_below(tags: list[int], bound: int) -> int:
    """How many of the sorted ``tags`` are below ``bound``."""
    count = 0
    for tag in tags:
        if tag >= bound:
            break
        count += 1
    return count


def _reply_text(exc: BaseException) -> str:
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return text


#: Messages written to the socket in one piece by :func:`_publish_pipelined`.
_WRITE_CHUNK = 256
_FRAME_HEADER = struct.Struct(">BHI")
_FRAME_END = b"\xce"
#: Method frame of basic.publish: class 60, method 40, reserved short.
_PUBLISH_METHOD = struct.Struct(">HHH").pack(60, 40, 0)
_CONTENT_HEADER = struct.Struct(">HHQ")


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEADER.pack(kind, channel, len(payload)) + payload + _FRAME_END


def _publish_frames(channel_number: int, out: _Outgoing, max_body: int) -> bytes:
    """The wire frames of one mandatory ``basic.publish``: method, content header, body."""
    exchange = out.wire_exchange.encode()
    key = out.wire_key.encode()
    method = (
        _PUBLISH_METHOD
        + bytes((len(exchange),))
        + exchange
        + bytes((len(key),))
        + key
        + b"\x01"  # mandatory
    )
    body = out.encoded.body
    parts = [
        _frame(1, channel_number, method),
        _frame(2, channel_number, _CONTENT_HEADER.pack(60, 0, len(body)) + out.encoded.properties),
    ]
    for start in range(0, len(body), max_body):
        parts.append(_frame(3, channel_number, body[start : start + max_body]))
    return b"".join(parts)


#: A basic.ack frame: frame type 1, channel, payload size 13, then the payload (class 60, method
#: 80, delivery tag, the ``multiple`` bit) and the frame end.
_ACK_FRAME = struct.Struct(">BHIHHQBB")


@functools.cache
def _channel_frame_fields() -> frozenset[str]:
    from aiormq.abc import ChannelFrame

    return frozenset(f.name for f in dataclasses.fields(ChannelFrame))


def _writes_frames(channel: Any) -> bool:
    """Whether frames can be put on ``channel``'s connection as bytes (see :func:`_write_acks`)."""
    return (
        {"payload", "should_close", "drain_future"} <= _channel_frame_fields()
        and isinstance(getattr(channel, "number", None), int)
        and hasattr(channel, "write_queue")
        and hasattr(channel, "create_future")
    )


async def _write_acks(channel: AbstractChannel, acks: Sequence[tuple[int, bool]]) -> None:
    """Send ``basic.ack`` frames (delivery tag, multiple) in one write, and wait until written.

    aiormq's ``basic_ack`` encodes each frame with pamqp and queues it on its own; for an ack
    that cost as much as the rest of settling a message. The frames are written here as
    ``basic_ack`` would write them, through the connection's write queue (so they keep their
    order with the channel's other frames, e.g. a reject queued before them).
    """
    from aiormq.abc import ChannelFrame

    ch: Any = channel
    if ch.is_closed:
        raise ConnectionError(f"channel {ch.number} is closed")
    number = ch.number
    payload = b"".join(
        _ACK_FRAME.pack(1, number, 13, 60, 80, tag, 1 if multiple else 0, 0xCE)
        for tag, multiple in acks
    )
    drained: asyncio.Future[None] = ch.create_future()
    await ch.write_queue.put(
        ChannelFrame(payload=payload, should_close=False, drain_future=drained)
    )
    await drained


def _fast_path(channel: Any) -> bool:
    """Whether ``channel`` has the confirm bookkeeping :func:`_publish_pipelined` relies on."""
    from aiormq.abc import ChannelFrame

    names = {f.name for f in dataclasses.fields(ChannelFrame)}
    return (
        {"payload", "should_close"} <= names
        and isinstance(getattr(channel, "delivery_tag", None), int)
        and isinstance(getattr(channel, "confirmations", None), dict)
        and isinstance(getattr(channel, "message_id_delivery_tag", None), dict)
        and isinstance(getattr(channel, "max_content_size", None), int)
        and hasattr(channel, "write_queue")
    )


async def _publish_pipelined(channel: AbstractChannel, batch: Sequence[_Outgoing]) -> list[object]:
    """Publish ``batch`` (mandatory, confirmed) and return each message's confirm or error.

    aiormq's ``basic_publish`` writes every message to the socket on its own (a system call, a
    lock round and pamqp's slow encoding per message), which caps a batch near 3,000 messages/s
    here. Instead the frames of up to :data:`_WRITE_CHUNK` messages are written at once, and each
    message is registered with the channel's own confirm bookkeeping (its ``delivery_tag``
    counter, ``confirmations`` and ``message_id_delivery_tag``), which the channel's reader
    resolves on ``basic.ack`` / ``basic.nack`` / ``basic.return``. Should an aiormq version lack
    that bookkeeping, every message goes through ``basic_publish`` instead.
    """
    from aiormq.abc import ChannelFrame

    ch: Any = channel
    if not _fast_path(ch):
        return await asyncio.gather(
            *(_publish_one(channel, out) for out in batch), return_exceptions=True
        )
    pending: list[tuple[asyncio.Future[Any], str, int]] = []
    max_body = max(int(ch.max_content_size), 1)
    async with ch.lock:
        for start in range(0, len(batch), _WRITE_CHUNK):
            chunk: list[bytes] = []
            for out in batch[start : start + _WRITE_CHUNK]:
                ch.delivery_tag += 1
                tag = ch.delivery_tag
                future: asyncio.Future[Any] = ch.create_future()
                message_id = out.encoded.message_id
                ch.confirmations[tag] = future
                ch.message_id_delivery_tag[message_id] = tag
                pending.append((future, message_id, tag))
                chunk.append(_publish_frames(ch.number, out, max_body))
            await ch.write_queue.put(ChannelFrame(payload=b"".join(chunk), should_close=False))
    try:
        results: list[object] = await asyncio.gather(
            *(f for f, _, _ in pending), return_exceptions=True
        )
        return results
    finally:
        for future, message_id, tag in pending:
            if not future.done():
                future.cancel()
            if ch.message_id_delivery_tag.get(message_id) == tag:
                del ch.message_id_delivery_tag[message_id]


async def _publish_one(channel: AbstractChannel, out: _Outgoing) -> object:
    """Publish through aiormq's own ``basic_publish`` (pamqp re-encodes the properties)."""
    from pamqp.commands import Basic

    data = out.encoded.properties
    properties = Basic.Properties()
    properties.unmarshal(int.from_bytes(data[:2], "big"), data[2:])
    return await channel.basic_publish(
        out.encoded.body,
        exchange=out.wire_exchange,
        routing_key=out.wire_key,
        properties=properties,
        mandatory=True,
    )
