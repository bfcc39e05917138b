"""Checks and small values shared by celeriac's own transports (memory, SQLite).

Both transports implement the contract of :mod:`celeriac.brokers.base` with the same rules, so the
memory transport can serve as the reference the conformance suite holds every transport to. What
they share lives here: argument checks (every bad input is a clear celeriac error), the JSON form of
headers and properties, and lease tokens. :class:`~celeriac.brokers.base.PublishRequest` belongs to
the contract in :mod:`celeriac.brokers.base` and is importable from here too.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from celeriac.brokers._routing import clamp_priority
from celeriac.brokers.base import BrokerOptions, Delivery, PublishRequest, TransportMessage
from celeriac.codecs.json import loads_text
from celeriac.exceptions import ImproperlyConfigured, PublishError
from celeriac.utils.wakeup import WakeupRegistry

#: What a transport's claim returns: the deliveries, and with none, when the next one is due.
Claimed = tuple[list[Delivery], float | None]


@dataclass(slots=True, frozen=True)
class Outgoing:
    """A checked publish request, its message in the form the transports store."""

    exchange: str
    routing_key: str
    body: bytes
    content_type: str
    content_encoding: str
    #: JSON text.
    headers: str
    #: JSON text.
    properties: str
    priority: int
    not_before: float | None


def prepare_publish(item: PublishRequest) -> Outgoing:
    """Check a publish request and encode its message; PublishError says what is wrong."""
    message, exchange, routing_key, not_before = item
    body, headers, properties = encode_metadata(message)
    for what, value in (("exchange", exchange), ("routing_key", routing_key)):
        if not isinstance(value, str):
            raise PublishError(f"{what} must be a string, got {value!r}")
    return Outgoing(
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=headers,
        properties=properties,
        priority=message_priority(message),
        not_before=check_not_before(not_before),
    )


def check_options(options: BrokerOptions) -> None:
    """Raise ImproperlyConfigured unless the generic broker options make sense."""
    if not isinstance(options, BrokerOptions):
        raise ImproperlyConfigured(f"broker options must be BrokerOptions, got {options!r}")
    for name in ("visibility_timeout", "polling_interval"):
        value = getattr(options, name)
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise ImproperlyConfigured(
                f"{name} must be a positive number of seconds, got {value!r}"
            )


def check_no_transport_options(transport: str, options: BrokerOptions) -> None:
    """For transports that take no transport options: refuse any, rather than ignore them."""
    if options.transport_options:
        raise ImproperlyConfigured(
            f"the {transport} transport takes no transport options, "
            f"got {sorted(options.transport_options)}"
        )


def encode_metadata(message: TransportMessage) -> tuple[bytes, str, str]:
    """The body, and headers and properties as JSON text, as a transport stores them.

    Storing JSON (rather than the dicts) means a message carries only what a networked transport
    could carry: a value JSON cannot represent fails here, at publish, with PublishError.
    """
    body = check_message(message)
    return body, _to_json("headers", message.headers), _to_json("properties", message.properties)


def check_message(message: TransportMessage) -> bytes:
    """Raise PublishError unless ``message`` has the shape every transport carries; its body.

    Every transport (these two, Redis, AMQP) checks a message with this before encoding it in
    its own form, so a malformed one gets the same error whatever the broker.
    """
    if not isinstance(message, TransportMessage):
        raise PublishError(f"expected a TransportMessage, got {type(message).__name__}")
    body = message.body
    if not isinstance(body, bytes):
        raise PublishError(f"message body must be bytes, got {type(body).__name__}")
    for name in ("content_type", "content_encoding"):
        if not isinstance(getattr(message, name), str):
            raise PublishError(f"message {name} must be a string, got {getattr(message, name)!r}")
    for name in ("headers", "properties"):
        if not isinstance(getattr(message, name), dict):
            raise PublishError(
                f"message {name} must be a dict, got {type(getattr(message, name)).__name__}"
            )
    return body


def _to_json(what: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PublishError(f"message {what} cannot be carried by the broker: {exc}") from exc


def decode_message(
    body: bytes, content_type: str, content_encoding: str, headers: str, properties: str
) -> TransportMessage:
    """Rebuild a fresh :class:`TransportMessage` from its stored form."""
    return TransportMessage(
        body=bytes(body),
        content_type=content_type,
        content_encoding=content_encoding,
        headers=loads_text(headers),
        properties=loads_text(properties),
    )


def message_priority(message: TransportMessage) -> int:
    """The priority property as an integer 0-255 (0 when absent or not a number)."""
    value = message.properties.get("priority")
    if not _is_real(value) or not math.isfinite(value):
        return 0
    return clamp_priority(int(value), None)


def check_not_before(not_before: float | None) -> float | None:
    """Validate a publish/defer time: None or a finite UNIX time."""
    if not_before is None:
        return None
    if not _is_real(not_before) or not math.isfinite(not_before):
        raise PublishError(f"not_before must be a UNIX time in seconds, got {not_before!r}")
    return float(not_before)


def check_defer_time(not_before: float) -> float:
    """Validate the time a deferred delivery waits until."""
    when = check_not_before(not_before)
    if when is None:
        raise ImproperlyConfigured("defer needs a UNIX time to wait until, got None")
    return when


def check_queue_name(queue: str) -> str:
    if not isinstance(queue, str) or not queue:
        raise ImproperlyConfigured(f"queue name must be a non-empty string, got {queue!r}")
    return queue


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ImproperlyConfigured(f"limit must be a positive integer, got {limit!r}")
    return limit


def check_fetch(queues: Sequence[str], max_messages: int, timeout: float) -> tuple[str, ...]:
    """Validate ``fetch`` arguments; return the queues in order, without repeats."""
    if isinstance(queues, str):
        raise ImproperlyConfigured(
            f"fetch takes a sequence of queue names, not the string {queues!r}"
        )
    names = tuple(dict.fromkeys(queues))
    if not names or not all(isinstance(q, str) and q for q in names):
        raise ImproperlyConfigured(f"fetch needs one or more queue names, got {list(queues)!r}")
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
        raise ImproperlyConfigured(f"max_messages must be a positive integer, got {max_messages!r}")
    if not _is_real(timeout) or not timeout >= 0:
        raise ImproperlyConfigured(f"fetch timeout must be >= 0 seconds, got {timeout!r}")
    return names


async def claim_or_wait(
    wakeups: WakeupRegistry,
    key: str,
    queues: tuple[str, ...],
    timeout: float,
    claim: Callable[[], Awaitable[Claimed]],
    *,
    poll: tuple[float, float] | None = None,
) -> list[Delivery]:
    """The body of ``fetch``: ``claim()`` until it delivers, waiting up to ``timeout`` in all.

    Between attempts it sleeps until woken through ``wakeups`` (a publish, requeue or defer in this
    process on one of ``queues`` of store ``key``), until the earliest delayed message or lease is
    due, or — for a store other processes change too — until the next poll: ``poll`` is
    ``(first pause, longest pause)``, the pause doubling while nothing wakes the fetch.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    first, longest = poll if poll is not None else (math.inf, math.inf)
    pause = first
    with wakeups.waiting(key, queues) as waiter:
        while True:
            waiter.clear()
            deliveries, next_due = await claim()
            if deliveries:
                return deliveries
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            wait = min(pause, remaining)
            if next_due is not None:
                wait = min(wait, max(next_due - time.time(), 0.0))
            woken = await waiter.wait(wait)
            pause = first if woken else min(pause * 2, longest)


def check_reason(reason: str) -> str:
    if not isinstance(reason, str):
        raise ImproperlyConfigured(f"reject reason must be a string, got {reason!r}")
    return reason


def new_lease_token() -> str:
    """A fresh lease token; with the message id it names exactly one delivery."""
    return secrets.token_hex(8)


def delivery_tag(message_id: int, token: str) -> str:
    return f"{message_id}.{token}"


def lease_of(delivery: Delivery, transport: str) -> tuple[int, str]:
    """The ``(message id, lease token)`` a delivery of this transport carries as its handle."""
    handle = delivery.handle
    if (
        isinstance(handle, tuple)
        and len(handle) == 2
        and isinstance(handle[0], int)
        and isinstance(handle[1], str)
    ):
        return handle[0], handle[1]
    raise ImproperlyConfigured(
        f"delivery {delivery.delivery_tag!r} was not fetched from a {transport} broker"
    )


def _is_real(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
