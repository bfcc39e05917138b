"""The Redis transport: ``redis://``, ``rediss://``, ``redis+socket://``, ``sentinel://``.

Messages are stored exactly as kombu 5.7 stores them (the layout is documented in
:mod:`celeriac.brokers._redis_layout`), so Celery clients and workers share a Redis with
celeriac: a task sent by either is run by either. Delivery is safer than kombu's while staying
compatible with it:

* **One atomic fetch.** A Lua script (:mod:`celeriac.brokers._redis_scripts`) pops up to
  ``max_messages`` and records each in kombu's ``unacked`` hash and ``unacked_index`` under a token
  fresh for every delivery — there is no moment at which a popped message is recorded nowhere.
  :meth:`RedisBroker.renew` keeps the lease of a running task; a lease that runs out
  (``visibility_timeout``) puts the message back at the front of its queue, with kombu's
  ``redelivered`` flags and ``delivery_count`` counted up. The next fetch of that queue does it,
  in the same script, so exactly one of many workers restores each message.
* **Celery's deliveries are respected.** An ``unacked`` entry written by a Celery worker is
  restored only once it is older than ``foreign_visibility_timeout`` (default 3600 s, kombu's own
  default), so a long task of a live Celery worker is never run twice because of celeriac. And a
  Celery worker's restore of celeriac's entries puts them back into the queue they came from.
* **Delayed messages wait in Redis** (a sorted set per queue), are moved to their queue by the
  fetch script when due, exactly once, and end a waiting fetch on time. :meth:`RedisBroker.defer`
  parks a delivered message there, so a two-hour countdown neither runs twice nor occupies a
  worker. With ``delayed_delivery=False`` a message published with ``not_before`` goes straight to
  its list, as kombu sends it: for queues that only Celery workers consume (a Celery worker keeps
  the message in memory until its ETA; it never looks into celeriac's sorted set).
* **Rejected messages are kept**: ``reject(requeue=False)`` moves the message to a capped list of
  dead letters with the reason and time (:meth:`RedisBroker.dead_letters`, newest first).

Order: Redis serves **priority 0 first** (buckets 0, 3, 6, 9, in that order), as kombu does, so a
mixed fleet agrees (:attr:`RedisBroker.higher_priority_first` is False). Queues are served in the
order given for equal priority, oldest message first.

Waiting: an idle fetch blocks on the server, not in a sleep loop. ``BLMOVE <key> <key> RIGHT RIGHT``
on the first bucket of the first queue returns as soon as anything — a Celery client's ``LPUSH``
included — lands in it, without consuming anything (it moves the last item onto itself). The
fetch script is pipelined right behind it, so the server runs it the moment the wait ends: a
wake-up costs no extra round trip. Both use a connection of their own, so a waiting fetch never
delays a publish or an ack, and the wait is ended on time with ``CLIENT UNBLOCK`` (the server's
own timeouts are only as precise as its ``hz``, 100 ms by default). Other buckets and queues are
polled, from 1 ms, backing off to ``polling_interval``; a publish from the same process wakes a
fetch at once. Where ``CLIENT`` is forbidden (ACLs), fetches fall back to polling.

Clocks: lease deadlines, delays and ``unacked_index`` scores are UNIX times of the client's clock,
as kombu's are. The fetch script, which may run a while after it was sent, reads the server's
``TIME`` and adds the offset between the two clocks (measured at connect and every minute).

Connections: the commands of every message — the scripts (publish, fetch, hand-back), acks and
renewals — go over one pipelined connection (:mod:`celeriac.utils.resp`): any number in flight at
once, each a fraction of the CPU of a redis-py command, which a worker draining a queue sends about
once per task. The waiting ``BLMOVE``, fanout's pub/sub and the rarer commands use redis-py. Every
connection carries the ``client_name``. Synchronous callers (``delay()`` from plain code) publish
on their own thread over blocking connections (:meth:`RedisBroker.publish_many_sync`,
:mod:`celeriac.utils.resp_sync`), with the same scripts and arguments.

Errors: every driver error becomes :class:`~celeriac.exceptions.ConnectionError` (or
:class:`~celeriac.exceptions.PublishError` from a publish, which returns only once Redis replied
that it stored the batch). The driver never re-sends a command by itself — a publish is never
stored twice behind the caller's back; after a failure the next call reconnects. Commands with the
same effect however often they run (acks, renewals, hand-backs by lease token, reads) are sent
once more on a fresh connection when a pooled one turns out to be dead (a Redis restart,
``CLIENT KILL``), so such a loss does not turn into a redelivery.

Fanout exchanges use pub/sub as kombu's do (``PUBLISH /<db>.<exchange>``): publishing is best
effort and stores nothing, and a queue bound to a fanout exchange by :meth:`RedisBroker.declare`
receives what is published while its broker fetches it (:attr:`RedisBroker.durable_fanout` is
False). Such a message is held by nobody in Redis: ``ack`` and ``renew`` do nothing to it.

Transport options (``broker_transport_options``), kombu's names where kombu has the option:

``global_keyprefix``
    Prefix of every key and channel (kombu's option, same meaning). Default ``""``.
``sep``
    Separator between a queue name and its priority step, and in binding members (kombu's
    option). Default ``"\\x06\\x16"``.
``priority_steps``
    Priority buckets (kombu's option), increasing from 0 to at most 9. Default ``[0, 3, 6, 9]``.
``foreign_visibility_timeout``
    Seconds after which an ``unacked`` entry of a Celery worker (not written by celeriac) is
    restored by celeriac. Default 3600, kombu's ``visibility_timeout``; set it to the Celery
    workers' ``visibility_timeout`` when they use another.
``delayed_delivery``
    True (default): messages published with ``not_before`` wait in Redis until due. False: they
    go to the queue at once, as kombu sends them (see above).
``dead_letter_limit``
    How many dead letters are kept (the oldest are dropped). Default 10,000.
``fanout_prefix``, ``fanout_patterns``
    Accepted as ``True`` only (kombu's defaults since 4.0, and what celeriac does).
``master_name``, ``ssl``, ``sentinel_kwargs``, ``socket_timeout``, ``socket_connect_timeout``,
``socket_keepalive``, ``health_check_interval``, ``max_connections``, ``client_name``
    The connection, see :mod:`celeriac.utils.redis_url`.

``visibility_timeout`` and ``polling_interval`` are :class:`~celeriac.brokers.base.BrokerOptions`.
Revoked task ids are kept in a stream ``<global_keyprefix>_celeriac.revoked`` of the same database
(:mod:`celeriac.brokers._revocations_redis`).
Needs Redis 6.2 or later (``BLMOVE``, ``RPOP`` with a count); Redis Cluster is not supported
(neither is it by kombu). Durability is Redis's: enable AOF (``appendfsync everysec`` or
``always``) for messages to survive a restart of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

from celeriac.brokers import _common, _routing
from celeriac.brokers import _redis_scripts as scripts
from celeriac.brokers._ratelimit_redis import RedisRateLimiter
from celeriac.brokers._redis_layout import (
    DEFAULT_PRIORITY_STEPS,
    DEFAULT_SEP,
    MAX_PRIORITY,
    Layout,
    MalformedEnvelope,
    check_priority_steps,
    decode_envelope,
    encode_envelope,
    lease_token_base,
    mark_redelivered,
    parse_envelope,
    topic_pattern,
)
from celeriac.brokers.base import (
    Broker,
    BrokerOptions,
    DeadLetter,
    Delivery,
    PublishRequest,
    QueueSpec,
    TransportMessage,
)
from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.exceptions import (
    CeleriacError,
    ConnectionError,
    ImproperlyConfigured,
    PublishError,
    RoutingError,
)
from celeriac.protocol.message import uuid4_text
from celeriac.utils.redis_url import (
    CONNECTION_OPTIONS,
    make_client,
    parse_redis_url,
    redis_module,
)
from celeriac.utils.resp import RedisPipe, ReplyError, RespError
from celeriac.utils.resp_sync import ConnectFailed, SyncConnection, SyncPool
from celeriac.utils.suggest import did_you_mean
from celeriac.utils.wakeup import Waiter, WakeupRegistry

__all__ = ["PublishRequest", "RedisBroker"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: First pause of an idle fetch; doubled up to ``polling_interval``.
_FIRST_POLL = 0.001
#: Shorter waits are spent locally (a wait of 0: the deadline or a due message is here).
_MIN_BLOCK = 0.0005
#: Seconds between two measures of the offset between our clock and the server's.
_CLOCK_REFRESH = 60.0
#: The server-side timeout of a BLMOVE beyond the wait, in case CLIENT UNBLOCK misses it.
_BACKSTOP = 1.0
#: Expired leases, due delayed messages and foreign entries handled per fetch, per queue.
_BATCH = 1000
#: Longest pause between two scans for Celery workers' expired entries.
_FOREIGN_SCAN_MAX = 60.0
#: Fanout messages kept per queue for the next fetch; older ones are dropped (best effort).
_FANOUT_BUFFER = 10_000
#: Arguments of the publish script before the messages', and per message.
_PUBLISH_HEAD = 7
_PUBLISH_STRIDE = 6

#: Fetches waiting in this process, by Redis server and key prefix: a publish wakes them at once.
_wakeups = WakeupRegistry()

#: The scripts synchronous callers run (publish, declare), by name: ``(SHA-1, source)``, as
#: ``EVALSHA`` names them.
_SYNC_SCRIPTS = {
    name: (hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest(), source)
    for name, source in (("publish", scripts.PUBLISH), ("declare", scripts.DECLARE))
}

_OWN_OPTIONS = (
    "global_keyprefix",
    "sep",
    "priority_steps",
    "foreign_visibility_timeout",
    "delayed_delivery",
    "dead_letter_limit",
    "fanout_prefix",
    "fanout_patterns",
)
_KNOWN_OPTIONS = frozenset(
    [*_OWN_OPTIONS, *CONNECTION_OPTIONS, "master_name", "ssl", "sentinel_kwargs"]
)


@dataclass(slots=True, frozen=True)
class _Settings:
    prefix: str = ""
    sep: str = DEFAULT_SEP
    steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    foreign_visibility_timeout: float = 3600.0
    delayed_delivery: bool = True
    dead_letter_limit: int = 10_000


def parse_transport_options(options: Mapping[str, Any]) -> _Settings:
    """The transport's own options (the connection ones are taken by ``parse_redis_url`` first)."""
    for name in options:
        if name not in _OWN_OPTIONS:
            hint = ""
            if name in ("visibility_timeout", "polling_interval"):
                hint = f" ({name} is a BrokerOptions field, not a transport option)"
            raise ImproperlyConfigured(
                f"unknown Redis transport option {name!r}{hint}."
                f"{did_you_mean(name, _KNOWN_OPTIONS)} Known: {sorted(_KNOWN_OPTIONS)}"
            )
    prefix = options.get("global_keyprefix", "")
    if not isinstance(prefix, str):
        raise ImproperlyConfigured(f"global_keyprefix must be a string, got {prefix!r}")
    sep = options.get("sep", DEFAULT_SEP)
    if not isinstance(sep, str) or not sep:
        raise ImproperlyConfigured(f"sep must be a non-empty string, got {sep!r}")
    steps = check_priority_steps(options.get("priority_steps", DEFAULT_PRIORITY_STEPS))
    foreign = options.get("foreign_visibility_timeout", 3600.0)
    if (
        not isinstance(foreign, int | float)
        or isinstance(foreign, bool)
        or not math.isfinite(foreign)
        or foreign <= 0
    ):
        raise ImproperlyConfigured(
            f"foreign_visibility_timeout must be a positive number of seconds, got {foreign!r}"
        )
    delayed = options.get("delayed_delivery", True)
    if not isinstance(delayed, bool):
        raise ImproperlyConfigured(f"delayed_delivery must be True or False, got {delayed!r}")
    limit = options.get("dead_letter_limit", 10_000)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ImproperlyConfigured(f"dead_letter_limit must be a positive integer, got {limit!r}")
    for name in ("fanout_prefix", "fanout_patterns"):
        if name in options and options[name] is not True:
            raise ImproperlyConfigured(
                f"{name} can only be True (kombu's default since 4.0): celeriac publishes and "
                f"subscribes fanout channels as '/<db>.<exchange>[/<routing key>]', "
                f"got {options[name]!r}"
            )
    return _Settings(prefix, sep, steps, float(foreign), delayed, limit)


