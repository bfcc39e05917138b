"""Redis result store: ``redis://``, ``rediss://``, ``redis+socket://``, ``unix://``, ``sentinel://``.

Storage layout — byte for byte what Celery's Redis result backend keeps (celery-wire.md §6.3), so
a Celery client reads celeriac's results and celeriac reads Celery's::

    key      <global_keyprefix>celery-task-meta-<task_id>      a Redis string
    value    the result document encoded with ``result_serializer`` (json by default), nothing
             around it: the content type is not stored, a reader decodes with its own serializer
    expiry   ``result_expires`` (SETEX; PSETEX for a fraction of a second); no expiry when it is
             None or 0 (Celery's reading of 0)
    channel  the key's own name: every write PUBLISHes the same value on it, which is what wakes
             the waiting clients of Celery and celeriac alike

``global_keyprefix`` comes from ``result_backend_transport_options``; like Celery, an ``_`` is added
when it does not end in one of ``:_-.``.

Writes: one Lua script (:data:`STORE_SCRIPT`) writes a whole batch — ``store_many`` from the
worker's result pipeline is a single ``EVALSHA`` with every key of the batch, one round trip. For
each key the script reads the stored value and **refuses to replace a SUCCESS** (Celery does
``GET`` then ``SET`` from the client, with a window in between; here the check and the write are
atomic), then ``SETEX`` + ``PUBLISH``. To know whether a stored value is a SUCCESS the script:

* skips any value in which the text ``SUCCESS`` does not occur: every serializer writes that
  string as literal bytes (json only escapes non-ASCII, and a json value holding ``\\u`` escapes is
  decoded rather than skipped);
* decodes json (``cjson``, with a fast check of the ``{"status": "SUCCESS", …`` prefix json
  documents start with) and msgpack (``cmsgpack``) itself, choosing by the value's first byte, so
  a document written by Celery or by an app with another serializer is judged too;
* hands any other value back (pickle, yaml, xml, Celery 5.7 compressed results, anything cjson
  cannot parse). The store decodes it in Python — under ``result_accept_content``; a value it may
  not or cannot decode counts as not a success — and, if it is not a SUCCESS, writes again with the
  value's SHA-1 as a guard: the script then writes only if the value is still the one judged
  (compare-and-set), and otherwise hands back the new value. So the rule holds atomically for every
  serializer; it costs a second round trip only for a stored value that holds the text
``SUCCESS`` but that the script cannot decode.

Connections: writes and reads go over one pipelined connection (:mod:`celeriac.utils.resp`), named
``client_name``: any number of them in flight at once, each costing a fraction of a redis-py
command; they are sent again after a lost connection (writing the same document twice has the
same effect). Reads are ``GET``s; many concurrent readers (200 waiters woken at once) pipeline
theirs on that one connection. The content type of a value is the
configured serializer's, except when the bytes cannot be that serializer's and unmistakably are
another's (``{`` json, ``\\x80\\x02`` to ``\\x05`` pickle, ``\\x81`` to ``\\x8f``/``\\xde``/``\\xdf``
msgpack, ``<`` xml): then that type is used, so a pickle value is refused by a json-only reader
(``ContentDisallowed``, as from the stores that keep the content type) instead of being fed to the
json decoder. Celery 5.7 compressed values are decompressed first.

Not supported: Redis Cluster (a batch writes keys of many hash slots in one script).

Waiting (:meth:`RedisBackend.wait`) is pushed, never polled: each store instance has **one**
pub/sub connection (client name ``<client_name>:pubsub``) shared by all its waiters, opened on first
use. A waiter subscribes to its key's channel, waits for the subscription to be confirmed, and only
then reads the key, so a write between the read and the wait cannot be missed. Published documents
are decoded straight from the message. After the pub/sub connection is lost it is reopened, every
channel is subscribed again and every waiter reads its key again (a write during the gap was
published to nobody). As a last resort every waiter also reads its key every
:data:`FALLBACK_POLL_INTERVAL` seconds, so a lost message can delay a waiter but never hang it; a
``PING`` every :data:`PING_INTERVAL` seconds of silence finds a dead connection. Synchronous
callers (``result.get()`` from plain code) wait on their own thread instead, by the same rules,
over blocking RESP3 connections (:meth:`RedisBackend.wait_sync`).

``result_backend_transport_options``: ``global_keyprefix``, the connection options of
:mod:`celeriac.utils.redis_url` (``socket_timeout``, ``socket_connect_timeout``,
``socket_keepalive``, ``health_check_interval``, ``max_connections``, ``client_name``, ``ssl``,
``master_name`` and ``sentinel_kwargs`` for Sentinel); anything else is refused.

When the broker (RabbitMQ) keeps none, revoked task ids are kept in a stream
``<global_keyprefix>_celeriac.revoked`` of this database
(:mod:`celeriac.brokers._revocations_redis`).

Errors of the driver become :class:`celeriac.exceptions.ConnectionError` (authentication and ACL
refusals :class:`~celeriac.exceptions.ImproperlyConfigured`); a store whose Redis comes back works
again without being recreated.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from celeriac import codecs, states
from celeriac.backends.base import BackendOptions, ResultBackend, StoredPayload, pending_meta
from celeriac.brokers._ratelimit_redis import RedisRateLimiter
from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.exceptions import (
    ConnectionError,
    EncodeError,
    ImproperlyConfigured,
    TimeoutError,
)
from celeriac.utils.redis_url import (
    CONNECTION_OPTIONS,
    make_client,
    parse_redis_url,
    redis_module,
)
from celeriac.utils.resp import ConnectionLost, RedisPipe, ReplyError, RespError, backoff, pack
from celeriac.utils.resp_sync import (
    RESP3_AVAILABLE,
    PushNotification,
    Resp3Refused,
    SyncConnection,
    SyncPool,
)
from celeriac.utils.suggest import did_you_mean

if TYPE_CHECKING:
    import redis.asyncio
    from redis.asyncio.connection import AbstractConnection

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

#: Celery's task key prefix (``BaseKeyValueStoreBackend.task_keyprefix``).
TASK_KEY_PREFIX = "celery-task-meta-"

#: A waiter reads its key at least this often (seconds), whatever pub/sub says.
FALLBACK_POLL_INTERVAL = 2.0

#: Seconds of silence on the pub/sub connection after which it is PINGed; no reply within as long
#: again and the connection is reopened.
PING_INTERVAL = 10.0

#: Keys written by one script call; a larger batch is split into calls sent in one pipeline.
MAX_KEYS_PER_CALL = 500

#: Times an idempotent command (a result write, a read) is sent again after a lost connection.
_RETRIES = 3

#: Rounds of compare-and-set before giving up on a key that other writers keep changing.
MAX_WRITE_ROUNDS = 16

#: Redis refuses strings longer than this (Celery checks the same limit before writing).
MAX_VALUE_SIZE = 512 * 1024 * 1024

#: Client name of the store's connections unless the ``client_name`` option says otherwise; the
#: pub/sub connection is named ``<client_name>:pubsub``.
DEFAULT_CLIENT_NAME = "celeriac-results"

#: The options this store takes besides the connection options of ``parse_redis_url``.
STORE_OPTIONS = ("global_keyprefix",)

#: Every transport option this store understands, for error messages.
KNOWN_OPTIONS = sorted(
    {*STORE_OPTIONS, *CONNECTION_OPTIONS, "ssl", "master_name", "sentinel_kwargs"}
)

#: Options that exist but do not apply to every kind of URL.
_ONLY_FOR = {
    "master_name": "sentinel:// URLs",
    "sentinel_kwargs": "sentinel:// URLs",
    "ssl": "rediss:// and sentinel:// URLs",
}

# KEYS: the result keys. ARGV[1]: expiry in milliseconds ("0": keep forever); then for KEYS[i]
# ARGV[2i] is the value to store and ARGV[2i+1] its guard: "" = decide here whether the stored value
# is a SUCCESS; else the SHA-1 of the stored value the caller judged not to be one (compare-and-set).
# Returns, for each key: 1 written (and published), 0 refused (a SUCCESS is stored), or the stored
# value when the script cannot tell (or the guarded value changed): the caller decides and retries.
STORE_SCRIPT = r"""
local ttl = tonumber(ARGV[1])

