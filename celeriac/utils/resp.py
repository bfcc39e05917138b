"""A lean Redis connection for the hot paths: pipelined commands on one socket, replies in order.

redis-py's asyncio client spends 100 to 170 µs of CPU on every command (a pool checkout and
release, retry and health-check wrappers, encoding each argument, a stream reader behind a
timeout); a worker draining a queue sends about one command per task, so that alone capped it at
a few thousand tasks a second. This connection is an :class:`asyncio.Protocol` feeding a RESP
parser (hiredis when installed): a command or a batch of commands is one ``write``, replies are
matched to their callers in order as they arrive, and any number of callers may have commands in
flight at once, pipelined on the one socket. A round trip costs about 20 µs.

It does only what celeriac's Redis transport and result store need: connect (TCP, unix socket,
TLS; the master of a Sentinel set is found through redis-py's Sentinel client), ``AUTH``,
``SELECT``, ``CLIENT SETNAME``, then RESP2 commands. Everything else (blocking commands, pub/sub)
stays on redis-py.

Errors: an error reply is returned as a :class:`ReplyError` value in its place of a batch (the
others ran: a pipeline is not a transaction) or raised by :meth:`RedisPipe.call`; a connection that
cannot be made or is lost fails every command in flight with :class:`ConnectionLost` — those
commands may or may not have run — and the next command connects again. Nothing is re-sent unless
the caller says the commands are idempotent (``retries=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from celeriac.utils.redis_url import RedisTarget

__all__ = [
    "ConnectionLost",
    "RedisPipe",
    "ReplyError",
    "RespError",
    "pack",
]

logger = logging.getLogger(__name__)

#: A command argument; ``str`` is sent as UTF-8, numbers as their decimal text.
Arg = bytes | str | int | float
Command = Sequence[Arg]

#: redis-py's defaults, which the rest of celeriac's Redis code uses too.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_HEALTH_CHECK_INTERVAL = 25.0

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


#: Error codes of a server that refuses the client: configuration errors, not outages.
_REFUSALS = frozenset({"WRONGPASS", "NOAUTH", "NOPERM"})


class RespError(Exception):
    """Base of this module's errors."""


class ReplyError(RespError):
    """An error reply from the server (``-ERR ...``, ``-NOSCRIPT ...``)."""

    @property
    def code(self) -> str:
        """The reply's first word: ``ERR``, ``NOSCRIPT``, ``WRONGPASS``..."""
        text = str(self)
        return text.split(" ", 1)[0] if text else ""

    @property
    def refused(self) -> bool:
        """Whether the server refused the client (bad credentials, an ACL), not the command."""
        return self.code in _REFUSALS


class ConnectionLost(RespError):
    """The connection could not be made or was lost; commands in flight may have run or not."""


class ProtocolError(ConnectionLost):
    """The server sent something that is not RESP (or a reply nobody asked for)."""


# -- encoding ----------------------------------------------------------------------------------


def _arg(value: Arg) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError("a Redis argument cannot be a bool; send b'1' / b'0' explicitly")
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode("ascii")
    raise TypeError(
        f"a Redis argument must be bytes, str, int or float, not {type(value).__name__}"
    )


def _hiredis_packer() -> Callable[[tuple[Any, ...]], bytes] | None:
    try:
        from hiredis import pack_command
    except ImportError:  # pragma: no cover - hiredis is part of the redis extra
        return None
    return cast("Callable[[tuple[Any, ...]], bytes]", pack_command)


_hiredis_pack = _hiredis_packer()


def pack(commands: Sequence[Command]) -> bytes:
    """The RESP encoding of ``commands``, ready to write as one block.

    hiredis's packer writes the same bytes (floats as ``repr``) three times faster for a
    command of a few arguments; the Python one below serves without hiredis, and says what is
    wrong with an argument neither can send.
    """
    if _hiredis_pack is not None:
        try:
            if len(commands) == 1:
                command = commands[0]
                return _hiredis_pack(command if type(command) is tuple else tuple(command))
            return b"".join([_hiredis_pack(c if type(c) is tuple else tuple(c)) for c in commands])
        except TypeError:
            pass  # a bool, None...: refused below, with the reason
    return _pack(commands)


def _pack(commands: Sequence[Command]) -> bytes:
    out: list[bytes] = []
    append = out.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for value in command:
            # bytes and str first: nearly every argument is one of them.
            if isinstance(value, bytes):
                data = value
            elif isinstance(value, str):
                data = value.encode()
            else:
                data = _arg(value)
            append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


# -- decoding ----------------------------------------------------------------------------------


class _Reader(Protocol):
    def feed(self, data: bytes) -> None: ...

    def gets(self) -> Any: ...


