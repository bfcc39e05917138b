"""Task message protocol v2 (Celery >= 4's default): write it, and read its parts back.

A v2 message is three things (celery-wire.md §2):

* **headers** — the task's metadata, always the full Celery 5.7 set in Celery's order, nulls
  included, custom headers merged at the top level;
* **properties** — AMQP-style ``correlation_id``, ``reply_to``, ``delivery_mode``, ``priority`` and,
  only when the task expires, ``expiration`` (milliseconds, as a string);
* **body** — ``[args, kwargs, embed]`` where ``embed`` holds the canvas links. Exactly three
  elements: a two-element body crashes a Celery 5.7 worker.

Serializing the body to bytes is :mod:`celeriac.codecs`' job (see :mod:`celeriac.protocol.wire`).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from celeriac.exceptions import InvalidTaskError
from celeriac.protocol.message import TaskMessage
from celeriac.protocol.saferepr import saferepr
from celeriac.protocol.times import format_iso8601, milliseconds_until
from celeriac.protocol.validate import build_message, check_outgoing

__all__ = ["default_origin", "from_v2", "to_v2"]


@functools.cache
def _hostname() -> str:
    return socket.gethostname()


#: This process's ``default_origin()``, made on first use (every message carries it).
_origin: str | None = None


def default_origin() -> str:
    """Celery's ``anon_nodename()``: ``gen<pid>@<hostname>``, the sender of a client message.

    Made once per process (``os.getpid()`` is a system call, and every message needs it); a
    forked child makes its own.
    """
    global _origin  # noqa: PLW0603 - the per-process value, forgotten after fork()
    origin = _origin
    if origin is None:
        origin = _origin = f"gen{os.getpid()}@{_hostname()}"
    return origin


def _forget_origin() -> None:
    global _origin  # noqa: PLW0603
    _origin = None


os.register_at_fork(after_in_child=_forget_origin)


def to_v2(
    msg: TaskMessage, *, now: datetime | None = None
) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Return ``(headers, properties, body)`` of ``msg`` in protocol v2, as Celery 5.7 writes them.

    ``now`` (default: the current time) is only used for the ``expiration`` property, the time
    left until ``msg.expires``. Raises :class:`InvalidTaskError` when ``msg`` could not be read back
    by a worker (empty id or name, args not a list, a custom header that shadows a protocol one).

    The body shares ``args``, ``kwargs`` and the signature dicts with ``msg`` rather than copying
    them: it is meant to be serialized right away.
    """
    check_outgoing(msg)
    args = msg.args if type(msg.args) is list else list(msg.args)
    headers: dict[str, Any] = {
        "lang": "py",
        "task": msg.task,
        "id": msg.id,
        "shadow": msg.shadow,
        "eta": None if msg.eta is None else format_iso8601(msg.eta),
        "expires": None if msg.expires is None else format_iso8601(msg.expires),
        "group": msg.group,
        "group_index": msg.group_index,
        "retries": msg.retries,
        "timelimit": [msg.timelimit[0], msg.timelimit[1]],
        "root_id": msg.root_id or msg.id,
        "parent_id": msg.parent_id,
        # Shown as a tuple, as Celery shows the args of ``delay(2, 3)``: "(2, 3)".
        "argsrepr": saferepr(tuple(args)) if msg.argsrepr is None else msg.argsrepr,
        "kwargsrepr": saferepr(msg.kwargs) if msg.kwargsrepr is None else msg.kwargsrepr,
        "origin": msg.origin or default_origin(),
        "ignore_result": bool(msg.ignore_result),
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if msg.extra_headers:
        headers.update(msg.extra_headers)
    properties: dict[str, Any] = {
        "correlation_id": msg.correlation_id or msg.id,
        "reply_to": msg.reply_to or "",
        "delivery_mode": msg.delivery_mode,
        "priority": 0 if msg.priority is None else msg.priority,
    }
    if msg.expires is not None:
        # RabbitMQ drops the message itself once this per-message TTL passes ("0" if already past:
        # delivered only to a consumer waiting right now); other transports ignore it and the
        # worker checks the ``expires`` header.
        current = datetime.now(UTC) if now is None else now
        properties["expiration"] = str(milliseconds_until(msg.expires, current))
    embed = {
        "callbacks": msg.callbacks,
        "errbacks": msg.errbacks,
        "chain": msg.chain,
        "chord": msg.chord,
    }
    return headers, properties, [args, msg.kwargs, embed]


def from_v2(headers: Mapping[str, Any], properties: Mapping[str, Any], body: Any) -> TaskMessage:
    """Read a v2 message whose body is already decoded; raise InvalidTaskError on a bad shape.

    Naive ``eta``/``expires`` are UTC, as a Celery 5 worker reads them.
    """
    # A str is a sequence too: require a real array, as the worker unpacks exactly three values.
    if (type(body) is not list and not isinstance(body, list | tuple)) or len(body) != 3:
        shown = saferepr(body, maxlen=100)
        size = f"{len(body)}-element " if isinstance(body, list | tuple) else ""
        raise InvalidTaskError(
            "protocol v2 body must be a 3-element array [args, kwargs, embed], "
            f"got a {size}{type(body).__name__}: {shown}"
        )
    args, kwargs, embed = body
    return build_message(headers, properties, args, kwargs, embed, protocol=2, naive_tz=UTC)