-- 'SUCCESS', '' (another state, or not a result document) or nil (cannot tell here).
local function status_of(value)
  local first = string.byte(value, 1)
  if not string.find(value, 'SUCCESS', 1, true) then
    if first == 0 then return nil end  -- compressed (Celery 5.7 result_compression)
    if first ~= 123 or not string.find(value, '\\u', 1, true) then return '' end
  end
  local ok, doc
  if first == 123 then  -- '{': json
    if string.sub(value, 1, 21) == '{"status": "SUCCESS",' then return 'SUCCESS' end
    ok, doc = pcall(cjson.decode, value)
  elseif (first >= 0x81 and first <= 0x8f) or first == 0xde or first == 0xdf then  -- msgpack map
    ok, doc = pcall(cmsgpack.unpack, value)
  else
    return nil
  end
  if not ok then return nil end
  if type(doc) == 'table' and type(doc['status']) == 'string' then return doc['status'] end
  return ''
end

local replies = {}
for i, key in ipairs(KEYS) do
  local value, guard = ARGV[2 * i], ARGV[2 * i + 1]
  local current = redis.pcall('GET', key)
  if type(current) == 'table' then current = false end  -- not a string: SET replaces it
  local reply = 1
  if current then
    if guard ~= '' then
      if redis.sha1hex(current) ~= guard then reply = current end
    else
      local status = status_of(current)
      if status == 'SUCCESS' then reply = 0 elseif status == nil then reply = current end
    end
  end
  if reply == 1 then
    if ttl <= 0 then
      redis.call('SET', key, value)
    elseif ttl % 1000 == 0 then
      redis.call('SETEX', key, math.floor(ttl / 1000), value)
    else
      redis.call('PSETEX', key, ttl, value)
    end
    redis.call('PUBLISH', key, value)
  end
  replies[i] = reply
