"""A :class:`TransportMessage` as an AMQP 0-9-1 message, and back.

What goes where on the wire (what a kombu/Celery peer sees):

* ``body``, ``content_type``, ``content_encoding``: the body and the basic properties of those names.
* ``headers``: the ``application_headers`` field table. Values are AMQP field types as py-amqp
  (kombu) writes them: ``str`` → ``S``, ``bool`` → ``t``, ``int`` → the smallest signed/unsigned
  integer type (up to 64 bits), ``float`` → ``d`` (double), ``None`` → ``V`` (void), ``list``/
  ``tuple`` → ``A`` (array), ``dict`` → ``F`` (table), plus ``Decimal``, ``datetime`` and
  ``bytes``. Anything else (a set, an object, an int beyond 64 bits) fails the publish with
  :class:`~celeriac.exceptions.PublishError`.
* ``properties`` with an AMQP basic-property name (``delivery_mode``, ``priority``,
  ``correlation_id``, ``reply_to``, ``expiration``, ``message_id``, ``timestamp``, ``type``,
  ``user_id``, ``app_id``) go into that property; ``delivery_mode`` defaults to 2 (persistent), as
  Celery sends it. Other properties (kombu's Redis-only ``body_encoding``, a ``None`` value) have no
  AMQP property: they travel in the header ``x-celeriac-properties`` and come back as properties,
  so a message round-trips unchanged.
* Publishing through aiormq needs a ``message_id`` (it matches returned messages by it); a message
  without one gets ``celeriac-auto-<uuid>``, which is dropped again when the message is read.

Headers celeriac reserves (``x-celeriac-…``) and RabbitMQ's bookkeeping headers of the
delayed-delivery topology (``x-death`` entries of the ``celery_delayed_*`` queues) and of quorum
queues (``x-delivery-count``, reported as :attr:`Delivery.delivery_count`) are removed when a
message is read. ``x-celeriac-delivery-count`` carries the deliveries a message had before this
copy of it was published (a redelivery counted, a deferral, a give-back): see
:func:`previous_deliveries`.

Encoding is celeriac's own (:func:`encode`), not pamqp's: pamqp writes a Python ``float`` as a
32-bit ``f`` field (``0.1`` arrives as ``0.10000000149…``) and drops empty-string properties
(Celery's ``reply_to=""``); kombu writes 64-bit ``d`` fields and keeps them, and so does celeriac.
Decoding is the client's (pamqp), which reads every field type.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import math
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.brokers._common import check_message
from celeriac.brokers.base import TransportMessage
from celeriac.exceptions import PublishError

if TYPE_CHECKING:
    from pamqp.commands import Basic

#: Non-AMQP properties (and AMQP ones set to None) travel in this header.
PROPERTIES_HEADER = "x-celeriac-properties"
#: Why a dead-lettered copy was dead-lettered; with the queue it came from and when.
REASON_HEADER = "x-celeriac-reason"
QUEUE_HEADER = "x-celeriac-queue"
DEAD_AT_HEADER = "x-celeriac-dead-lettered-at"
#: ``[exchange, routing_key]`` a delayed or deferred message was first published with.
ROUTE_HEADER = "x-celeriac-route"
#: Deliveries the message had before this copy was published; the copy's first delivery is the
#: next one. RabbitMQ counts nothing on classic queues, so celeriac carries the count itself.
DELIVERY_COUNT_HEADER = "x-celeriac-delivery-count"
#: Quorum queues' own count of the deliveries returned to the queue (absent before the first).
QUORUM_COUNT_HEADER = "x-delivery-count"
RESERVED_PREFIX = "x-celeriac-"
AUTO_ID_PREFIX = "celeriac-auto-"

#: TransportMessage property name → pamqp ``Basic.Properties`` attribute.
AMQP_PROPERTIES = {
    "delivery_mode": "delivery_mode",
    "priority": "priority",
    "correlation_id": "correlation_id",
    "reply_to": "reply_to",
    "expiration": "expiration",
    "message_id": "message_id",
    "timestamp": "timestamp",
    "type": "message_type",
    "user_id": "user_id",
    "app_id": "app_id",
}
_SHORT_STRINGS = frozenset(
    {"correlation_id", "reply_to", "expiration", "message_id", "type", "user_id", "app_id"}
)
_DEATH_HEADERS = ("x-first-death-queue", "x-first-death-reason", "x-first-death-exchange")
_LAST_DEATH_HEADERS = ("x-last-death-queue", "x-last-death-reason", "x-last-death-exchange")
_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Encoded:
    """A message in wire form: the body, and the content header's property flags and list."""

    body: bytes
    properties: bytes
    #: Also inside ``properties``: the client matches a returned message to its publish by it.
    message_id: str


