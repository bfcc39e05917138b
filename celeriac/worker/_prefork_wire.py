"""The private wire between a worker and its pool processes (``-P prefork``).

Every peer connects to the worker's Unix socket (in a directory only its user can enter) and opens
with a *hello*: JSON with the pool's random token, its role (``launcher`` or ``child``), pid and
child number. Nothing else is read from a connection whose hello is wrong, and nothing is unpickled
before it. After the hello, each message is a frame: a 4-byte big-endian length, then a pickle.

Messages (tuples, first item the kind):

* worker → launcher: ``("fork", index)``
* launcher → worker: ``("ready", task_names)``, ``("error", text)``, ``("forked", index, pid)``,
  ``("exited", pid, exitcode)`` (negative: the signal that ended it, as ``multiprocessing``)
* worker → child: a :class:`JobMessage` frame; child → worker: ``("done", outcome, maxrss_kib)``

Task outcomes cross the boundary pickled. An exception that does not survive pickling (a class
whose ``__init__`` takes other arguments than its ``args``, an attribute that cannot be pickled) is
replaced in the child by a :class:`~celeriac.exceptions.RemoteTaskError` naming its type, module
and arguments, which the result store writes exactly as it would have written the original; the
traceback text travels as text either way.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.backends.meta import ensure_serializable
from celeriac.exceptions import RemoteTaskError, Retry

if TYPE_CHECKING:
    from celeriac.app.context import Context
    from celeriac.worker.execution import Outcome

_LENGTH = struct.Struct("!I")
#: Largest hello accepted (it is a few dozen bytes of JSON).
_HELLO_MAX = 4096


@dataclass(slots=True)
class JobMessage:
    """One body to run, as a child receives it."""

    task: str
    context: Context
    args: list[Any]
    kwargs: dict[str, Any]
    #: ``time.monotonic()`` at which the soft limit is due (the clock is shared by all processes).
    soft_deadline: float | None


def dumps(message: Any) -> bytes:
    """A frame carrying ``message`` (pickled)."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def hello(token: str, role: str, pid: int, index: int) -> bytes:
    """The first frame a pool process sends."""
    payload = json.dumps({"token": token, "role": role, "pid": pid, "index": index}).encode()
    return _LENGTH.pack(len(payload)) + payload


async def read_hello(reader: asyncio.StreamReader, token: str) -> dict[str, Any] | None:
    """The hello of a new connection, or None when it is not one from this pool."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > _HELLO_MAX:
        return None
    try:
        data = json.loads(await reader.readexactly(length))
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        return None
    if not hmac.compare_digest(data["token"], token):
        return None
    if data.get("role") not in ("launcher", "child"):
        return None
    if not isinstance(data.get("pid"), int) or not isinstance(data.get("index"), int):
        return None
    return data


async def read(reader: asyncio.StreamReader) -> bytes:
    """The payload of the next frame (``IncompleteReadError`` when the peer has gone)."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return await reader.readexactly(length)


# -- blocking side, in the pool processes ---------------------------------------------------------


def send(sock: socket.socket, message: Any) -> None:
    """Send ``message`` as one frame."""
    sock.sendall(dumps(message))


def recv(sock: socket.socket) -> bytes | None:
    """The payload of the next frame; None when the worker closed the connection."""
    header = _recv_exactly(sock, _LENGTH.size)
    if header is None:
        return None
    (length,) = _LENGTH.unpack(header)
    return _recv_exactly(sock, length)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return bytes(buffer)


# -- outcomes ---------------------------------------------------------------------------------------


def portable_outcome(outcome: Outcome) -> Outcome:
    """``outcome`` with every exception in it replaced by one that survives pickling."""
    if isinstance(outcome.value, BaseException):
        outcome.value = portable_exception(outcome.value)
    if outcome.unraised:
        outcome.unraised = tuple(_portable_retry(r) for r in outcome.unraised)
    return outcome


def portable_exception(exc: BaseException) -> BaseException:
    """``exc`` if a pickle of it reads back as the same type, else a stand-in that does."""
    if isinstance(exc, Retry):
        return _portable_retry(exc)
    try:
        clone = pickle.loads(pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return stand_in(exc)
    return exc if type(clone) is type(exc) else stand_in(exc)


def _portable_retry(retry: Retry) -> Retry:
    if retry.exc is not None:
        retry.exc = portable_exception(retry.exc)
        retry.args = (retry.message, retry.exc, retry.when)
    return retry


def stand_in(exc: BaseException) -> RemoteTaskError:
    """A RemoteTaskError written to results as ``exc`` would be: its type, module and arguments."""
    cls = type(exc)
    return RemoteTaskError(
        cls.__qualname__, cls.__module__, [ensure_serializable(arg) for arg in exc.args]
    )