end
return replies
"""

_JSON = "application/json"
_PICKLE = "application/x-python-serialize"
_MSGPACK = "application/x-msgpack"
_XML = "application/xml"


def _sniff(data: bytes) -> str | None:
    """The content type ``data`` unmistakably has, or None when its bytes do not say."""
    if not data:
        return None
    first = data[0]
    if first == 0x7B:  # "{"
        return _JSON
    if first == 0x80 and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _PICKLE
    if 0x81 <= first <= 0x8F or first in (0xDE, 0xDF):
        return _MSGPACK
    if first == 0x3C:  # "<"
        return _XML
    return None


def key_prefix(transport_options: dict[str, Any]) -> str:
    """``<global_keyprefix>celery-task-meta-`` as Celery builds it."""
    prefix = transport_options.get("global_keyprefix")
    if prefix is None or prefix == "":
        return TASK_KEY_PREFIX
    if not isinstance(prefix, str):
        raise ImproperlyConfigured(f"global_keyprefix must be a string, got {prefix!r}")
    if prefix[-1] not in ":_-.":
        prefix += "_"
    return prefix + TASK_KEY_PREFIX


class _DriverErrors:
    """redis-py's exception classes, imported once the redis package is known to be there."""

    def __init__(self) -> None:
        import redis.exceptions as errors

        self.any: type[Exception] = errors.RedisError
        self.config: tuple[type[Exception], ...] = (
            errors.AuthenticationError,
            errors.AuthorizationError,
            errors.NoPermissionError,
        )


# -- waiting ---------------------------------------------------------------------------------------


class _Waiter:
    """One ``wait()`` in progress: woken by a published document or told to read the key."""

    __slots__ = ("event", "payload", "resync")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        #: The newest document published on the channel since the waiter last looked.
        self.payload: bytes | None = None
        #: The waiter must read the key: its subscription was (re)confirmed, or it timed out.
        self.resync = True

    def push(self, payload: bytes) -> None:
        self.payload = payload
        self.event.set()

    def nudge(self) -> None:
        self.resync = True
        self.event.set()

    def take(self) -> bytes | None:
        """The published document to look at, or None when the key must be read instead."""
        self.event.clear()
        payload, resync = self.payload, self.resync
        self.payload = None
        self.resync = False
        return None if resync else payload


class _Channel:
    """Subscription state of one channel on the current pub/sub connection."""

    __slots__ = ("acked", "active", "requested", "sent", "waiters")

    def __init__(self) -> None:
        self.waiters: set[_Waiter] = set()
        #: Someone waits on the channel: it should be subscribed.
        self.active = False
        #: The last command sent for it on this connection was SUBSCRIBE (not UNSUBSCRIBE).
        self.requested = False
        #: SUBSCRIBE commands sent on this connection, and confirmations received. Confirmed means
        #: every SUBSCRIBE sent has been answered: an older answer cannot confirm a newer request.
        self.sent = 0
        self.acked = 0

    @property
    def confirmed(self) -> bool:
        return self.active and self.requested and self.acked >= self.sent

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiters and self.acked >= self.sent


async def _pass_through(response: Any) -> Any:
    # redis-py's default handler of pushed replies logs each one with str() of the whole message,
    # whatever the log level; a result can be large.
    return response