class _Lease(NamedTuple):
    """A delivery's handle: its token in the in-flight record, and its queue (a tuple: one is
    built for every message fetched)."""

    #: ``celeriac:…`` token; empty for a fanout message, which nobody holds in Redis.
    token: str
    queue: str
    #: The envelope of a fanout message (to requeue, defer or dead-letter it).
    raw: bytes = b""
    step: int = 0


class RedisBroker(Broker):
    """A broker on one Redis database, sharing kombu's layout. See the module docstring."""

    keeps_dead_letters = True
    #: Redis serves priority 0 first, as kombu does (a mixed fleet must agree).
    higher_priority_first = False
    #: Fanout goes over pub/sub, as kombu's: best effort, nothing is stored.
    durable_fanout = False

    def __init__(self, url: str, options: BrokerOptions) -> None:
        super().__init__(url, options)
        _common.check_options(options)
        self._target, rest = parse_redis_url(url, options.transport_options)
        self._settings = parse_transport_options(rest)
        redis_module()  # a clear error now if the redis package is missing
        self._layout = Layout(
            prefix=self._settings.prefix,
            sep=self._settings.sep,
            steps=self._settings.steps,
            db=self._target.db,
        )
        self._describe = self._target.describe()
        #: In-process wake-ups are shared by brokers on the same server, database and prefix.
        self._store_key = f"{self._describe}|{self._settings.prefix}"
        self._client: Any = None
        #: The connection of the hot commands (scripts, acks, renewals): see celeriac.utils.resp.
        self._pipe: RedisPipe | None = None
        self._scripts: dict[str, Any] = {}
        self._declared: set[QueueSpec] = set()
        # The connection BLMOVE blocks on, its CLIENT ID, and whether CLIENT UNBLOCK is allowed.
        self._blocking: Any = None
        self._blocking_id: int | None = None
        self._block_lock = asyncio.Lock()
        self._can_unblock = True
        self._next_foreign_scan = 0.0
        #: Our clock minus the server's: the fetch script tells our time by the server's TIME.
        self._clock_offset = 0.0
        self._clock_measured = -math.inf
        # Fanout: queues bound here to fanout exchanges, the subscription, and what it received.
        self._fanout_queues: dict[str, set[str]] = {}
        self._pattern_exchange: dict[bytes, str] = {}
        self._subscribed: set[str] = set()
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._confirmed: set[bytes] = set()
        self._confirm = asyncio.Event()
        self._fanout_buffer: dict[str, deque[bytes]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        #: Blocking connections of synchronous callers (publish_many_sync, declare_sync).
        self._sync_pool: SyncPool | None = None
        self._sync_lock = threading.Lock()

    # -- connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No automatic re-sends: a publish whose reply was lost must fail, not run twice.
        client = make_client(self._target, retry=Retry(NoBackoff(), 0))
        try:
            with self._errors(ConnectionError, "cannot connect: "):
                info = await client.info("server")
        except BaseException:
            await _quietly(client.aclose())
            raise
        version = str(info.get("redis_version", "0"))
        if _version_tuple(version) < (6, 2):
            await _quietly(client.aclose())
            raise ConnectionError(
                f"the Redis broker needs Redis 6.2 or later (BLMOVE), "
                f"{self._describe} runs {version}"
            )
        self._scripts = {
            "claim": client.register_script(scripts.CLAIM),
            "publish": client.register_script(scripts.PUBLISH),
            "hand_back": client.register_script(scripts.HAND_BACK),
            "dead_letter": client.register_script(scripts.DEAD_LETTER),
            "purge": client.register_script(scripts.PURGE),
            "declare": client.register_script(scripts.DECLARE),
        }
        self._client = client
        pipe = RedisPipe(self._target)
        try:
            with self._errors(ConnectionError, "cannot connect: "):
                await pipe.connect()
            await self._measure_clock(client)
        except BaseException:
            self._client = None
            pipe.close()
            await _quietly(client.aclose())
            raise
        self._pipe = pipe
        self._block_lock = asyncio.Lock()
        self._confirm = asyncio.Event()
        self._can_unblock = True

    async def close(self) -> None:
        if self._client is None:
            return
        if self._background:  # leases of cancelled fetches being given back
            await asyncio.wait(set(self._background), timeout=2.0)
        client, self._client = self._client, None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            pipe.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _quietly(pubsub.aclose())
        self._subscribed.clear()
        self._confirmed.clear()
        self._fanout_buffer.clear()
        await self._drop_blocking()
        await _quietly(client.aclose())

    def _connected(self) -> Any:
        if self._client is None:
            raise ConnectionError(
                f"the Redis broker {self._describe} is not connected; call connect() first"
            )
        return self._client

    def _connected_pipe(self) -> RedisPipe:
        pipe = self._pipe
        if pipe is None:
            raise ConnectionError(
                f"the Redis broker {self._describe} is not connected; call connect() first"
            )
        return pipe

    async def _run(self, commands: list[tuple[Any, ...]], *, idempotent: bool) -> list[Any]:
        """Commands pipelined on the hot connection; an error reply is raised (translated)."""
        pipe = self._connected_pipe()
        with self._errors():
            replies = await pipe.execute(commands, retries=1 if idempotent else 0)
            for reply in replies:
                if isinstance(reply, ReplyError):
                    raise reply
        return replies

    @contextlib.contextmanager
    def _errors(
        self, error: type[CeleriacError] = ConnectionError, what: str = ""
    ) -> Iterator[None]:
        """Translate driver errors at the boundary."""
        try:
            yield
        except _redis_errors() as exc:
            raise error(f"Redis broker {self._describe}: {what}{exc}") from exc

    def _base_args(self, now: float) -> list[Any]:
        return [self._layout.prefix, self._layout.sep, repr(now)]

    async def _script(
        self,
        name: str,
        args: list[Any],
        error: type[CeleriacError] = ConnectionError,
        *,
        idempotent: bool = False,
    ) -> Any:
        """Run a script; an ``idempotent`` one once more if its connection was lost."""
        pipe = self._connected_pipe()
        script = self._scripts[name]
        with self._errors(error):
            return await pipe.evalsha(
                script.sha, script.script, (), args, retries=1 if idempotent else 0
            )

    # -- the contract -------------------------------------------------------------------------

    async def declare(self, queue: QueueSpec) -> None:
        _routing.check_queue_spec(queue)
        self._connected()
        if queue in self._declared:
            return
        reply = await self._script("declare", self._declare_args(queue), idempotent=True)
        self._declared_as(queue, reply)
        if queue.exchange and queue.exchange_type == "fanout":
            self._fanout_queues.setdefault(queue.exchange, set()).add(queue.name)

    def _declare_args(self, queue: QueueSpec) -> list[Any]:
        """Arguments of the declare script."""
        pattern = topic_pattern(queue.routing_key) if queue.exchange_type == "topic" else ""
        max_priority = "" if queue.max_priority is None else str(queue.max_priority)
        return [
            *self._base_args(time.time()),
            queue.name,
            queue.exchange,
            queue.exchange_type,
            queue.routing_key,
            pattern,
            max_priority,
        ]

    def _declared_as(self, queue: QueueSpec, reply: Any) -> None:
        """Take the declare script's reply: the queue is declared, or its exchange conflicts."""
        if _text(reply[0]) == "conflict":
            raise ImproperlyConfigured(
                f"exchange {queue.exchange!r} is already declared as {_text(reply[1])!r}, "
                f"not {queue.exchange_type!r}"
            )
        self._declared.add(queue)

    async def publish_many(self, items: Sequence[PublishRequest]) -> None:
        """Route and store the batch in one script: all messages are stored, or none."""
        args = self._publish_args(items)
        if args is None:
            return
        reply = await self._script("publish", args, PublishError)
        self._published(reply, args)

    def _publish_args(self, items: Sequence[PublishRequest]) -> list[Any] | None:
        """Arguments of the publish script for ``items`` (None for an empty batch): the head,
        then :data:`_PUBLISH_STRIDE` per message."""
        args: list[Any] = []
        count = 0
        # The random part of every delivery tag of the batch, read at once.
        random = os.urandom(16 * len(items))
        for item in items:
            message, exchange, routing_key, not_before = item
            for what, value in (("exchange", exchange), ("routing_key", routing_key)):
                if not isinstance(value, str):
                    raise PublishError(f"{what} must be a string, got {value!r}")
            when = _common.check_not_before(not_before)
            if exchange == "":
                _routing.default_exchange_queue(routing_key)
            tag = uuid4_text(random[16 * count : 16 * count + 16])
            envelope, tag = encode_envelope(message, exchange, routing_key, tag)
            priority = min(_common.message_priority(message), MAX_PRIORITY)
            args += [exchange, routing_key, str(priority), "" if when is None else repr(when)]
            args += [tag, envelope]
            count += 1
        if not count:
            return None
        layout = self._layout
        head = [
            *self._base_args(time.time()),
            " ".join(map(str, layout.steps)),
            layout.channel_prefix,
            "1" if self._settings.delayed_delivery else "0",
            str(count),
        ]
        return head + args

    def _published(self, reply: Any, args: list[Any]) -> None:
        """Take the publish script's reply: raise for an unroutable message, else wake the
        fetches of this process waiting on the queues that got messages."""
        if _text(reply[0]) == "unroutable":
            index, reason = int(reply[1]) - 1, _text(reply[2])
            at = _PUBLISH_HEAD + index * _PUBLISH_STRIDE
            exchange, routing_key = args[at], args[at + 1]
            if reason == "undeclared":
                raise RoutingError(
                    f"exchange {exchange!r} is not declared; declare a queue bound to it"
                )
            raise RoutingError(
                f"no queue is bound to exchange {exchange!r} for routing key {routing_key!r}; "
                f"declare the queue first"
            )
        _wakeups.notify(self._store_key, [_text(q) for q in reply[1:]])

    # -- synchronous callers ------------------------------------------------------------------

    # ``delay()`` from synchronous code publishes here, on the caller's thread, over blocking
    # connections (celeriac.utils.resp_sync): the same scripts with the same arguments as the
    # asyncio methods above, without the hops to and from the event loop of another thread.
    # These methods need no connect(); they connect on first use, and any number of threads
    # may call them at once (each on a connection of its own).

    def declare_sync(self, queue: QueueSpec) -> None:
        """:meth:`declare` for synchronous callers (publishers: nothing is consumed here)."""
        _routing.check_queue_spec(queue)
        if queue in self._declared:
            return
        reply = self._script_sync("declare", self._declare_args(queue), idempotent=True)
        self._declared_as(queue, reply)

    def publish_many_sync(self, items: Sequence[PublishRequest]) -> None:
        """:meth:`publish_many` for synchronous callers: stored in one script, all or none."""
        args = self._publish_args(items)
        if args is None:
            return
        reply = self._script_sync("publish", args, PublishError)
        self._published(reply, args)

    def close_sync(self) -> None:
        """Close the connections of synchronous callers (made again on next use)."""
        with self._sync_lock:
            pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.close()

    def _script_sync(
        self,
        name: str,
        args: list[Any],
        error: type[CeleriacError] = ConnectionError,
        *,
        idempotent: bool = False,
    ) -> Any:
        """Run a script on a blocking connection; errors worded as the asyncio path words them."""
        pool = self._sync_pool
        if pool is None:
            with self._sync_lock:
                pool = self._sync_pool
                if pool is None:
                    pool = self._sync_pool = SyncPool(
                        self._target, on_connect=self._check_server_sync
                    )
        sha, source = _SYNC_SCRIPTS[name]
        try:
            return pool.evalsha(sha, source, (), args, retries=1 if idempotent else 0)
        except ConnectFailed as exc:
            if pool.ever_connected:
                # Reconnecting a connection that worked: as the asyncio path's pipe says it.
                raise error(f"Redis broker {self._describe}: {exc}") from exc
            # Never connected: as the asyncio path's connect() says it (through redis-py).
            raise ConnectionError(
                f"Redis broker {self._describe}: cannot connect: {self._connect_failure(exc)}"
            ) from exc
        except ReplyError as exc:
            if exc.refused and not pool.ever_connected:
                # AUTH refused: redis-py's words are the reply without its code.
                text = str(exc).partition(" ")[2] or str(exc)
                raise ConnectionError(
                    f"Redis broker {self._describe}: cannot connect: {text}"
                ) from exc
            raise error(f"Redis broker {self._describe}: {exc}") from exc
        except (RespError, OSError) as exc:
            raise error(f"Redis broker {self._describe}: {exc}") from exc

    def _connect_failure(self, exc: ConnectFailed) -> str:
        """Why a first connection failed, in redis-py's words (``Error 111 connecting to …``)."""
        cause = exc.os_error
        if cause is None:
            if "socket_connect_timeout" in str(exc):
                return "Timeout connecting to server"
            return str(exc).removeprefix("cannot connect: ")
        target = self._target
        where = target.path if target.kind == "unix" else f"{target.host}:{target.port}"
        if not cause.args:
            return f"Error connecting to {where}."
        if len(cause.args) == 1:
            return f"Error {cause.args[0]} connecting to {where}."
        return f"Error {cause.args[0]} connecting to {where}. {cause.args[1]}."

    def _check_server_sync(self, connection: SyncConnection) -> None:
        """On every new blocking connection: the server must be Redis 6.2 or later, as
        :meth:`connect` checks."""
        (reply,) = connection.handshake([("INFO", "server")])
        version = "0"
        for line in bytes(reply).decode("utf-8", "replace").splitlines():
            if line.startswith("redis_version:"):
                version = line.partition(":")[2].strip()
        if _version_tuple(version) < (6, 2):
            raise ConnectionError(
                f"the Redis broker needs Redis 6.2 or later (BLMOVE), "
                f"{self._describe} runs {version}"
            )

    async def fetch(
        self, queues: Sequence[str], max_messages: int, timeout: float
    ) -> list[Delivery]:
        names = _common.check_fetch(queues, max_messages, timeout)
        self._connected()
        await self._subscribe_fanout(names)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = _FIRST_POLL
        first_key = self._layout.bucket(names[0])
        with _wakeups.waiting(self._store_key, names) as waiter:
            deliveries, next_due = await self._claim(names, max_messages)
            while not deliveries:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                wait = min(pause, remaining)
                if next_due is not None:
                    wait = min(wait, max(next_due - time.time(), 0.0))
                deliveries, next_due, woken = await self._wait_and_claim(
                    names, max_messages, first_key, wait, waiter
                )
                pause = _FIRST_POLL if woken else min(pause * 2, self.options.polling_interval)
        return deliveries

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        leases = [_lease(d) for d in deliveries]
        held = [lease for lease in leases if lease.token]
        if not held:
            return
        tokens = [lease.token for lease in held]
        layout = self._layout
        commands: list[tuple[Any, ...]] = [
            ("HDEL", layout.unacked, *tokens),
            ("ZREM", layout.unacked_index, *tokens),
        ]
        for queue, queue_tokens in _by_queue(held).items():
            commands.append(("ZREM", layout.leases(queue), *queue_tokens))
        await self._run(commands, idempotent=True)

    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        leases = [_lease(d) for d in deliveries]
        held = [lease for lease in leases if lease.token]
        if not held:
            return
        clock = time.time()
        now, deadline = repr(clock), repr(clock + self.options.visibility_timeout)
        # XX: a lease that was lost (restored, acked) stays lost.
        index: list[Any] = ["ZADD", self._layout.unacked_index, "XX"]
        for lease in held:
            index += (now, lease.token)
        commands: list[tuple[Any, ...]] = [tuple(index)]
        for queue, queue_tokens in _by_queue(held).items():
            by_queue: list[Any] = ["ZADD", self._layout.leases(queue), "XX"]
            for token in queue_tokens:
                by_queue += (deadline, token)
            commands.append(tuple(by_queue))
        await self._run(commands, idempotent=True)

    async def reject(self, delivery: Delivery, *, requeue: bool, reason: str = "") -> None:
        _common.check_reason(reason)
        lease = _lease(delivery)
        if requeue:
            if lease.token:
                await self._hand_back("requeue", [lease])
            else:
                await self._push_front(lease, mark_redelivered(lease.raw))
            return
        if lease.token:
            args = [
                *self._base_args(time.time()),
                str(self._settings.dead_letter_limit),
                lease.token,
                lease.queue,
                json.dumps(lease.queue),
                json.dumps(reason),
            ]
            await self._script("dead_letter", args, idempotent=True)
        else:
            await self._store_dead_letter(lease, reason, lease.raw.decode("utf-8", "replace"))

    async def defer(self, delivery: Delivery, not_before: float) -> None:
        when = _common.check_defer_time(not_before)
        lease = _lease(delivery)
        if lease.token:
            await self._hand_back("defer", [lease], when)
            return
        client = self._connected()
        member = f"fanout:{secrets.token_hex(8)}"
        with self._errors():
            pipe = client.pipeline(transaction=True)
            pipe.zadd(self._layout.delayed(lease.queue), {member: when})
            pipe.hset(
                self._layout.delayed_messages(lease.queue),
                member,
                f"{lease.step}:".encode() + lease.raw,
            )
            await pipe.execute()
        _wakeups.notify(self._store_key, [lease.queue])

    def rate_limiter(self) -> RateLimiterStore:
        """Limits kept under ``_celeriac.rate_limit.*`` keys of this database (one script per
        grant, see :mod:`celeriac.brokers._ratelimit_redis`)."""
        return RedisRateLimiter(
            self._connected, self._layout.prefix, f"the Redis broker {self._describe}"
        )

    async def purge(self, queue: str) -> int:
        name = _common.check_queue_name(queue)
        self._connected()
        steps = " ".join(map(str, self._layout.steps))
        deleted = int(await self._script("purge", [*self._base_args(time.time()), steps, name]))
        buffered = self._fanout_buffer.pop(name, None)
        return deleted + (len(buffered) if buffered else 0)

    async def size(self, queue: str) -> int:
        name = _common.check_queue_name(queue)
        client = self._connected()

        async def count() -> Any:
            pipe = client.pipeline(transaction=False)
            for key in self._layout.buckets(name):
                pipe.llen(key)
            pipe.zcard(self._layout.delayed(name))
            # Leases that ran out and were not restored yet are waiting again.
            pipe.zcount(self._layout.leases(name), "-inf", repr(time.time()))
            return await pipe.execute()

        with self._errors():
            counts = await _again_if_lost(count)
        return sum(int(c) for c in counts)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        count = _common.check_limit(limit)
        client = self._connected()
        with self._errors():
            entries = await _again_if_lost(
                lambda: client.lrange(self._layout.dead_letters, 0, count - 1)
            )
        return [_dead_letter(entry) for entry in entries]

    # -- fetching -----------------------------------------------------------------------------

    def _claim_args(self, names: tuple[str, ...], limit: int) -> list[Any]:
        """Arguments of the fetch script; its clock is the server's, corrected to ours."""
        foreign = ""
        if time.monotonic() >= self._next_foreign_scan:
            timeout = self._settings.foreign_visibility_timeout
            foreign = repr(timeout)
            self._next_foreign_scan = time.monotonic() + min(timeout / 4, _FOREIGN_SCAN_MAX)
        return [
            self._layout.prefix,
            self._layout.sep,
            f"@{self._clock_offset!r}",
            repr(self.options.visibility_timeout),
            str(limit),
            lease_token_base(),
            str(_BATCH),
            foreign,
            " ".join(map(str, self._layout.steps)),
            str(len(names)),
            *names,
            *(json.dumps(name) for name in names),
            str(self._settings.dead_letter_limit),
        ]

    async def _measure_clock(self, client: Any) -> None:
        """How far our clock is from the server's, so scripts can tell our time by TIME."""
        with self._errors(ConnectionError, "cannot read the server's clock: "):
            before = time.time()
            seconds, micros = await client.time()
            after = time.time()
        self._clock_offset = (before + after) / 2 - (seconds + micros / 1_000_000)
        self._clock_measured = time.monotonic()

    async def _claim(self, names: tuple[str, ...], limit: int) -> _common.Claimed:
        """Run the fetch script now."""
        taken = await self._take_fanout(names, limit)
        if len(taken) >= limit:
            return taken, None
        client = self._connected()
        if time.monotonic() - self._clock_measured > _CLOCK_REFRESH:
            await self._measure_clock(client)
        args = self._claim_args(names, limit - len(taken))
        reply = await self._claim_now(names, args)
        if reply is None:
            call = asyncio.ensure_future(self._script("claim", args))
            try:
                reply = cast("list[Any]", await asyncio.shield(call))
            except asyncio.CancelledError:
                # The script may still run and lease: give back what it took as soon as it
                # replies, rather than leaving it invisible until the leases run out.
                call.add_done_callback(lambda done: self._release_cancelled(done, names))
                raise
        deliveries, next_due = await self._claimed(reply, names)
        return taken + deliveries, next_due

    async def _claim_now(self, names: tuple[str, ...], args: list[Any]) -> list[Any] | None:
        """The fetch script's reply, its command written at once and its reply awaited with
        nothing in between (see :meth:`RedisPipe.send_now`); None where the script must go the
        usual way: the connection cannot take it at once, or the server does not know it.

        At once, so that it goes out ahead of the result writes queued later in the same turn of
        the loop, which the server would otherwise run first. If the fetch is cancelled while it
        waits, what the script leased is given back when its reply comes.
        """
        script = self._scripts["claim"]
        future = self._connected_pipe().send_now(
            ("EVALSHA", script.sha, 0, *args),
            orphan=lambda replies: self._release_leased(replies[0], names),
        )
        if future is None:
            return None
        with self._errors():
            try:
                (reply,) = await future
            except asyncio.CancelledError:
                if not future.cancelled() and future.exception() is None:
                    # Its reply came, but the cancellation came first: give back what it leased.
                    self._release_leased(future.result()[0], names)
                raise
            if isinstance(reply, ReplyError):
                if reply.code == "NOSCRIPT":  # it did not run: the usual way loads it first
                    return None
                raise reply
        return cast("list[Any]", reply)

    async def _wait_and_claim(
        self, names: tuple[str, ...], limit: int, key: str, wait: float, waiter: Waiter
    ) -> tuple[list[Delivery], float | None, bool]:
        """Wait up to ``wait`` s for ``key`` or a local wake-up, then claim; also say if woken.

        Blocking, the fetch script is queued on the blocking connection right behind the
        ``BLMOVE``: the server runs it the moment the wait ends, and the wake-up costs no second
        round trip.
        """
        if wait < _MIN_BLOCK or not self._can_unblock or self._block_lock.locked():
            woken = await waiter.wait(wait) if wait > 0 else False
            waiter.clear()
            deliveries, next_due = await self._claim(names, limit)
            return deliveries, next_due, woken
        stop = asyncio.Event()
        op = asyncio.ensure_future(self._blocked_claim(names, limit, key, wait, waiter, stop))
        try:
            reply, woken = await asyncio.shield(op)
        except asyncio.CancelledError:
            stop.set()  # end the wait now; what the script took is given back
            op.add_done_callback(lambda done: self._release_cancelled(done, names))
            raise
        if reply is None:
            deliveries, next_due = await self._claim(names, limit)
        else:
            deliveries, next_due = await self._claimed(reply, names)
            deliveries = await self._take_fanout(names, limit - len(deliveries)) + deliveries
        return deliveries, next_due, woken

    async def _blocked_claim(
        self,
        names: tuple[str, ...],
        limit: int,
        key: str,
        wait: float,
        waiter: Waiter,
        stop: asyncio.Event,
    ) -> tuple[list[Any] | None, bool]:
        """``BLMOVE key key RIGHT RIGHT`` then the fetch script, pipelined; ended on time.

        The BLMOVE returns once ``key`` is non-empty, consuming nothing (it moves the last item
        onto itself), or when ``CLIENT UNBLOCK`` ends it after ``wait`` seconds, after a local
        wake-up, or when the fetch is cancelled. Returns the script's reply (None after a
        NOSCRIPT: the caller claims again the usual way, which loads it) and whether the wait
        was ended by something arriving.
        """
        from redis.exceptions import NoScriptError, ResponseError

        async with self._block_lock:
            connection = await self._blocking_connection()
            client = self._connected()
            if connection is None:  # CLIENT is forbidden: poll
                woken = await waiter.wait(wait)
                waiter.clear()
                return None, woken
            timeout = wait + _BACKSTOP
            commands = [
                ("BLMOVE", key, key, "RIGHT", "RIGHT", f"{timeout:.3f}"),
                ("EVALSHA", self._scripts["claim"].sha, 0, *self._claim_args(names, limit)),
            ]
            replies: asyncio.Future[list[Any]] | None = None
            local = asyncio.ensure_future(waiter.wait(wait))
            stopped = asyncio.ensure_future(stop.wait())
            try:
                with self._errors():
                    await connection.send_packed_command(connection.pack_commands(commands))
                replies = asyncio.ensure_future(self._read_replies(connection, 2, timeout + 30))
                await asyncio.wait((replies, local, stopped), return_when=asyncio.FIRST_COMPLETED)
                woken = local.done() and local.result()
                waiter.clear()
                if not replies.done():
                    await self._unblock(replies)
                moved, reply = await replies
            except BaseException:
                if replies is not None:
                    replies.cancel()
                await self._drop_blocking()
                raise
            finally:
                local.cancel()
                stopped.cancel()
        if isinstance(moved, ResponseError):
            raise ConnectionError(f"Redis broker {self._describe}: BLMOVE {key!r}: {moved}")
        if isinstance(reply, NoScriptError):
            with self._errors():
                await client.script_load(scripts.CLAIM)
            return None, woken
        if isinstance(reply, ResponseError):
            raise ConnectionError(f"Redis broker {self._describe}: {reply}")
        return reply, moved is not None or woken

    async def _read_replies(self, connection: Any, count: int, timeout: float) -> list[Any]:
        """The next ``count`` replies of a pipeline; an error reply is returned, not raised."""
        from redis.exceptions import ResponseError

        replies: list[Any] = []
        with self._errors():
            for _ in range(count):
                try:
                    replies.append(await connection.read_response(timeout=timeout))
                except ResponseError as exc:
                    replies.append(exc)
        return replies

    async def _unblock(self, blocked: asyncio.Future[Any]) -> None:
        """End the BLMOVE now (CLIENT UNBLOCK), retrying while it has not reached the server."""
        client = self._connected()
        pause = 0.0005
        for _ in range(12):
            if blocked.done():
                return
            with self._errors():
                if await client.client_unblock(self._blocking_id):
                    return
            # Not blocked yet (the command is still on its way) or a stale id: try again.
            await asyncio.wait((blocked,), timeout=pause)
            pause = min(pause * 2, 0.05)
        self._blocking_id = None  # perhaps reconnected: ask again next time

    async def _blocking_connection(self) -> Any:
        """The connection BLMOVE uses (not shared with other commands), and its CLIENT ID."""
        client = self._connected()
        if self._blocking is None:
            with self._errors():
                self._blocking = await client.connection_pool.get_connection()
            self._blocking_id = None
        connection = self._blocking
        if self._blocking_id is None or not connection.is_connected:
            try:
                with self._errors():
                    if not connection.is_connected:
                        await connection.connect()
                    await connection.send_command("CLIENT", "ID")
                    self._blocking_id = int(await connection.read_response())
            except ConnectionError as exc:
                await self._drop_blocking()
                if _is_refusal(exc):
                    # ACLs forbid CLIENT: poll instead of blocking.
                    logger.warning("Redis refuses CLIENT ID (%s); fetches will poll", exc)
                    self._can_unblock = False
                    return None
                raise
        return connection

    async def _drop_blocking(self) -> None:
        connection, self._blocking = self._blocking, None
        self._blocking_id = None
        if connection is None:
            return
        await _quietly(connection.disconnect())
        if self._client is not None:
            await _quietly(self._client.connection_pool.release(connection))

    async def _claimed(
        self, reply: list[Any], names: tuple[str, ...]
    ) -> tuple[list[Delivery], float | None]:
        """Deliveries from a fetch script's reply; malformed messages are dead-lettered."""
        deliveries: list[Delivery] = []
        for at in range(1, len(reply), 3):
            queue = names[int(reply[at]) - 1]
            token = _text(reply[at + 1])
            raw = reply[at + 2]
            try:
                decoded = decode_envelope(parse_envelope(raw), queue)
            except MalformedEnvelope as exc:
                await self._dead_letter_malformed(_Lease(token, queue, raw), str(exc))
                continue
            deliveries.append(
                Delivery(
                    message=decoded.message,
                    queue=queue,
                    delivery_tag=token,
                    exchange=decoded.exchange,
                    routing_key=decoded.routing_key,
                    redelivered=decoded.redelivered,
                    delivery_count=decoded.delivery_count,
                    handle=_Lease(token, queue),
                )
            )
        return deliveries, (float(reply[0]) if reply[0] else None)

    def _release_cancelled(self, call: asyncio.Future[Any], names: tuple[str, ...]) -> None:
        """Give back, uncounted, what the fetch script of a cancelled fetch leased."""
        if call.cancelled() or call.exception() is not None:
            return
        result = call.result()
        self._release_leased(result[0] if isinstance(result, tuple) else result, names)

    def _release_leased(self, reply: Any, names: tuple[str, ...]) -> None:
        """Give back, uncounted, what a fetch script's ``reply`` leased (its fetch was cancelled)."""
        if not reply or isinstance(reply, ReplyError):
            return
        leases = [
            _Lease(_text(reply[at + 1]), names[int(reply[at]) - 1])
            for at in range(1, len(reply), 3)
        ]
        if not leases or self._client is None:
            return
        task = asyncio.ensure_future(self._hand_back("release", leases))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "could not release the leases of a cancelled fetch: %s", task.exception()
            )

    async def _hand_back(
        self, mode: str, leases: Sequence[_Lease], due: float | None = None
    ) -> None:
        args = [*self._base_args(time.time()), mode, "" if due is None else repr(due)]
        for lease in leases:
            args += [lease.token, lease.queue]
        touched = await self._script("hand_back", args, idempotent=True)
        _wakeups.notify(self._store_key, [_text(q) for q in touched])

    # -- fanout over pub/sub ------------------------------------------------------------------

    async def _subscribe_fanout(self, names: tuple[str, ...]) -> None:
        """Subscribe the fanout exchanges of the fetched queues that are not subscribed yet."""
        wanted = [
            exchange
            for exchange, queues in self._fanout_queues.items()
            if exchange not in self._subscribed and not queues.isdisjoint(names)
        ]
        if not wanted:
            return
        client = self._connected()
        patterns: list[str] = []
        for exchange in wanted:
            for pattern in self._layout.fanout_patterns(exchange):
                self._pattern_exchange[pattern.encode()] = exchange
                patterns.append(pattern)
        with self._errors():
            if self._pubsub is None:
                self._pubsub = client.pubsub()
            await self._pubsub.psubscribe(*patterns)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_fanout())
        # A message published before the server confirmed would be missed: wait for it.
        expected = {p.encode() for p in patterns}
        try:
            async with asyncio.timeout(5.0):
                while not expected <= self._confirmed:
                    self._confirm.clear()
                    await self._confirm.wait()
        except TimeoutError:
            raise ConnectionError(
                f"Redis broker {self._describe}: no confirmation of PSUBSCRIBE {patterns}"
            ) from None
        self._subscribed.update(wanted)
        for exchange in wanted:
            for queue in self._fanout_queues[exchange]:
                self._fanout_buffer.setdefault(queue, deque())

    async def _read_fanout(self) -> None:
        """Move fanout messages from the subscription into the buffers of the bound queues."""
        while self._pubsub is not None:
            pubsub = self._pubsub
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "fanout subscription of %s lost (%s); resubscribing", self._describe, exc
                )
                await asyncio.sleep(0.5)
                await self._resubscribe(pubsub)
                continue
            if message is None:
                continue
            kind = _text(message["type"])
            pattern = message.get("pattern") or message.get("channel")
            if kind == "psubscribe":
                self._confirmed.add(bytes(pattern))
                self._confirm.set()
            elif kind == "pmessage":
                exchange = self._pattern_exchange.get(bytes(pattern))
                if exchange is not None:
                    self._buffer_fanout(exchange, bytes(message["data"]))

    async def _resubscribe(self, broken: Any) -> None:
        client = self._client
        if client is None or self._pubsub is not broken:
            return
        await _quietly(broken.aclose())
        self._pubsub = client.pubsub()
        patterns = [p.decode() for p in self._pattern_exchange]
        try:
            await self._pubsub.psubscribe(*patterns)
        except Exception as exc:
            logger.warning("cannot resubscribe fanout channels of %s: %s", self._describe, exc)

    def _buffer_fanout(self, exchange: str, raw: bytes) -> None:
        touched = []
        for queue in self._fanout_queues.get(exchange, ()):
            buffer = self._fanout_buffer.get(queue)
            if buffer is None:
                continue
            if len(buffer) >= _FANOUT_BUFFER:
                buffer.popleft()
                logger.warning(
                    "fanout queue %r is not fetched fast enough; dropped a message", queue
                )
            buffer.append(raw)
            touched.append(queue)
        _wakeups.notify(self._store_key, touched)

    async def _take_fanout(self, names: tuple[str, ...], limit: int) -> list[Delivery]:
        """Fanout messages received for ``names`` (malformed ones go to the dead letters)."""
        taken: list[Delivery] = []
        for queue in names:
            buffer = self._fanout_buffer.get(queue)
            while buffer and len(taken) < limit:
                raw = buffer.popleft()
                try:
                    decoded = decode_envelope(parse_envelope(raw), queue)
                except MalformedEnvelope as exc:
                    await self._dead_letter_malformed(_Lease("", queue, raw), str(exc))
                    continue
                step = self._layout.step_for(decoded.message.priority)
                taken.append(
                    Delivery(
                        message=decoded.message,
                        queue=queue,
                        delivery_tag=f"celeriac-fanout:{secrets.token_hex(8)}",
                        exchange=decoded.exchange,
                        routing_key=decoded.routing_key,
                        redelivered=decoded.redelivered,
                        delivery_count=decoded.delivery_count,
                        handle=_Lease("", queue, raw, step),
                    )
                )
        return taken

    async def _push_front(self, lease: _Lease, raw: bytes) -> None:
        client = self._connected()
        with self._errors():
            await client.rpush(self._layout.bucket(lease.queue, lease.step), raw)
        _wakeups.notify(self._store_key, [lease.queue])

    # -- dead letters -------------------------------------------------------------------------

    async def _dead_letter_malformed(self, lease: _Lease, problem: str) -> None:
        """A list item celeriac cannot read: dead-letter it at once (nobody could run it)."""
        logger.warning("dead-lettered a malformed message from queue %r: %s", lease.queue, problem)
        await self._store_dead_letter(
            lease, f"malformed envelope: {problem}", lease.raw.decode("utf-8", "replace")
        )

    async def _store_dead_letter(self, lease: _Lease, reason: str, raw: str) -> None:
        client = self._connected()
        layout = self._layout
        entry: dict[str, Any] = {"queue": lease.queue, "reason": reason, "at": time.time()}
        try:
            entry["message"] = json.loads(raw)
        except ValueError:
            entry["message"] = raw
        with self._errors():
            pipe = client.pipeline(transaction=True)
            if lease.token:
                pipe.hdel(layout.unacked, lease.token)
                pipe.zrem(layout.unacked_index, lease.token)
                pipe.zrem(layout.leases(lease.queue), lease.token)
            pipe.lpush(layout.dead_letters, json.dumps(entry))
            pipe.ltrim(layout.dead_letters, 0, self._settings.dead_letter_limit - 1)
            await pipe.execute()