class _Incomplete(Exception):
    pass


class PyReader:
    """A RESP2 parser in Python, with hiredis's interface: ``feed`` bytes, ``gets`` a reply.

    ``gets`` returns False until a whole reply is buffered; error replies come back as
    :class:`ReplyError` values. Used when hiredis is not installed.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def gets(self) -> Any:
        try:
            reply, self._pos = self._parse(self._pos)
        except _Incomplete:
            return False
        return reply

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", pos)
        if end < 0:
            raise _Incomplete
        return bytes(self._buffer[pos:end]), end + 2

    def _parse(self, pos: int) -> tuple[Any, int]:
        line, pos = self._line(pos)
        if not line:
            raise ProtocolError("empty RESP line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest, pos
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace")), pos
        try:
            number = int(rest)
        except ValueError:
            raise ProtocolError(f"bad RESP length or integer {line[:40]!r}") from None
        if kind == b":":
            return number, pos
        if kind == b"$":
            if number < 0:
                return None, pos
            end = pos + number
            if len(self._buffer) < end + 2:
                raise _Incomplete
            return bytes(self._buffer[pos:end]), end + 2
        if kind == b"*":
            if number < 0:
                return None, pos
            items = []
            for _ in range(number):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise ProtocolError(f"unknown RESP type {kind!r}")


def new_reader() -> _Reader:
    try:
        import hiredis
    except ImportError:
        return PyReader()
    reader: _Reader = hiredis.Reader(protocolError=ProtocolError, replyError=ReplyError)
    return reader


# -- the connection ----------------------------------------------------------------------------


#: Told the replies of a batch whose caller stopped waiting (its future was cancelled).
Orphan = Callable[[list[Any]], None]


class _Batch:
    __slots__ = ("future", "left", "orphan", "replies")

    def __init__(
        self, count: int, future: asyncio.Future[list[Any]], orphan: Orphan | None = None
    ) -> None:
        self.left = count
        self.replies: list[Any] = []
        self.future = future
        self.orphan = orphan


class _Protocol(asyncio.Protocol):
    """One socket: writes batches, hands replies to the batches in the order they were sent."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = new_reader()
        self.pending: deque[_Batch] = deque()
        #: Why the connection is gone; None while it is up.
        self.lost: ConnectionLost | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        #: ``time.monotonic()`` of the last reply (for the health check of an idle connection).
        self.last_reply = 0.0
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport instance: uvloop's (the
        # loop of uvicorn and other ASGI servers when installed) only has its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.last_reply = time.monotonic()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        pending = self.pending
        try:
            reader.feed(data)
            while pending:
                batch = pending[0]
                while batch.left:
                    reply = reader.gets()
                    if reply is False:
                        return
                    batch.replies.append(reply)
                    batch.left -= 1
                pending.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)
                elif batch.orphan is not None:  # its caller was cancelled
                    _tell_orphan(batch.orphan, batch.replies)
            if reader.gets() is not False:
                raise ProtocolError("the server sent a reply nobody asked for")
        except ProtocolError as exc:
            self._fail(exc)
        finally:
            self.last_reply = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail(ConnectionLost(f"connection closed{reason}"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def send(
        self, data: bytes, count: int, orphan: Orphan | None = None
    ) -> asyncio.Future[list[Any]]:
        """Write ``data`` (``count`` commands); the future of their replies (``orphan``: see
        :meth:`RedisPipe.send_now`)."""
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        if self.lost is not None or self.transport is None:
            future.set_exception(self.lost or ConnectionLost("not connected"))
            return future
        self.pending.append(_Batch(count, future, orphan))
        self.transport.write(data)
        return future

    @property
    def paused(self) -> bool:
        """Whether the kernel's send buffer is full (writes wait for :meth:`drained`)."""
        return self._paused

    async def drained(self) -> None:
        """Wait while the kernel's send buffer is full (a very large batch)."""
        if not self._paused or self.lost is not None:
            return
        if self._drain is None:
            self._drain = self._loop.create_future()
        await asyncio.shield(self._drain)

    def abort(self, reason: ConnectionLost) -> None:
        self._fail(reason)

    def _fail(self, reason: ConnectionLost) -> None:
        if self.lost is None:
            self.lost = reason
        pending, self.pending = self.pending, deque()
        for batch in pending:
            if not batch.future.done():
                batch.future.set_exception(self.lost)
                # Retrieved here so that a batch whose caller was cancelled logs nothing.
                batch.future.exception()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self.transport is not None:
            self.transport.abort()


def ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    """A client TLS context from redis-py's ``ssl_*`` options, with redis-py's defaults.

    Certificates are required and the host name is checked unless the options say otherwise
    (``ssl_cert_reqs=none`` turns the host name check off too, as in redis-py).
    """
    reqs = _CERT_REQS[str(options.get("ssl_cert_reqs", "required"))]
    context = ssl.create_default_context()
    context.check_hostname = bool(options.get("ssl_check_hostname", True)) and (
        reqs != ssl.CERT_NONE
    )
    context.verify_mode = reqs
    certfile = options.get("ssl_certfile")
    if certfile:
        context.load_cert_chain(
            str(certfile), options.get("ssl_keyfile"), options.get("ssl_password")
        )
    cafile, capath = options.get("ssl_ca_certs"), options.get("ssl_ca_path")
    if cafile or capath:
        context.load_verify_locations(cafile=cafile, capath=capath)
    if options.get("ssl_ciphers"):
        context.set_ciphers(str(options["ssl_ciphers"]))
    return context


def _tell_orphan(orphan: Orphan, replies: list[Any]) -> None:
    try:
        orphan(replies)
    except Exception:  # the caller's bug must not break the connection for the others
        logger.exception("error handling the replies of a cancelled command")


class RedisPipe:
    """A pipelining connection to the server of a :class:`~celeriac.utils.redis_url.RedisTarget`.

    Connected on first use and again after a loss. Used from one event loop.
    """

    def __init__(self, target: RedisTarget, *, client_name: str | None = None) -> None:
        self.target = target
        self.client_name = client_name or target.connection.get("client_name") or "celeriac"
        (
            self._connect_timeout,
            self._timeout,
            self._keepalive,
            self._health_interval,
        ) = connection_settings(target)
        self._ssl = ssl_context(target.ssl) if target.ssl is not None else None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    # -- commands ------------------------------------------------------------------------------

    async def execute(self, commands: Sequence[Command], *, retries: int = 0) -> list[Any]:
        """Send ``commands`` in one write; their replies in order (errors as ReplyError values).

        ``retries``: how many times to send them again on a fresh connection if the connection
        is lost — only for commands with the same effect however often they run.
        """
        data = pack(commands)
        attempt = 0
        while True:
            try:
                protocol = await self._ready()
                future = protocol.send(data, len(commands))
                await protocol.drained()
                if self._timeout is None:
                    return await future
                try:
                    async with asyncio.timeout(self._timeout):
                        return await future
                except TimeoutError:
                    # The replies would arrive out of step with later commands: start afresh.
                    reason = ConnectionLost(f"no reply within {self._timeout}s (socket_timeout)")
                    protocol.abort(reason)
                    raise reason from None
            except ConnectionLost:
                if attempt >= retries or self._closed:
                    raise
                await asyncio.sleep(backoff(attempt))
                attempt += 1

    def send_now(
        self, command: Command, *, orphan: Orphan | None = None
    ) -> asyncio.Future[list[Any]] | None:
        """Write one command at once; the future of its replies (a list of one: an error reply is
        a :class:`ReplyError` in it; a lost connection, :class:`ConnectionLost` raised). None
        when it cannot go out at once: no connection yet, an idle one due its health check, a
        ``socket_timeout`` to enforce, a full send buffer; :meth:`call` does all that.

        For a hot path that awaits the future itself, with no task or coroutine in between. A
        caller cancelled while it waits cancels the future; the replies then go to ``orphan``
        when they come, so that it can undo what the command did (a fetch gives back what it
        leased). Never retried: the command may have run.
        """
        protocol = self._protocol
        if (
            protocol is None
            or protocol.lost is not None
            or protocol.paused
            or self._timeout is not None
            or self._check_due(protocol)
        ):
            return None
        return protocol.send(pack([command]), 1, orphan)

    async def call(self, *command: Arg, retries: int = 0) -> Any:
        """One command's reply; an error reply is raised as :class:`ReplyError`."""
        (reply,) = await self.execute([command], retries=retries)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def evalsha(
        self, sha: str, source: str, keys: Sequence[Arg], args: Sequence[Arg], *, retries: int = 0
    ) -> Any:
        """Run a script by its SHA-1, loading it first if the server does not know it.

        ``NOSCRIPT`` means the script did not run at all, so sending it again is always safe.
        """
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return await self.call(*command, retries=retries)
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        await self.call("SCRIPT", "LOAD", source, retries=retries)
        return await self.call(*command, retries=retries)

    # -- the connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is up (it is made on first use)."""
        return self._protocol is not None and self._protocol.lost is None

    async def connect(self) -> None:
        """Connect now (otherwise the first command does); ConnectionLost or ReplyError."""
        await self._ready()

    def close(self) -> None:
        """Close the connection; commands in flight fail with ConnectionLost."""
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort(ConnectionLost("closed"))

    async def _ready(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            if self._check_due(protocol):
                # Idle for a while: make sure the socket still leads to the server before a
                # command that must not be sent twice goes down it.
                try:
                    await self._handshake(protocol, [("PING",)])
                except ConnectionLost:
                    protocol.abort(ConnectionLost("health check failed"))
                    return await self._reconnect()
            return protocol
        return await self._reconnect()

    def _check_due(self, protocol: _Protocol) -> bool:
        """Whether the connection has been idle long enough to be checked before use."""
        return bool(self._health_interval) and (
            time.monotonic() - protocol.last_reply > self._health_interval
        )

    async def _reconnect(self) -> _Protocol:
        if self._closed:
            raise ConnectionLost("closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and protocol.lost is None:
                return protocol
            self._protocol = None
            protocol = await self._open()
            if self._closed:
                protocol.abort(ConnectionLost("closed"))
                raise ConnectionLost("closed")
            self._protocol = protocol
            return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        target = self.target
        try:
            async with asyncio.timeout(self._connect_timeout):
                if target.kind == "unix":
                    assert target.path is not None
                    _, protocol = await loop.create_unix_connection(_Protocol, target.path)
                else:
                    host, port = await self._address()
                    _, protocol = await loop.create_connection(
                        _Protocol,
                        host,
                        port,
                        ssl=self._ssl,
                        server_hostname=host if self._ssl is not None else None,
                    )
                    sock = (
                        protocol.transport.get_extra_info("socket") if protocol.transport else None
                    )
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        if self._keepalive:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except TimeoutError:
            raise ConnectionLost(
                f"cannot connect within {self._connect_timeout}s (socket_connect_timeout)"
            ) from None
        except OSError as exc:
            raise ConnectionLost(f"cannot connect: {exc}") from exc
        try:
            await self._handshake(protocol, self._hello())
        except BaseException:
            protocol.abort(ConnectionLost("handshake failed"))
            raise
        return protocol

    def _hello(self) -> list[Command]:
        return hello_commands(self.target, self.client_name)

    async def _handshake(self, protocol: _Protocol, commands: list[Command]) -> None:
        """Send ``commands`` and raise the first error reply (AUTH refused, bad database...)."""
        future = protocol.send(pack(commands), len(commands))
        try:
            async with asyncio.timeout(self._connect_timeout):
                replies = await future
        except TimeoutError:
            raise ConnectionLost(f"no reply within {self._connect_timeout}s") from None
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise reply

    async def _address(self) -> tuple[str, int]:
        target = self.target
        if target.kind != "sentinel":
            return target.host, target.port
        from redis.asyncio.sentinel import Sentinel
        from redis.exceptions import RedisError

        assert target.master_name is not None
        options = dict(target.connection.get("sentinel_kwargs") or {})
        sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=options)  # type: ignore[no-untyped-call]
        try:
            host, port = await sentinel.discover_master(target.master_name)
        except (RedisError, OSError) as exc:
            raise ConnectionLost(f"Sentinel cannot name the master: {exc}") from exc
        finally:
            for client in sentinel.sentinels:
                with contextlib.suppress(Exception):
                    await client.aclose()
        return str(host), int(port)


def hello_commands(target: RedisTarget, client_name: str) -> list[Command]:
    """What a new connection sends first: ``AUTH``, ``SELECT`` and ``CLIENT SETNAME``."""
    commands: list[Command] = []
    if target.password is not None:
        if target.username:
            commands.append(("AUTH", target.username, target.password))
        else:
            commands.append(("AUTH", target.password))
    if target.db:
        commands.append(("SELECT", target.db))
    commands.append(("CLIENT", "SETNAME", client_name))
    return commands


def connection_settings(target: RedisTarget) -> tuple[float, float | None, bool, float]:
    """``(connect timeout, reply timeout or None, keepalive, health check interval)`` of a
    target's connection options, with redis-py's defaults."""
    options = target.connection
    connect_timeout = float(options.get("socket_connect_timeout") or DEFAULT_CONNECT_TIMEOUT)
    timeout = options.get("socket_timeout")
    keepalive = bool(options.get("socket_keepalive", True))
    interval = options.get("health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL)
    return connect_timeout, (float(timeout) if timeout else None), keepalive, float(interval or 0)


def backoff(attempt: int) -> float:
    """Pause before re-sending idempotent commands: none at first (a dead pooled connection is the
    common case), then 20 ms doubling up to 0.5 s, with jitter, riding out a short outage."""
    if attempt == 0:
        return 0.0
    return min(0.02 * 2.0 ** (attempt - 1), 0.5) * (0.5 + random.random() / 2)