class _Listener:
    """The one pub/sub connection of a store instance, shared by all its waiters.

    A supervisor task owns the connection: it connects, subscribes every active channel, reads
    messages and hands each to the waiters of its channel; when the connection fails it connects
    again (backing off) for as long as anyone waits, and stops when nobody does. Subscriptions
    and unsubscriptions asked for in between are sent in batches by a flush task.
    """

    def __init__(self, client: redis.asyncio.Redis, describe: str, errors: _DriverErrors) -> None:
        self._client = client
        self._describe = describe
        self._errors = errors
        self._channels: dict[bytes, _Channel] = {}
        #: Channels whose wanted state changed since commands were last sent.
        self._dirty: set[bytes] = set()
        #: The connection while it is up and every active channel has been asked for.
        self._conn: AbstractConnection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False

    # -- for waiters -------------------------------------------------------------------------------

    def add(self, channel: bytes) -> _Waiter:
        """Register a waiter on ``channel``; its event is set once the subscription is confirmed."""
        if self._closed:
            raise ConnectionError(f"result store {self._describe} is closed")
        waiter = _Waiter()
        entry = self._channels.get(channel)
        if entry is None:
            entry = self._channels[channel] = _Channel()
        entry.waiters.add(waiter)
        if entry.confirmed:
            waiter.event.set()
        elif not entry.active:
            entry.active = True
            self._changed(channel)
        # else: a SUBSCRIBE is on its way; its confirmation wakes this waiter.
        return waiter

    def leave(self, channel: bytes, waiter: _Waiter) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            return
        entry.waiters.discard(waiter)
        if not entry.waiters:
            entry.active = False
            self._changed(channel)

    @property
    def connection(self) -> AbstractConnection | None:
        """The pub/sub connection while it is up (for tests and inspection)."""
        return self._conn

    # -- bookkeeping -------------------------------------------------------------------------------

    def _changed(self, channel: bytes) -> None:
        self._dirty.add(channel)
        if self._closed:
            return
        if self._conn is not None:
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
        elif self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _flush(self) -> None:
        """Send SUBSCRIBE / UNSUBSCRIBE for the channels whose wanted state changed."""
        try:
            while self._dirty and not self._closed:
                async with self._send_lock:
                    conn = self._conn
                    if conn is None:  # the supervisor subscribes everything when it reconnects
                        return
                    subscribe: list[bytes] = []
                    unsubscribe: list[bytes] = []
                    for channel in self._dirty:
                        entry = self._channels.get(channel)
                        if entry is None:
                            continue
                        if entry.active and not entry.requested:
                            entry.requested = True
                            entry.sent += 1
                            subscribe.append(channel)
                        elif not entry.active and entry.requested:
                            entry.requested = False
                            unsubscribe.append(channel)
                        if entry.idle:
                            del self._channels[channel]
                    self._dirty.clear()
                    commands: list[tuple[Any, ...]] = []
                    if subscribe:
                        commands.append(("SUBSCRIBE", *subscribe))
                    if unsubscribe:
                        commands.append(("UNSUBSCRIBE", *unsubscribe))
                    if commands:
                        try:
                            await conn.send_packed_command(
                                conn.pack_commands(commands), check_health=False
                            )
                        except (self._errors.any, OSError) as exc:
                            # The supervisor's read fails too and starts over on a new connection.
                            logger.debug("pub/sub send to %s failed: %r", self._describe, exc)
                            return
        finally:
            self._flusher = None
            if self._dirty and self._conn is not None and not self._closed:
                self._flusher = asyncio.get_running_loop().create_task(self._flush())

    def _confirmed(self, channel: bytes) -> None:
        entry = self._channels.get(channel)
        if entry is None:
            return
        entry.acked += 1
        if entry.confirmed:
            # Whatever was published before the subscription took effect was missed: every
            # waiter reads the key once now.
            for waiter in entry.waiters:
                waiter.nudge()
        elif entry.idle:
            del self._channels[channel]

    def _published(self, channel: bytes, payload: bytes) -> None:
        entry = self._channels.get(channel)
        if entry is not None:
            for waiter in entry.waiters:
                waiter.push(payload)

    def _nudge_all(self) -> None:
        for entry in self._channels.values():
            for waiter in entry.waiters:
                waiter.nudge()

    # -- the connection ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = 0.05
        failures = 0
        try:
            while not self._closed and any(e.active for e in self._channels.values()):
                try:
                    conn = await self._open()
                except (self._errors.any, OSError) as exc:
                    failures += 1
                    logger.log(
                        logging.WARNING if failures == 1 else logging.DEBUG,
                        "result store %s: pub/sub connection failed (%s); retrying in %.2fs",
                        self._describe,
                        exc,
                        delay,
                    )
                    # Waiters read their keys now: they see the state, or the error.
                    self._nudge_all()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                failures = 0
                opened_at = time.monotonic()
                try:
                    await self._read(conn)
                except (self._errors.any, OSError) as exc:
                    if not self._closed:
                        logger.info(
                            "result store %s: pub/sub connection lost (%s); reconnecting",
                            self._describe,
                            exc,
                        )
                finally:
                    self._conn = None
                    await self._release(conn)
                if time.monotonic() - opened_at < 1.0:
                    # Lost as soon as made (e.g. SUBSCRIBE refused by an ACL): back off rather
                    # than spin; a connection that lived a while is reopened at once.
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                else:
                    delay = 0.05
        finally:
            self._supervisor = None
            if not self._closed and any(e.active for e in self._channels.values()):
                # Activated after the loop's last check (only possible if that check awaited).
                self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _open(self) -> AbstractConnection:
        pool = self._client.connection_pool
        conn: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            parser = getattr(conn, "_parser", None)
            if parser is not None and hasattr(parser, "set_pubsub_push_handler"):
                parser.set_pubsub_push_handler(_pass_through)
            async with self._send_lock:
                # A new connection has no subscriptions: start the bookkeeping over.
                channels: list[bytes] = []
                for channel, entry in list(self._channels.items()):
                    entry.sent = entry.acked = 0
                    entry.requested = entry.active
                    if entry.active:
                        entry.sent = 1
                        channels.append(channel)
                    elif not entry.waiters:
                        del self._channels[channel]
                self._dirty.clear()
                if channels:
                    await conn.send_command("SUBSCRIBE", *channels, check_health=False)
                self._conn = conn
        except BaseException:
            await self._release(conn)
            raise
        if self._dirty and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return conn

    async def _release(self, conn: AbstractConnection) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self._client.connection_pool.release(conn)

    async def _read(self, conn: AbstractConnection) -> None:
        awaiting_pong = False
        while not self._closed:
            reply = await conn.read_response(timeout=PING_INTERVAL, push_request=True)
            if reply is None:  # silence
                if awaiting_pong:
                    raise OSError(f"no reply to PING within {PING_INTERVAL}s")
                async with self._send_lock:
                    await conn.send_command("PING", check_health=False)
                awaiting_pong = True
                continue
            awaiting_pong = False
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if kind == b"message" and len(reply) == 3:
                    self._published(reply[1], reply[2])
                elif kind == b"subscribe" and len(reply) == 3:
                    self._confirmed(reply[1])
                # unsubscribe confirmations and PING replies need nothing

    async def close(self) -> None:
        self._closed = True
        for task in (self._flusher, self._supervisor):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._flusher = self._supervisor = None
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._release(conn)
        # Waiters still here read their key and learn the store is closed.
        self._nudge_all()


