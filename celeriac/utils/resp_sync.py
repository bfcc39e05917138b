"""Blocking Redis connections for synchronous callers: ``delay()`` and ``get()`` on their own thread.

An asyncio connection (:mod:`celeriac.utils.resp`) serves synchronous code only through another
thread's event loop, and every call then pays for thread wake-ups and GIL hand-offs that cost
more than the round trip to Redis itself. These connections are plain sockets read by the same
RESP parser (hiredis when installed) and written with the same :func:`~celeriac.utils.resp.pack`:
the caller's thread writes the commands and reads the replies itself.

:class:`SyncPool` keeps idle connections for any number of threads: a thread takes one for the
length of a call (so threads never wait for each other's replies) and gives it back. It belongs
to the process that made it: after ``fork()`` a child opens connections of its own and leaves
the parent's sockets alone.

Connections speak RESP2 unless the pool is made with ``resp3=True``: then ``HELLO 3`` is sent on
connect, and a connection subscribed to channels may still run commands (Redis 6 and later), so a
waiter subscribes and reads a key in one round trip; pushed messages come back as
``hiredis.PushNotification`` lists. RESP3 needs hiredis (:data:`RESP3_AVAILABLE`); a server that
refuses ``HELLO 3`` raises :class:`Resp3Refused`.

Errors are those of :mod:`celeriac.utils.resp`: an error reply is a :class:`ReplyError` value
(raised by :meth:`SyncPool.call`), a connection that cannot be made raises :class:`ConnectFailed`
and one lost while in use :class:`ConnectionLost`; nothing is sent again unless the caller says
the commands may run twice (``retries=``). A connection that fails, or whose caller was
interrupted in the middle of a call, is closed rather than given back, so its unread replies never
reach the next caller.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celeriac.utils.resp import (
    Command,
    ConnectionLost,
    ReplyError,
    RespError,
    backoff,
    connection_settings,
    hello_commands,
    new_reader,
    pack,
    ssl_context,
)

if TYPE_CHECKING:
    from celeriac.utils.redis_url import RedisTarget

__all__ = [
    "RESP3_AVAILABLE",
    "ConnectFailed",
    "PushNotification",
    "Resp3Refused",
    "SyncConnection",
    "SyncPool",
]

try:
    from hiredis import PushNotification

    #: Whether RESP3 connections can be made: pushed messages need hiredis's RESP3 parser.
    RESP3_AVAILABLE = True
except ImportError:  # pragma: no cover - hiredis is part of the redis extra
    RESP3_AVAILABLE = False

    class PushNotification(list):  # type: ignore[no-redef,type-arg]
        """Never built without hiredis (no RESP3 connection is made without it)."""


#: Idle connections a pool keeps; more are closed when given back.
MAX_IDLE = 32

#: How many forks separate this process from the first one: a pool made with another count was
#: made by an ancestor, and its sockets are not this process's to use. (Cheaper than comparing
#: ``os.getpid()``, a system call, on every command.)
_forks = 0


def _count_fork() -> None:
    global _forks  # noqa: PLW0603 - the process-wide count, moved on by fork() only
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)

#: What ``recv`` asks for at once.
_CHUNK = 65536


class ConnectFailed(ConnectionLost):
    """No connection could be made (refused, unreachable, timed out, handshake refused).

    ``os_error`` is the socket error, worded as asyncio words it (so messages read the same
    whichever kind of connection met it), or None when the failure was not a socket error.
    """

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error


class Resp3Refused(RespError):
    """The server refused ``HELLO 3`` (older than Redis 6, or a proxy without RESP3)."""


class _Timeout(Exception):
    """No whole reply arrived within the time given to :meth:`SyncConnection.read`."""


class SyncConnection:
    """One blocking socket to a Redis server with its reply parser; used by one thread at a time."""

    __slots__ = ("_reader", "_sock", "_timeout", "_timeout_name", "last_reply", "stale_channels")

    def __init__(self, sock: socket.socket, timeout: float | None, timeout_name: str = "") -> None:
        self._sock = sock
        # RESP3 replies could hold a boolean false, which hiredis would return as its "no whole
        # reply yet": none of the commands sent on these connections has such a reply.
        self._reader = new_reader()
        #: The reply timeout (``socket_timeout``); None waits for ever.
        self._timeout = timeout
        #: How errors name the timeout's setting (``socket_timeout``).
        self._timeout_name = timeout_name
        self.last_reply = time.monotonic()
        #: Channels a previous user subscribed and left: unsubscribed with the next commands.
        self.stale_channels: list[bytes] = []
        sock.settimeout(timeout)

    # -- writing -------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write ``data`` whole; ConnectionLost if the socket is gone."""
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectionLost(f"connection lost while sending: {exc}") from exc

    # -- reading -------------------------------------------------------------------------------

    def read(self) -> Any:
        """The next reply or pushed message, waiting up to the reply timeout."""
        try:
            return self._read(self._timeout)
        except _Timeout:
            name = f" ({self._timeout_name})" if self._timeout_name else ""
            raise ConnectionLost(f"no reply within {self._timeout}s{name}") from None

    def read_within(self, timeout: float) -> Any:
        """The next reply or pushed message if one arrives within ``timeout`` seconds, else
        ``False`` (a partial reply stays buffered for the next read)."""
        try:
            # At least a moment: a zero timeout would make the socket non-blocking instead.
            return self._read(max(timeout, 0.0001), keep_timeout=False)
        except _Timeout:
            return False

    def _read(self, timeout: float | None, *, keep_timeout: bool = True) -> Any:
        reader = self._reader
        reply = reader.gets()
        if reply is not False:
            return reply
        sock = self._sock
        if not keep_timeout:
            sock.settimeout(timeout)
        try:
            while True:
                try:
                    data = sock.recv(_CHUNK)
                except TimeoutError:
                    raise _Timeout from None
                except OSError as exc:
                    raise ConnectionLost(f"connection lost: {exc}") from exc
                if not data:
                    raise ConnectionLost("connection closed by the server")
                reader.feed(data)
                reply = reader.gets()
                if reply is not False:
                    self.last_reply = time.monotonic()
                    return reply
        finally:
            if not keep_timeout:
                sock.settimeout(self._timeout)

    def replies(self, count: int) -> list[Any]:
        """The next ``count`` replies, skipping pushed messages (of channels left subscribed)."""
        out: list[Any] = []
        while len(out) < count:
            reply = self.read()
            if type(reply) is not PushNotification:
                out.append(reply)
        return out

    def write(self, data: bytes) -> None:
        """Write ``data`` (packed commands), and unsubscribe the channels an earlier user left."""
        stale = self.stale_channels
        if stale:
            # The UNSUBSCRIBE rides along with the next commands; what it and the channels send
            # back are pushed messages, which readers skip.
            self.stale_channels = []
            data = pack([("UNSUBSCRIBE", *stale)]) + data
        self.send(data)

    def execute(self, data: bytes, count: int) -> list[Any]:
        """Write ``data`` (``count`` packed commands); their replies in order."""
        self.write(data)
        return self.replies(count)

    def set_timeout(self, timeout: float | None, name: str) -> None:
        """Change the reply timeout (``name``: its setting, for errors)."""
        self._timeout = timeout
        self._timeout_name = name
        self._sock.settimeout(timeout)

    def handshake(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` and raise the first error reply (AUTH refused, bad database...)."""
        replies = self.execute(pack(commands), len(commands))
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise reply
        return replies

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


class SyncPool:
    """Blocking connections to the server of a :class:`~celeriac.utils.redis_url.RedisTarget`,
    shared by the threads of one process.

    ``on_connect`` runs on every new connection after the handshake (a server version check);
    what it raises fails the connection. ``ever_connected`` tells whether a connection was ever
    made, so callers can tell "cannot reach the server" from "lost it".
    """

    def __init__(
        self,
        target: RedisTarget,
        *,
        client_name: str | None = None,
        resp3: bool = False,
        on_connect: Callable[[SyncConnection], None] | None = None,
        max_idle: int = MAX_IDLE,
    ) -> None:
        if resp3 and not RESP3_AVAILABLE:
            raise Resp3Refused("RESP3 connections need hiredis")
        self.target = target
        self.client_name = client_name or target.connection.get("client_name") or "celeriac"
        (
            self._connect_timeout,
            self._timeout,
            self._keepalive,
            self._health_interval,
        ) = connection_settings(target)
        self._ssl = ssl_context(target.ssl) if target.ssl is not None else None
        self._resp3 = resp3
        self._on_connect = on_connect
        self._max_idle = max_idle
        self._idle: list[SyncConnection] = []
        self._lock = threading.Lock()
        self._forks = _forks
        self._closed = False
        self.ever_connected = False

    # -- connections ---------------------------------------------------------------------------

    def acquire(self) -> SyncConnection:
        """An idle connection, or a new one (ConnectFailed if none can be made)."""
        if self._forks != _forks:
            self._forget_parent()
        if self._closed:
            raise ConnectionLost("closed")
        with self._lock:
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            return self._open()
        if self._health_interval and (
            time.monotonic() - connection.last_reply > self._health_interval
        ):
            # Idle for a while: make sure the socket still leads to the server before a
            # command that must not be sent twice goes down it.
            try:
                connection.handshake([("PING",)])
            except (RespError, OSError):
                connection.close()
                return self._open()
        return connection

    def release(self, connection: SyncConnection) -> None:
        """Give back a connection whose every reply was read (a closed one is dropped)."""
        if self._forks == _forks and not self._closed and not connection.closed:
            with self._lock:
                if len(self._idle) < self._max_idle:
                    self._idle.append(connection)
                    return
        connection.close()

    def discard(self, connection: SyncConnection) -> None:
        """Close a connection in an unknown state (failed, or its caller was interrupted)."""
        connection.close()

    def close(self) -> None:
        """Close the idle connections; connections in use are closed when given back."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        if self._forks != _forks:
            return  # the parent's sockets: leave them to the parent
        for connection in idle:
            connection.close()

    def _forget_parent(self) -> None:
        # Forked: the idle sockets are the parent's (closing ours would not end its session,
        # but a command sent here would mix with the parent's replies). They are dropped
        # unused, and the lock may have been held by a thread the child does not have.
        self._idle = []
        self._lock = threading.Lock()
        self._forks = _forks

    # -- commands ------------------------------------------------------------------------------

    def execute(self, commands: Sequence[Command], *, retries: int = 0) -> list[Any]:
        """Send ``commands`` in one write; their replies in order (errors as ReplyError values).

        ``retries``: how many times to send them again on a fresh connection if the connection
        is lost or cannot be made — only for commands with the same effect however often they
        run.
        """
        data = pack(commands)
        attempt = 0
        while True:
            try:
                connection = self.acquire()
                try:
                    replies = connection.execute(data, len(commands))
                except BaseException:
                    connection.close()
                    raise
                self.release(connection)
                return replies
            except ConnectionLost:
                if attempt >= retries or self._closed:
                    raise
                time.sleep(backoff(attempt))
                attempt += 1

    def call(self, *command: Any, retries: int = 0) -> Any:
        """One command's reply; an error reply is raised as :class:`ReplyError`."""
        (reply,) = self.execute([command], retries=retries)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def evalsha(
        self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any], *, retries: int = 0
    ) -> Any:
        """Run a script by its SHA-1, loading it first if the server does not know it.

        ``NOSCRIPT`` means the script did not run at all, so sending it again is always safe.
        """
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            return self.call(*command, retries=retries)
        except ReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        self.call("SCRIPT", "LOAD", source, retries=retries)
        return self.call(*command, retries=retries)

    # -- connecting ----------------------------------------------------------------------------

    def _open(self) -> SyncConnection:
        sock = self._socket()
        # The handshake is part of connecting: it gets the connect timeout.
        connection = SyncConnection(sock, self._connect_timeout)
        try:
            commands = hello_commands(self.target, self.client_name)
            if self._resp3:
                commands.append(("HELLO", "3"))
            try:
                replies = connection.execute(pack(commands), len(commands))
            except ConnectionLost as exc:
                raise ConnectFailed(str(exc)) from exc
            for index, reply in enumerate(replies):
                if isinstance(reply, ReplyError):
                    if self._resp3 and index == len(commands) - 1:
                        raise Resp3Refused(f"the server refuses RESP3 (HELLO 3): {reply}")
                    raise reply
            connection.set_timeout(self._timeout, "socket_timeout")
            if self._on_connect is not None:
                self._on_connect(connection)
        except BaseException:
            connection.close()
            raise
        self.ever_connected = True
        return connection

    def _socket(self) -> socket.socket:
        """A connected socket (TLS wrapped when the target says so); ConnectFailed if not."""
        target = self.target
        timeout = self._connect_timeout
        try:
            if target.kind == "unix":
                assert target.path is not None
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(target.path)
                except BaseException:
                    sock.close()
                    raise
                return sock
            host, port = self._address()
            sock = _tcp_connect(host, port, timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._keepalive:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if self._ssl is not None:
                    sock = self._ssl.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
            return sock
        except TimeoutError:
            raise ConnectFailed(
                f"cannot connect within {timeout}s (socket_connect_timeout)"
            ) from None
        except OSError as exc:  # refused, unreachable, unknown host, TLS refused
            raise ConnectFailed(f"cannot connect: {exc}", exc) from exc

    def _address(self) -> tuple[str, int]:
        target = self.target
        if target.kind != "sentinel":
            return target.host, target.port
        from redis.exceptions import RedisError
        from redis.sentinel import Sentinel

        assert target.master_name is not None
        options = dict(target.connection.get("sentinel_kwargs") or {})
        sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=options)  # type: ignore[no-untyped-call]
        try:
            host, port = sentinel.discover_master(target.master_name)  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            raise ConnectFailed(f"Sentinel cannot name the master: {exc}") from exc
        finally:
            for client in sentinel.sentinels:
                with contextlib.suppress(Exception):
                    client.close()
        return str(host), int(port)


def _tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    """Connect to the first address of ``host`` that answers.

    A refusal is worded as asyncio words it (``Connect call failed (address)``), so that the
    errors of these connections and of the asyncio ones read the same.
    """
    deadline = time.monotonic() + timeout
    errors: list[OSError] = []
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(address)
        except TimeoutError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            errors.append(OSError(exc.errno, f"Connect call failed {address}"))
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if not errors:
        raise OSError(f"no address found for {host}:{port}")
    if len(errors) == 1 or len({str(error) for error in errors}) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(error) for error in errors)}")