# Property flags of the content header, in wire order (AMQP 0-9-1, class basic).
_FLAG_CONTENT_TYPE = 1 << 15
_FLAG_CONTENT_ENCODING = 1 << 14
_FLAG_HEADERS = 1 << 13
_WIRE_ORDER = (
    ("delivery_mode", 1 << 12, "octet"),
    ("priority", 1 << 11, "octet"),
    ("correlation_id", 1 << 10, "shortstr"),
    ("reply_to", 1 << 9, "shortstr"),
    ("expiration", 1 << 8, "shortstr"),
    ("message_id", 1 << 7, "shortstr"),
    ("timestamp", 1 << 6, "timestamp"),
    ("type", 1 << 5, "shortstr"),
    ("user_id", 1 << 4, "shortstr"),
    ("app_id", 1 << 3, "shortstr"),
)


def encode(message: TransportMessage, *, extra_headers: Mapping[str, Any] | None = None) -> Encoded:
    """``message`` in wire form; PublishError says what cannot be carried.

    The encoder is celeriac's own rather than pamqp's: it writes field types as py-amqp does
    (floats as 64-bit ``d`` where pamqp writes 32-bit ``f``; empty-string properties kept, where
    pamqp drops them) and validates as it goes, in one pass.
    """
    body = check_message(message)
    for key in message.headers:
        if isinstance(key, str) and key.startswith(RESERVED_PREFIX):
            raise PublishError(f"header {key!r}: names starting {RESERVED_PREFIX!r} are reserved")
    amqp: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in message.properties.items():
        if not isinstance(key, str):
            raise PublishError(f"property names must be strings, got {key!r}")
        if key in AMQP_PROPERTIES and value is not None:
            amqp[key] = _property(key, value)
        elif key in ("content_type", "content_encoding", "headers"):
            raise PublishError(f"{key!r} is a message field, not a property")
        else:
            extras[key] = value
    added: dict[str, Any] = {}
    if extras:
        added[PROPERTIES_HEADER] = extras
    if extra_headers:
        added.update(extra_headers)
    amqp.setdefault("delivery_mode", 2)
    message_id = amqp.setdefault("message_id", AUTO_ID_PREFIX + uuid.uuid4().hex)
    flags = _FLAG_HEADERS
    parts: list[bytes] = []
    if message.content_type:
        flags |= _FLAG_CONTENT_TYPE
        parts.append(_shortstr("content_type", message.content_type))
    if message.content_encoding:
        flags |= _FLAG_CONTENT_ENCODING
        parts.append(_shortstr("content_encoding", message.content_encoding))
    table: list[bytes] = []
    _write_table_items(message.headers, table, "headers", 0)
    if added:
        _write_table_items(added, table, "headers", 0)
    payload = b"".join(table)
    parts.append(_UINT32.pack(len(payload)))
    parts.append(payload)
    for key, flag, kind in _WIRE_ORDER:
        if key not in amqp:
            continue
        flags |= flag
        value = amqp[key]
        if kind == "octet":
            parts.append(bytes((value,)))
        elif kind == "timestamp":
            parts.append(_UINT64.pack(value))
        else:
            parts.append(_shortstr(key, value))
    return Encoded(body, _UINT16.pack(flags) + b"".join(parts), message_id)


_UINT16 = struct.Struct(">H")
_UINT32 = struct.Struct(">I")
_UINT64 = struct.Struct(">Q")
_INT32 = struct.Struct(">i")
_INT64 = struct.Struct(">q")
_DOUBLE = struct.Struct(">d")