# -- helpers ----------------------------------------------------------------------------------


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, RespError, OSError)


async def _again_if_lost(command: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``command``, and once more if its connection turned out to be lost.

    Only for commands with the same effect however often they run (acks, renewals, hand-backs
    by token, reads): a pooled connection the server closed (a restart, ``CLIENT KILL``, an idle
    timeout) then costs nothing, while a publish or a fetch reports the loss to its caller.
    """
    from redis.exceptions import ConnectionError as LostConnection
    from redis.exceptions import TimeoutError as LostReply

    try:
        return await command()
    except (LostConnection, LostReply, OSError):
        return await command()


def _is_refusal(exc: BaseException) -> bool:
    """Whether the server refused a command (ACL, renamed command) rather than failed to answer."""
    from redis.exceptions import ResponseError

    return isinstance(exc.__cause__, ResponseError)


async def _quietly(awaitable: Any) -> None:
    with contextlib.suppress(Exception):
        await awaitable


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _lease(delivery: Delivery) -> _Lease:
    handle = delivery.handle
    if isinstance(handle, _Lease):
        return handle
    raise ImproperlyConfigured(
        f"delivery {delivery.delivery_tag!r} was not fetched from a Redis broker"
    )


def _by_queue(leases: Sequence[_Lease]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for lease in leases:
        grouped.setdefault(lease.queue, []).append(lease.token)
    return grouped


def _dead_letter(entry: bytes) -> DeadLetter:
    try:
        document = json.loads(entry)
        queue = str(document.get("queue", ""))
        reason = str(document.get("reason", ""))
        at = float(document.get("at", 0.0))
        stored = document.get("message")
    except (ValueError, TypeError, AttributeError):
        return DeadLetter("", _raw_message(entry), "unreadable dead-letter entry", 0.0)
    if isinstance(stored, dict):
        try:
            message = decode_envelope(stored, queue).message
        except MalformedEnvelope:
            message = _raw_message(json.dumps(stored).encode())
    else:
        message = _raw_message(str(stored).encode("utf-8", "replace"))
    return DeadLetter(queue=queue, message=message, reason=reason, dead_lettered_at=at)


def _raw_message(raw: bytes) -> TransportMessage:
    """A message celeriac could not read, kept as the bytes it was."""
    return TransportMessage(
        body=raw, content_type="application/octet-stream", content_encoding="binary"
    )
