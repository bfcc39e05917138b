"""``rpc://`` result store: each result travels back to its caller as an AMQP message.

This is Celery's ``rpc`` result backend (celery-wire.md §5.1, §6.6), wire for wire, so a celeriac
worker answers a Celery client and a Celery worker answers a celeriac client. Nothing is stored on
a server: the worker publishes every document of a task (STARTED, RETRY, SUCCESS, FAILURE,
REVOKED) to the reply queue named by the task message, and the caller keeps the latest one in
memory. The connection is the app's broker connection: ``broker_url`` (an ``amqp://``,
``amqps://`` or ``pyamqp://`` URL) with the connection options of ``broker_transport_options``
(``heartbeat``, ``connect_timeout``, ``ssl``, ``connection_name``). ``rpc://`` itself takes no
host, path, query or transport options.

Layout on the broker::

    reply queue    name = this store's ``oid``: a uuid4 string per store instance (the app keeps
                   one per process and event loop; Celery's is per app and thread)
                   durable=True, auto_delete=True, exclusive=False,
                   arguments {"x-expires": int(result_expires * 1000)} (none when
                   result_expires is None); reached through the default exchange ""
    reply message  exchange "", routing_key = the task message's ``reply_to``
                   properties: correlation_id = the message's correlation_id (else the task id),
                   content_type / content_encoding of ``result_serializer``,
                   delivery_mode 1 (2 with ``persistent``), priority 0, headers {}
                   body: the result document (``task_id`` included), nothing around it

In this process::

    _documents     correlation id -> _Entry(status, payload, expires_at): the latest document
                   received for each task, whoever waits for it (documents of tasks nobody asked
                   about yet are kept for when they do); a SUCCESS is never replaced; dropped after
                   ``result_expires``, by ``forget``, or, past :data:`MAX_DOCUMENTS`, the least
                   recently arrived first (in arrival order: a dict)
    _waiters       task id -> futures of ``wait()`` calls, resolved by an arriving document

The client side starts on first need (the first task sent, ``get``, ``wait``): it declares the reply
queue and consumes it (no-ack, as Celery: see below). A worker that only publishes results declares
nothing. Replies are published with publisher confirms and ``mandatory``: a reply whose queue is
gone (its caller exited) comes back unroutable and is dropped with a debug log, not an error; a
task message without ``reply_to`` gets no reply at all.

What is kept, and what is not — the same as in Celery:

* Results live only in the memory of the store that sent the task. Another process, or the same
  program after a restart, reading the id sees PENDING for ever.
* RabbitMQ deletes an ``auto_delete`` queue, with whatever it holds, as soon as its last consumer
  goes — a dropped connection included. After a connection loss the store reconnects (backing off
  up to :data:`MAX_RECONNECT_DELAY`), declares the queue again under the same name and consumes
  it, so later replies arrive; documents received before the loss stay in memory; replies
  published while the queue was gone were unroutable and are lost. Acknowledging replies would not
  save them (an unacknowledged message returns to a queue that is deleted at once), hence no-ack.
* ``x-expires`` deletes a queue nobody has used for ``result_expires``; it matters only for a
  queue declared and never consumed (a Celery client that sent tasks without reading a result).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from celeriac import states
from celeriac.backends.base import BackendOptions, ReplyRoute, ResultBackend, StoredPayload
from celeriac.brokers._amqp_url import SCHEMES, AMQPParams, connect, parse_amqp_url
from celeriac.exceptions import CeleriacError, ConnectionError, ImproperlyConfigured, PublishError
from celeriac.utils.optional import optional_module

if TYPE_CHECKING:
    from aiormq import Channel
    from aiormq.abc import AbstractConnection, DeliveredMessage

logger = logging.getLogger(__name__)

#: Documents in memory are swept of expired ones once per this many arrivals.
SWEEP_EVERY = 1000
#: Most documents held in memory; past it the least recently arrived is dropped, so a process
#: that sends many tasks and reads few results (tasks sending tasks in a worker) stays bounded.
#: Celery bounds its buffer likewise (8192 messages).
MAX_DOCUMENTS = 100_000
#: A warning about dropped documents is logged for the first and then every this many.
EVICTION_WARNING_EVERY = 10_000
#: Longest pause, in seconds, between attempts to reconnect a consuming store.
MAX_RECONNECT_DELAY = 5.0
#: Seconds given to closing a connection before it is abandoned.
CLOSE_TIMEOUT = 2.0
#: AMQP short strings (a routing key) hold at most this many bytes.
MAX_ROUTING_KEY_BYTES = 255


@dataclass(slots=True)
class _Entry:
    #: The document's state, or None when it could not be decoded (``get`` raises why).
    status: str | None
    payload: StoredPayload
    expires_at: float | None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ImproperlyConfigured(f"malformed result store URL {url!r}: {exc}") from exc
    if parts.scheme.lower() != "rpc" or parts.netloc or parts.path not in ("", "/"):
        raise ImproperlyConfigured(
            f"the rpc result store URL is just 'rpc://', got {url!r}: its connection is the "
            "broker's (broker_url and broker_transport_options)"
        )
    if parts.query or parts.fragment:
        raise ImproperlyConfigured(
            f"the rpc result store URL takes no query or fragment, got {url!r}; connection "
            "options go in broker_url or broker_transport_options"
        )


class RPCBackend(ResultBackend):
    """Results as reply messages on the broker's AMQP connection (Celery's ``rpc://``)."""

    pushes = True
    uses_reply_queue = True

    def __init__(self, url: str, options: BackendOptions) -> None:
        super().__init__(url, options)
        _check_url(url)
        optional_module(
            "aiormq",
            purpose="the rpc:// result store",
            package="aiormq",
            install="'celeriac[amqp]'",
        )
        if options.transport_options:
            raise ImproperlyConfigured(
                "the rpc:// result store takes no result_backend_transport_options (got "
                f"{sorted(key for key, _ in options.transport_options)}); its connection follows "
                "broker_url and broker_transport_options"
            )
        broker_url = options.broker_url
        if not broker_url:
            raise ImproperlyConfigured(
                "the rpc:// result store sends results over the broker's AMQP connection, but no "
                "broker_url was given to it"
            )
        scheme = urlsplit(broker_url).scheme.lower()
        if scheme not in SCHEMES:
            raise ImproperlyConfigured(
                f"the rpc:// result store needs an AMQP broker (amqp://, amqps://), but broker_url "
                f"is {scheme}://…; with this broker use another result store (redis://, "
                "sqlite:///…)"
            )
        expires = options.expires
        if expires is not None and int(expires * 1000) < 1:
            raise ImproperlyConfigured(
                f"result_expires must be at least 0.001 s with rpc:// (it is the reply queue's "
                f"x-expires in whole milliseconds), got {expires!r}"
            )
        # What parse_amqp_url leaves are the broker's own options (prefetch_count, …): the broker
        # validates those; this store uses only the connection options.
        self._params: AMQPParams
        self._params, _ = parse_amqp_url(broker_url, dict(options.broker_transport_options))
        self._delivery_mode = 2 if options.persistent else 1
        self._documents: dict[str, _Entry] = {}
        self._arrivals = 0
        self._evicted = 0
        self._reset_connection_state()
        #: Whether :meth:`close` was called (or :meth:`connect` never was).
        self._closed = True

    def _reset_connection_state(self) -> None:
        """Start afresh: a new reply queue name and no connection (first use, or after a fork)."""
        self._pid = os.getpid()
        #: The reply queue's name, put as ``reply_to`` into the task messages sent.
        self.oid = str(uuid.uuid4())
        self._conn: AbstractConnection | None = None
        #: The event loop the connection runs on.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: Channel | None = None
        #: The channel the reply queue is consumed on, if any.
        self._consumed_on: Channel | None = None
        #: Whether the reply queue was declared and consumed: a reconnect does both again.
        self._consuming = False
        self._reconnector: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    def __repr__(self) -> str:
        return f"<RPCBackend {self._params.display()} reply queue {self.oid}>"

    # -- connection ------------------------------------------------------------------------------

    async def connect(self) -> None:
        self._check_process()
        self._closed = False
        await self._ready_channel()

    async def close(self) -> None:
        self._check_process()
        self._closed = True
        reconnector, self._reconnector = self._reconnector, None
        if reconnector is not None:
            reconnector.cancel()
            await asyncio.gather(reconnector, return_exceptions=True)
        conn = self._conn
        self._conn = self._channel = self._consumed_on = None
        # The queue goes with the connection (auto_delete); it is declared again on next need.
        self._consuming = False
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)  # the waiter reads again and learns it is closed
        if conn is not None:
            await _close_quietly(conn)

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            # Forked: the parent's connection, queue and documents are not this process's; a
            # queue of its own keeps replies meant for the parent from being taken here.
            self._reset_connection_state()
            self._documents.clear()
        elif self._loop is not None and self._loop is not asyncio.get_running_loop():
            # Used from another event loop than the connection's (that loop may be gone): the
            # old connection is abandoned, as it can only be closed from its own loop, and a
            # new queue keeps this loop from sharing replies with it if it still runs.
            self._reset_connection_state()

    def _check_open(self) -> None:
        self._check_process()
        if self._closed:
            raise ConnectionError(f"result store {self.url} is not connected; call connect()")

    async def _ready_channel(self) -> Channel:
        """The open channel, (re)connecting first if needed."""
        self._check_open()
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            self._check_open()
            channel = self._channel
            if channel is None or channel.is_closed:
                channel = await self._open()
        return channel

    async def _open(self) -> Channel:
        stale = self._conn
        self._conn = self._channel = self._consumed_on = None
        if stale is not None:
            await _close_quietly(stale)
        conn = await connect(self._params)
        try:
            # The client's own class (its abstract one lacks basic_publish's ``wait``).
            channel = cast(
                "Channel", await conn.channel(publisher_confirms=True, on_return_raises=False)
            )
            if self._consuming:
                await self._declare_and_consume(channel)
        except BaseException as exc:
            await _close_quietly(conn)
            if isinstance(exc, _DRIVER_ERRORS):
                raise ConnectionError(
                    f"cannot open the rpc:// reply channel on {self._params.display()}: {exc!r}"
                ) from exc
            raise
        self._conn, self._channel = conn, channel
        self._loop = asyncio.get_running_loop()
        conn.closing.add_done_callback(lambda done: self._on_lost(conn, done))
        channel.closing.add_done_callback(lambda done: self._on_lost(conn, done))
        channel.on_consumer_cancel_callbacks.add(lambda _: self._on_cancelled(channel))
        return channel

    async def _declare_and_consume(self, channel: Channel) -> None:
        expires = self.options.expires
        arguments: dict[str, Any] = {} if expires is None else {"x-expires": int(expires * 1000)}
        await channel.queue_declare(self.oid, durable=True, auto_delete=True, arguments=arguments)
        await channel.basic_consume(self.oid, self._on_reply, no_ack=True)
        self._consumed_on = channel

    async def _consumed_channel(self) -> Channel:
        """The open channel, with the reply queue declared and consumed on it."""
        channel = await self._ready_channel()
        if self._consumed_on is channel:
            return channel
        async with self._lock:
            if self._consumed_on is not channel:
                if channel.is_closed or channel is not self._channel:
                    raise ConnectionError(
                        f"the connection to {self._params.display()} was lost while declaring "
                        f"the reply queue {self.oid}"
                    )
                try:
                    await self._declare_and_consume(channel)
                except _DRIVER_ERRORS as exc:
                    raise ConnectionError(
                        f"cannot declare and consume the reply queue {self.oid} on "
                        f"{self._params.display()}: {exc!r}"
                    ) from exc
                self._consuming = True
        return channel

    def _on_lost(self, conn: AbstractConnection, done: asyncio.Future[Any]) -> None:
        """The connection or channel of ``conn`` closed: forget it; reconnect if consuming."""
        reason = None if done.cancelled() else done.exception()
        if conn is not self._conn or self._closed:
            return  # an old connection, or closed on purpose
        self._conn = self._channel = self._consumed_on = None
        if reason is None or isinstance(reason, asyncio.CancelledError):
            # Cancelled, not lost: its event loop is shutting down. Nothing to reconnect on.
            self._consuming = False
            return
        logger.warning(
            "rpc:// result store lost its connection to %s (%r)%s",
            self._params.display(),
            reason,
            "; reconnecting" if self._consuming else "",
        )
        # A channel can close alone (a channel error); the connection under it goes too.
        asyncio.get_running_loop().create_task(_close_quietly(conn))
        if self._consuming:
            self._start_reconnector()

    def _on_cancelled(self, channel: Channel) -> None:
        """The broker cancelled the consumer: the reply queue was deleted (by an operator)."""
        if channel is not self._consumed_on or self._closed:
            return
        self._consumed_on = None
        logger.warning(
            "rpc:// reply queue %s was deleted on the broker; declaring it again", self.oid
        )
        self._start_reconnector()

    def _start_reconnector(self) -> None:
        if self._reconnector is None:
            self._reconnector = asyncio.get_running_loop().create_task(
                self._reconnect(), name=f"celeriac-rpc-reconnect-{self.oid}"
            )

    def _needs_repair(self) -> bool:
        lost = self._conn is None or (self._consuming and self._consumed_on is None)
        return lost and not self._closed

    async def _reconnect(self) -> None:
        """Reconnect, declare and consume the reply queue again, backing off between attempts."""
        delay = 0.1
        failures = 0
        try:
            while self._needs_repair():
                try:
                    await self._consumed_channel()
                except CeleriacError as exc:
                    failures += 1
                    level = logging.WARNING if failures == 1 else logging.DEBUG
                    logger.log(level, "rpc:// reconnect failed (%s); retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RECONNECT_DELAY)
                else:
                    logger.warning(
                        "rpc:// result store consumes its reply queue %s on %s again (replies "
                        "sent while the queue was gone are lost)",
                        self.oid,
                        self._params.display(),
                    )
        finally:
            if self._reconnector is asyncio.current_task():
                self._reconnector = None

    # -- the caller's side -----------------------------------------------------------------------

    async def reply_queue(self) -> str:
        """This store's reply queue, declared and consumed, for ``reply_to`` of tasks sent."""
        self._check_open()
        if not self._consuming:
            await self._consumed_channel()
        return self.oid

    async def _on_reply(self, message: DeliveredMessage) -> None:
        """Keep a reply arriving on the reply queue as the latest document of its task.

        The client runs this as one task per message, in arrival order; it must not await, or a
        later document of a task could be kept before an earlier one.
        """
        properties = message.header.properties
        payload = StoredPayload(
            bytes(message.body), properties.content_type or "", properties.content_encoding or ""
        )
        key = properties.correlation_id
        status: str | None = None
        try:
            meta = self.decode_meta(payload)
        except CeleriacError as exc:
            if not key:
                logger.warning("rpc:// dropped an unreadable reply without correlation_id: %s", exc)
                return
            # Kept anyway: whoever reads this task gets the error (e.g. ContentDisallowed).
        else:
            status = meta["status"] if isinstance(meta["status"], str) else None
            if not key:
                key = meta.get("task_id")  # Celery's fallback, for replies of old senders
            if not isinstance(key, str) or not key:
                logger.warning("rpc:// dropped a reply naming no task: %r", meta.get("task_id"))
                return
        self._keep(key, status, payload)

    def _keep(self, task_id: str, status: str | None, payload: StoredPayload) -> None:
        now = time.time()
        current = self._documents.get(task_id)
        if current is not None and current.status == states.SUCCESS and not current.expired(now):
            return  # a success is final: a redelivered task's later documents do not replace it
        expires = self.options.expires
        # Popped first so the dict's order is the order of last arrival: the oldest go first.
        self._documents.pop(task_id, None)
        self._documents[task_id] = _Entry(
            status, payload, None if expires is None else now + expires
        )
        self._arrivals += 1
        if self._arrivals % SWEEP_EVERY == 0:
            expired = [key for key, entry in self._documents.items() if entry.expired(now)]
            for key in expired:
                del self._documents[key]
        if len(self._documents) > MAX_DOCUMENTS:
            oldest = next(iter(self._documents))
            del self._documents[oldest]
            self._evicted += 1
            if self._evicted % EVICTION_WARNING_EVERY == 1:
                logger.warning(
                    "rpc:// result store holds %d documents, its limit: the oldest are dropped "
                    "(%d so far, e.g. %s); read or forget results, or lower result_expires",
                    MAX_DOCUMENTS,
                    self._evicted,
                    oldest,
                )
        for future in self._waiters.pop(task_id, ()):
            if not future.done():
                future.set_result(None)

    async def _read(self, task_id: str) -> StoredPayload | None:
        self._check_open()
        if not self._consuming:
            # A reader needs the queue consumed; once it is, reads come from memory even while a
            # lost connection is being re-established.
            await self._consumed_channel()
        entry = self._documents.get(task_id)
        if entry is None:
            return None
        if entry.expired(time.time()):
            del self._documents[task_id]
            return None
        return entry.payload

    async def _wait_for_change(self, task_id: str, timeout: float) -> None:
        # ``wait`` calls this right after reading, with no await in between, and documents only
        # arrive on this same event loop: none can slip between the read and the registration.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiters.setdefault(task_id, [])
        waiting.append(future)
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                waiting.remove(future)
            if not waiting and self._waiters.get(task_id) is waiting:
                del self._waiters[task_id]

    async def _delete(self, task_id: str) -> None:
        # Nothing is kept on the server: forgetting drops the document held here.
        self._check_open()
        self._documents.pop(task_id, None)

    # -- the worker's side -----------------------------------------------------------------------

    async def _write(
        self, task_id: str, status: str, payload: StoredPayload, expires_at: float | None
    ) -> None:
        # Reached through store()/store_many(), which carry no reply route: as in Celery, a task
        # whose caller named no reply queue gets no reply.
        logger.debug("rpc:// no reply queue for %s: %s document not sent", task_id, status)

    async def store_routed(self, meta: dict[str, Any], route: ReplyRoute | None) -> None:
        await self.store_many_routed([(meta, route)])

    async def store_many_routed(
        self, items: Sequence[tuple[dict[str, Any], ReplyRoute | None]]
    ) -> None:
        """Publish each document to its task's reply queue; return once the broker confirmed all.

        Every document is encoded before anything is sent, so a value the serializer cannot
        carry fails the call with nothing published. Raises :class:`PublishError` if the broker
        refused or the connection failed (the caller may send them all again: a reader keeps
        only the latest document, and a SUCCESS is final).
        """
        self._check_open()
        sends: list[tuple[StoredPayload, ReplyRoute, str]] = []
        for meta, route in items:
            if route is None:
                logger.debug("rpc:// no reply queue for %s: not sent", meta.get("task_id"))
                continue
            if len(route.reply_to.encode()) > MAX_ROUTING_KEY_BYTES:
                logger.warning(
                    "rpc:// reply_to of %s is longer than %d bytes: no queue can have that name; "
                    "not sent",
                    meta.get("task_id"),
                    MAX_ROUTING_KEY_BYTES,
                )
                continue
            sends.append((self.encode_meta(meta), route, str(meta.get("task_id"))))
        if not sends:
            return
        channel = await self._ready_channel()
        results = await asyncio.gather(
            *(self._publish(channel, payload, route, task_id) for payload, route, task_id in sends),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, CeleriacError | asyncio.CancelledError):
                    raise result
                raise PublishError(f"rpc:// reply not published: {result!r}") from result

    async def _publish(
        self, channel: Channel, payload: StoredPayload, route: ReplyRoute, task_id: str
    ) -> None:
        properties = _spec.Basic.Properties(
            content_type=payload.content_type,
            content_encoding=payload.content_encoding,
            headers={},
            delivery_mode=self._delivery_mode,
            priority=0,
            correlation_id=route.correlation_id,
        )
        try:
            # mandatory: an unroutable reply comes back instead of vanishing, so it can be logged.
            # wait=False skips waiting for the socket write only; the confirm is still awaited.
            confirmation = await channel.basic_publish(
                payload.data,
                exchange="",
                routing_key=route.reply_to,
                properties=properties,
                mandatory=True,
                wait=False,
            )
        except _DRIVER_ERRORS as exc:
            raise PublishError(
                f"rpc:// reply for {task_id} to {route.reply_to} not published: {exc!r}"
            ) from exc
        if isinstance(confirmation, _spec.Basic.Ack):
            return
        if isinstance(confirmation, _spec.Basic.Nack):
            raise PublishError(
                f"the broker refused (nack) the rpc:// reply for {task_id} to {route.reply_to}"
            )
        # Returned unroutable: the caller's reply queue is gone (it exited); nobody to tell.
        logger.debug(
            "rpc:// reply for %s dropped: reply queue %s does not exist", task_id, route.reply_to
        )


async def _close_quietly(conn: AbstractConnection) -> None:
    # Closing a connection that already failed may fail again; that adds nothing.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT)


try:
    from aiormq import exceptions as _amqp_errors
    from pamqp import commands as _spec
except ImportError:  # pragma: no cover - RPCBackend() says what to install
    _DRIVER_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError)
else:
    #: What the client raises when the connection or channel fails (translated at this boundary).
    _DRIVER_ERRORS = (
        _amqp_errors.AMQPError,
        _amqp_errors.ChannelInvalidStateError,
        OSError,
        TimeoutError,
    )