def _shortstr(what: str, value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise PublishError(f"{what} is longer than AMQP's 255-byte limit: {value[:40]!r}…")
    return bytes((len(raw),)) + raw


def _write_table_items(table: Any, out: list[bytes], what: str, depth: int) -> None:
    if not isinstance(table, dict):
        raise PublishError(f"{what} must be a dict, got {type(table).__name__}")
    for key, value in table.items():
        if not isinstance(key, str):
            raise PublishError(f"{what}: AMQP table keys must be strings, got {key!r}")
        out.append(_shortstr(f"{what} key", key))
        _write_value(value, out, f"{what}[{key!r}]", depth + 1)


def _write_value(value: Any, out: list[bytes], what: str, depth: int) -> None:
    """Append ``value`` as an AMQP field value (type tag and data), as py-amqp writes it."""
    if depth > _MAX_DEPTH:
        raise PublishError(f"{what}: nested deeper than {_MAX_DEPTH} levels")
    kind = type(value)
    if kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        out.append(b"S" + _UINT32.pack(len(raw)))
        out.append(raw)
    elif value is None:
        out.append(b"V")
    elif isinstance(value, bool):
        out.append(b"t\x01" if value else b"t\x00")
    elif isinstance(value, int):
        if -(2**31) <= value < 2**31:
            out.append(b"I" + _INT32.pack(value))
        elif -(2**63) <= value < 2**63:
            out.append(b"l" + _INT64.pack(value))
        else:
            raise PublishError(f"{what}: {value} does not fit AMQP's 64-bit integers")
    elif isinstance(value, float):
        out.append(b"d" + _DOUBLE.pack(value))
    elif isinstance(value, str):
        _write_value(str(value), out, what, depth)
    elif isinstance(value, bytes | bytearray):
        out.append(b"S" + _UINT32.pack(len(value)))
        out.append(bytes(value))
    elif isinstance(value, list | tuple):
        items: list[bytes] = []
        for i, item in enumerate(value):
            _write_value(item, items, f"{what}[{i}]", depth + 1)
        payload = b"".join(items)
        out.append(b"A" + _UINT32.pack(len(payload)))
        out.append(payload)
    elif isinstance(value, dict):
        entries: list[bytes] = []
        _write_table_items(value, entries, what, depth)
        payload = b"".join(entries)
        out.append(b"F" + _UINT32.pack(len(payload)))
        out.append(payload)
    elif isinstance(value, decimal.Decimal):
        out.append(b"D" + _decimal(value, what))
    elif isinstance(value, _dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
        out.append(b"T" + _UINT64.pack(int(stamp.timestamp())))
    else:
        raise PublishError(f"{what}: a {type(value).__name__} cannot be carried in an AMQP header")


def _decimal(value: decimal.Decimal, what: str) -> bytes:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int) or not 0 <= -exponent <= 255:
        raise PublishError(f"{what}: decimal {value} cannot be carried in an AMQP header")
    number = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    if not -(2**31) <= number < 2**31:
        raise PublishError(f"{what}: decimal {value} has too many digits for an AMQP header")
    return bytes((-exponent,)) + _INT32.pack(number)


def from_amqp(body: bytes, properties: Basic.Properties) -> tuple[TransportMessage, dict[str, Any]]:
    """The message a peer sent, and the headers celeriac or RabbitMQ added (removed from it)."""
    raw = dict(properties.headers or {})
    added: dict[str, Any] = {}
    for key in list(raw):
        if key.startswith(RESERVED_PREFIX) or key == QUORUM_COUNT_HEADER:
            added[key] = raw.pop(key)
    _strip_delay_deaths(raw, added)
    props: dict[str, Any] = {}
    for key, attribute in AMQP_PROPERTIES.items():
        value = getattr(properties, attribute, None)
        if value is None:
            continue
        if key == "timestamp" and isinstance(value, _dt.datetime):
            stamp = value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
            value = int(stamp.timestamp())
        if key == "message_id" and isinstance(value, str) and value.startswith(AUTO_ID_PREFIX):
            continue
        props[key] = value
    extras = added.get(PROPERTIES_HEADER)
    if isinstance(extras, dict):
        props.update(extras)
    message = TransportMessage(
        body=bytes(body),
        content_type=properties.content_type or "",
        content_encoding=properties.content_encoding or "",
        headers=raw,
        properties=props,
    )
    return message, added


def previous_deliveries(added: Mapping[str, Any]) -> tuple[int, int | None]:
    """From the headers :func:`from_amqp` set aside: deliveries before this copy was published
    (``x-celeriac-delivery-count``, 0 when absent) and the quorum queue's count of returns of
    this copy (``x-delivery-count``; None when the header is absent, as on classic queues)."""
    before = _count(added.get(DELIVERY_COUNT_HEADER))
    returned = added.get(QUORUM_COUNT_HEADER)
    return (before or 0), _count(returned)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _strip_delay_deaths(headers: dict[str, Any], added: dict[str, Any]) -> None:
    """Drop the ``x-death`` bookkeeping the delay queues (``celery_delayed_N``) added.

    Entries of other queues (a real dead-lettering) stay, and so do the first/last-death
    headers when they name such a queue.
    """
    deaths = headers.get("x-death")
    if isinstance(deaths, list):
        kept = [d for d in deaths if not (isinstance(d, dict) and _is_delay_queue(d.get("queue")))]
        if len(kept) != len(deaths):
            added["x-death"] = deaths
            if kept:
                headers["x-death"] = kept
            else:
                del headers["x-death"]
    for group in (_DEATH_HEADERS, _LAST_DEATH_HEADERS):
        if _is_delay_queue(headers.get(group[0])):
            for key in group:
                if key in headers:
                    added[key] = headers.pop(key)


def _is_delay_queue(name: Any) -> bool:
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return isinstance(name, str) and name.startswith("celery_delayed_")


def _property(key: str, value: Any) -> Any:
    """A property value checked (and normalised) for its AMQP type."""
    if key in _SHORT_STRINGS:
        if key == "expiration" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # kombu accepts milliseconds as a number too
        if not isinstance(value, str):
            raise PublishError(f"property {key!r} must be a string, got {value!r}")
        if key == "expiration" and not value.isdigit():
            raise PublishError(f"property 'expiration' must be milliseconds, got {value!r}")
        return value
    if key == "delivery_mode":
        if value not in (1, 2) or isinstance(value, bool):
            raise PublishError(f"property 'delivery_mode' must be 1 or 2, got {value!r}")
        return int(value)
    if key == "priority":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise PublishError(f"property 'priority' must be an integer, got {value!r}")
        return min(max(int(value), 0), 255)
    # timestamp: seconds since the epoch, or a datetime (naive = UTC).
    if isinstance(value, _dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
        return max(int(stamp.timestamp()), 0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PublishError(f"property 'timestamp' must be UNIX seconds, got {value!r}")
    return max(int(value), 0)