# -- the store -------------------------------------------------------------------------------------


class RedisBackend(ResultBackend):
    """Result store on Redis, with Celery's keys and values; waits are woken by pub/sub."""

    pushes = True

    def __init__(self, url: str, options: BackendOptions) -> None:
        super().__init__(url, options)
        redis_module()  # a clear error when the redis package is missing
        self._errors = _DriverErrors()
        raw = dict(options.transport_options)
        self.target, rest = parse_redis_url(url, raw, role="result store")
        self.prefix = key_prefix(rest)
        self._prefix_bytes = self.prefix.encode("utf-8")
        rest.pop("global_keyprefix", None)
        if rest:
            self._refuse(sorted(rest))
        self.client_name = str(self.target.connection.get("client_name") or DEFAULT_CLIENT_NAME)
        expires = options.expires
        #: Expiry in milliseconds; 0 keeps results forever (None or 0 configured, as in Celery).
        self._ttl_ms = 0 if not expires else max(1, round(expires * 1000))
        self._ttl_arg = str(self._ttl_ms).encode()
        # Encoding a document checks the serializer at once (unknown or missing dependency) and
        # gives the content type and encoding stored values are read with.
        probe = self.encode_meta({"status": states.PENDING, "task_id": ""})
        self._content_type = probe.content_type
        self._content_encoding = probe.content_encoding
        self._client: redis.asyncio.Redis | None = None
        #: The connection of result writes and reads (see celeriac.utils.resp): pipelined, and
        #: several times cheaper per command than redis-py's client.
        self._pipe: RedisPipe | None = None
        self._listener: _Listener | None = None
        self._script_sha = hashlib.sha1(STORE_SCRIPT.encode(), usedforsecurity=False).hexdigest()
        #: Blocking RESP3 connections of synchronous callers (get_sync, wait_sync).
        self._sync_pool: SyncPool | None = None
        self._sync_lock = threading.Lock()

    def _refuse(self, names: list[str]) -> NoReturn:
        name = names[0]
        if name in _ONLY_FOR:
            raise ImproperlyConfigured(
                f"the result_backend_transport_options option {name!r} only applies to "
                f"{_ONLY_FOR[name]}, not to {self.target.describe()}"
            )
        raise ImproperlyConfigured(
            f"unknown result_backend_transport_options {names} for the Redis result store."
            f"{did_you_mean(name, KNOWN_OPTIONS)} Known options: {', '.join(KNOWN_OPTIONS)}"
        )

    # -- connect / close ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialWithJitterBackoff

        # A few quick retries ride out a dropped idle connection; a Redis that is really gone
        # is reported within about a second instead of redis-py's default of several.
        def retry() -> Retry:
            return Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), retries=3)

        client = make_client(self.target, client_name=self.client_name, retry=retry())
        listener_client = make_client(
            self.target, client_name=f"{self.client_name}:pubsub", retry=retry()
        )
        pipe = RedisPipe(self.target, client_name=self.client_name)
        try:
            with self._translate("connect"):
                await pipe.connect()
                await pipe.call("SCRIPT", "LOAD", STORE_SCRIPT)
        except BaseException:
            pipe.close()
            await client.aclose()
            await listener_client.aclose()
            raise
        self._client = client
        self._pipe = pipe
        self._listener = _Listener(listener_client, self.target.describe(), self._errors)

    async def close(self) -> None:
        client, listener, pipe = self._client, self._listener, self._pipe
        self._client = self._listener = self._pipe = None
        if pipe is not None:
            pipe.close()
        if listener is not None:
            await listener.close()
            with contextlib.suppress(Exception):
                await listener._client.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    def _connected(self) -> redis.asyncio.Redis:
        client = self._client
        if client is None:
            raise ConnectionError(f"result store {self.target.describe()} is not connected")
        return client

    def _connected_pipe(self) -> RedisPipe:
        pipe = self._pipe
        if pipe is None:
            raise ConnectionError(f"result store {self.target.describe()} is not connected")
        return pipe

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """Turn redis-py's errors into celeriac's, naming the store and the operation."""
        try:
            yield
        except self._errors.config as exc:
            raise ImproperlyConfigured(
                f"result store {self.target.describe()} refused {what}: {exc}"
            ) from exc
        except ReplyError as exc:
            if exc.refused:
                raise ImproperlyConfigured(
                    f"result store {self.target.describe()} refused {what}: {exc}"
                ) from exc
            raise ConnectionError(
                f"result store {self.target.describe()}: {what} failed: {exc}"
            ) from exc
        except (self._errors.any, RespError, OSError) as exc:
            raise ConnectionError(
                f"result store {self.target.describe()}: {what} failed: {exc}"
            ) from exc

    # -- keys and values ---------------------------------------------------------------------------

    def key(self, task_id: str) -> bytes:
        """The Redis key (and pub/sub channel) of ``task_id``'s result."""
        if not task_id:
            raise ValueError("task_id must not be empty")
        return self._prefix_bytes + task_id.encode("utf-8")

    def _payload(self, data: bytes) -> StoredPayload:
        """A stored value as a payload with the content type it is read with."""
        data = codecs.decompress_payload(data)
        sniffed = _sniff(data)
        if sniffed is None or sniffed == self._content_type:
            return StoredPayload(data, self._content_type, self._content_encoding)
        encoding = "utf-8" if sniffed in (_JSON, _XML) else "binary"
        return StoredPayload(data, sniffed, encoding)

    def _is_success(self, data: bytes) -> bool:
        """Whether a stored value the write script handed back is a SUCCESS document.

        A value this store may not (``result_accept_content``) or cannot decode is not one: it
        could not be read back as a success either.
        """
        try:
            meta = self.decode_meta(self._payload(data))
        except Exception:  # DecodeError, ContentDisallowed, or a decoder's own failure
            return False
        return meta.get("status") == states.SUCCESS

    # -- primitives --------------------------------------------------------------------------------

    async def _write(
        self, task_id: str, status: str, payload: StoredPayload, expires_at: float | None
    ) -> None:
        await self._write_values([(self.key(task_id), payload.data)])

    async def store(self, meta: dict[str, Any]) -> None:
        await self._write_values([(self.key(meta["task_id"]), self.encode_meta(meta).data)])

    async def store_many(self, metas: Sequence[dict[str, Any]]) -> None:
        """Store several documents in one round trip (one script call per 500 keys, pipelined).

        Same rules as :meth:`store` for each; a SUCCESS already stored is kept.
        """
        if not metas:
            return
        dumps, serializer, prefix = codecs.dumps_data, self.options.serializer, self._prefix_bytes
        keys: list[bytes] = []
        values: list[bytes] = []
        for meta in metas:
            task_id = meta["task_id"]
            if not task_id:
                raise ValueError("task_id must not be empty")  # what key() refuses
            keys.append(prefix + task_id.encode("utf-8"))
            values.append(dumps(meta, serializer))
        await self._write_all(keys, values)

    async def _write_values(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        await self._write_all([key for key, _ in items], [value for _, value in items])

    async def _write_all(self, keys: list[bytes], values: list[bytes]) -> None:
        """Write ``values[i]`` under ``keys[i]``, never replacing a SUCCESS."""
        for key, value in zip(keys, values, strict=True):
            if len(value) > MAX_VALUE_SIZE:
                raise EncodeError(
                    f"result for {key.decode('utf-8', 'replace')} is {len(value)} bytes; "
                    f"Redis stores at most {MAX_VALUE_SIZE} bytes in one value"
                )
        # The first round judges every stored value in the script (no guards).
        replies = await self._run_script(keys, values, None)
        pending = [index for index, reply in enumerate(replies) if isinstance(reply, bytes)]
        rounds = 1
        while pending:
            # The script could not tell whether these stored values are a SUCCESS: judge them
            # here, then write those that are not, guarded by the value judged.
            guards: list[bytes] = []
            retry: list[int] = []
            for index in pending:
                reply = replies[index]
                if self._is_success(reply):
                    continue
                guards.append(hashlib.sha1(reply, usedforsecurity=False).hexdigest().encode())
                retry.append(index)
            if not retry:
                return
            if rounds >= MAX_WRITE_ROUNDS:
                raise ConnectionError(
                    f"result store {self.target.describe()}: the results of "
                    f"{[keys[i].decode('utf-8', 'replace') for i in retry][:5]} kept changing "
                    f"under {MAX_WRITE_ROUNDS} attempts to write them"
                )
            answers = await self._run_script(
                [keys[i] for i in retry], [values[i] for i in retry], guards
            )
            rounds += 1
            pending = []
            for index, reply in zip(retry, answers, strict=True):
                replies[index] = reply
                if isinstance(reply, bytes):
                    pending.append(index)

    async def _run_script(
        self, keys: Sequence[bytes], values: Sequence[bytes], guards: Sequence[bytes] | None
    ) -> list[Any]:
        """Run :data:`STORE_SCRIPT` over keys, values and guards (none: every guard empty);
        one reply per key."""
        pipe = self._connected_pipe()
        ttl = self._ttl_arg
        calls: list[tuple[Any, ...]] = []
        for start in range(0, len(keys), MAX_KEYS_PER_CALL):
            chunk = keys[start : start + MAX_KEYS_PER_CALL]
            call: list[Any] = ["EVALSHA", self._script_sha, len(chunk), *chunk, ttl]
            chunk_values = values[start : start + MAX_KEYS_PER_CALL]
            if guards is None:
                for value in chunk_values:
                    call += (value, b"")
            else:
                for value, guard in zip(
                    chunk_values, guards[start : start + len(chunk)], strict=True
                ):
                    call += (value, guard)
            calls.append(tuple(call))
        with self._translate("storing results"):
            # Writing the same documents again has the same effect: re-sent after a lost
            # connection, with a short backoff that rides out a dropped idle connection.
            replies = await pipe.execute(calls, retries=_RETRIES)
            if any(isinstance(r, ReplyError) and r.code == "NOSCRIPT" for r in replies):
                # Redis restarted or its script cache was flushed: load the script again. The
                # calls that ran anyway wrote what they would write again.
                sha = await pipe.call("SCRIPT", "LOAD", STORE_SCRIPT, retries=_RETRIES)
                self._script_sha = sha.decode() if isinstance(sha, bytes) else str(sha)
                calls = [(call[0], self._script_sha, *call[2:]) for call in calls]
                replies = await pipe.execute(calls, retries=_RETRIES)
            for reply in replies:
                if isinstance(reply, ReplyError):
                    raise reply
        if len(replies) == 1:
            return list(replies[0])
        return [value for chunk in replies for value in chunk]

    async def _read(self, task_id: str) -> StoredPayload | None:
        pipe = self._connected_pipe()
        with self._translate("reading results"):
            # Concurrent readers (200 waiters woken at once) pipeline their GETs on the one
            # connection: no connection each, no round trip each.
            value = await pipe.call("GET", self.key(task_id), retries=_RETRIES)
        return None if value is None else self._payload(value)

    async def _read_many(self, task_ids: Sequence[str]) -> list[StoredPayload | None]:
        """``MGET`` of :data:`MAX_KEYS_PER_CALL` keys at a time (a group's results)."""
        client = self._connected()
        keys = [self.key(task_id) for task_id in task_ids]
        values: list[Any] = []
        with self._translate("reading results"):
            for start in range(0, len(keys), MAX_KEYS_PER_CALL):
                values += await client.mget(keys[start : start + MAX_KEYS_PER_CALL])
        return [
            None
            if value is None
            else self._payload(value.encode("utf-8") if isinstance(value, str) else value)
            for value in values
        ]

    async def _delete(self, task_id: str) -> None:
        client = self._connected()
        with self._translate("deleting a result"):
            await client.delete(self.key(task_id))

    def rate_limiter(self) -> RateLimiterStore:
        """Limits kept under ``<global_keyprefix>_celeriac.rate_limit.*`` keys, one script per
        grant (see :mod:`celeriac.brokers._ratelimit_redis`); the prefix is the broker's form of
        ``global_keyprefix``, so a broker and a result store on one Redis agree on the keys."""
        prefix = dict(self.options.transport_options).get("global_keyprefix") or ""
        return RedisRateLimiter(
            self._connected, str(prefix), f"the Redis result store {self.target.describe()}"
        )

    # -- waiting -----------------------------------------------------------------------------------

    def _listening(self) -> _Listener:
        self._connected()
        listener = self._listener
        assert listener is not None
        return listener

    async def _wait_for_change(self, task_id: str, timeout: float) -> None:
        """Return when a document is published for ``task_id``, or after ``timeout``."""
        channel = self.key(task_id)
        listener = self._listening()
        waiter = listener.add(channel)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await waiter.event.wait()
                    if waiter.take() is not None:  # not just the subscription's confirmation
                        return
        except builtins.TimeoutError:
            return
        finally:
            listener.leave(channel, waiter)

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        states_wanted: Collection[str] = states.READY_STATES,
    ) -> dict[str, Any]:
        """Wait until the task reaches one of ``states_wanted``; return its document.

        Woken by pub/sub (see the module's documentation); ``interval`` is not used, the key is
        read again every :data:`FALLBACK_POLL_INTERVAL` seconds only in case a message was lost.
        Raises :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.key(task_id)
        listener = self._listening()
        waiter = listener.add(channel)
        try:
            while True:
                if not waiter.event.is_set():
                    pause = FALLBACK_POLL_INTERVAL
                    if deadline is not None:
                        pause = max(0.0, min(pause, deadline - time.monotonic()))
                    try:
                        async with asyncio.timeout(pause):
                            await waiter.event.wait()
                    except builtins.TimeoutError:
                        waiter.resync = True
                payload = waiter.take()
                if payload is None:
                    meta = await self.get(task_id)
                else:
                    meta = self.decode_meta(self._payload(payload))
                if meta["status"] in states_wanted:
                    return meta
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"The operation timed out waiting for task {task_id}.")
        finally:
            listener.leave(channel, waiter)

    # -- synchronous callers -----------------------------------------------------------------------

    # ``AsyncResult.get()`` and ``.state`` from synchronous code read and wait here, on the caller's
    # thread, over blocking connections (celeriac.utils.resp_sync) rather than through another
    # thread's event loop. They speak RESP3, where a connection subscribed to a channel may still
    # run commands: a waiter sends SUBSCRIBE and GET together, and the server runs the GET after
    # the subscription took effect, so nothing published after the read is missed, in one round
    # trip. No connect() is needed; any number of threads may wait at once, each on a connection
    # of its own, kept for the next waiter (which unsubscribes the last one's channel).

    def get_sync(self, task_id: str) -> dict[str, Any] | None:
        """:meth:`get` for synchronous callers; None if the server refuses RESP3 (see above)."""
        pool = self._sync_connections()
        if pool is None:
            return None
        key = self.key(task_id)
        try:
            with self._translate_sync(pool, "reading results"):
                value = pool.call("GET", key, retries=_RETRIES if pool.ever_connected else 0)
        except Resp3Refused:
            return None
        return pending_meta(task_id) if value is None else self.decode_meta(self._payload(value))

    def wait_sync(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        states_wanted: Collection[str] = states.READY_STATES,
    ) -> dict[str, Any] | None:
        """:meth:`wait` for synchronous callers; None if the server refuses RESP3.

        The same rules as :meth:`wait`: woken by the published document; the key is read again
        every :data:`FALLBACK_POLL_INTERVAL` seconds in case a message was lost, and once more
        when ``timeout`` is up before :class:`celeriac.exceptions.TimeoutError` is raised. A
        connection lost while waiting is replaced (subscribe and read again); after
        :data:`_RETRIES` losses in a row without a read in between, the error is raised.
        """
        pool = self._sync_connections()
        if pool is None:
            return None
        key = self.key(task_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        lost = 0
        while True:
            try:
                with self._translate_sync(pool, "reading results"):
                    try:
                        connection = pool.acquire()
                    except ConnectionLost as exc:
                        if not pool.ever_connected:
                            raise  # as the asyncio store's connect(): at once, no retries
                        raise _Lost from exc
                    try:
                        meta = self._wait_on(connection, task_id, key, deadline, states_wanted)
                    except TimeoutError:
                        # Raised with every reply read: the connection is clean.
                        connection.stale_channels.append(key)
                        pool.release(connection)
                        raise
                    except BaseException:
                        pool.discard(connection)
                        raise
                    pool.release(connection)
                    return meta
            except Resp3Refused:
                return None
            except _Lost as exc:
                if exc.waited:
                    lost = 0  # that connection served a while: count this loss afresh
                if lost >= _RETRIES:
                    raise ConnectionError(
                        f"result store {self.target.describe()}: reading results failed: "
                        f"{exc.__cause__ or exc}"
                    ) from exc.__cause__
                time.sleep(backoff(lost))
                lost += 1

    def _wait_on(
        self,
        connection: SyncConnection,
        task_id: str,
        key: bytes,
        deadline: float | None,
        states_wanted: Collection[str],
    ) -> dict[str, Any]:
        """Subscribe to ``key``'s channel and read it, then wait on ``connection`` for a wanted
        state; leaves every reply read. A lost connection raises :class:`_Lost`."""
        # GETs whose reply has not come yet; messages before the first one are not looked at:
        # that GET ran after them and reads what they carried, or newer.
        gets = 1
        read = False
        try:
            connection.write(pack([("SUBSCRIBE", key), ("GET", key)]))
            while True:
                if gets:
                    frame = connection.read()
                else:
                    left = FALLBACK_POLL_INTERVAL
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(
                                f"The operation timed out waiting for task {task_id}."
                            )
                        left = min(left, FALLBACK_POLL_INTERVAL)
                    frame = connection.read_within(left)
                    if frame is False:
                        # Nothing published for a while, or the time is up: read the key (a
                        # lost message, or the last look before giving up).
                        connection.write(pack([("GET", key)]))
                        gets += 1
                        continue
                if type(frame) is PushNotification:
                    if not read or len(frame) != 3 or frame[0] != b"message" or frame[1] != key:
                        continue  # subscription confirmations, other channels' messages
                    meta = self.decode_meta(self._payload(frame[2]))
                else:
                    gets -= 1
                    read = True
                    if isinstance(frame, ReplyError):
                        raise frame
                    meta = (
                        pending_meta(task_id)
                        if frame is None
                        else self.decode_meta(self._payload(frame))
                    )
                if meta["status"] in states_wanted:
                    if gets:
                        # A poll's reply is still on its way: rather than wait for it, the
                        # connection is closed (and not kept for the next waiter).
                        connection.close()
                    connection.stale_channels.append(key)
                    return meta
        except ConnectionLost as exc:
            raise _Lost(waited=read) from exc

    def close_sync(self) -> None:
        """Close the connections of synchronous callers (made again on next use)."""
        with self._sync_lock:
            pool, self._sync_pool = self._sync_pool, None
        if pool is not None:
            pool.close()

    def _sync_connections(self) -> SyncPool | None:
        """The pool of blocking RESP3 connections; None without hiredis (RESP3 needs it)."""
        pool = self._sync_pool
        if pool is None:
            if not RESP3_AVAILABLE:
                return None
            with self._sync_lock:
                pool = self._sync_pool
                if pool is None:
                    pool = self._sync_pool = SyncPool(
                        self.target, client_name=self.client_name, resp3=True
                    )
        return pool

    @contextlib.contextmanager
    def _translate_sync(self, pool: SyncPool, what: str) -> Iterator[None]:
        """:meth:`_translate` for the blocking connections: the same errors, worded the same.

        A store that never reached its server reports it as the asyncio store's ``connect()``
        does; :class:`Resp3Refused` and :class:`_Lost` pass through for the caller to handle.
        """
        try:
            yield
        except (Resp3Refused, _Lost, TimeoutError):
            raise
        except (RespError, OSError) as exc:
            step = what if pool.ever_connected else "connect"
            with self._translate(step):
                raise exc from None


class _Lost(Exception):
    """A blocking connection was lost while waiting; the cause says how.

    ``waited``: whether the key had been read on it (the connection worked before it was lost),
    rather than lost at once.
    """

    def __init__(self, *, waited: bool = False) -> None:
        super().__init__("connection lost")
        self.waited = waited
