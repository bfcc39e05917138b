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

Decoding of consumed messages is celeriac's own too (:func:`decode_properties`): pamqp builds a
``Basic.Properties`` object through a generic, per-field dispatch that cost a worker draining a
queue about a sixth of its CPU. The decoder here reads every field type pamqp reads (RabbitMQ's
errata table: ``t b B s u I i l L f d D S x A T F V``) into the same Python values (``S`` as
``str``, or ``bytes`` when not UTF-8; ``T`` as an aware UTC ``datetime``; ``D`` as ``Decimal``; ``x``
as ``bytearray``), and raises ValueError on anything it does not know, for the caller to hand the
message to pamqp instead. Messages fetched with ``basic.get`` are still decoded by pamqp
(:func:`from_amqp`); both end in :func:`from_wire`.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import functools
import itertools
import math
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(slots=True)
class WireProperties:
    """The basic properties of a received message, as its content header carries them."""

    content_type: str = ""
    content_encoding: str = ""
    headers: dict[str, Any] | None = None
    #: The AMQP properties present, by :data:`AMQP_PROPERTIES` name (``type``, not pamqp's
    #: ``message_type``), as sent: ``message_id`` may be an automatic one; ``timestamp`` is in
    #: UNIX seconds.
    amqp: dict[str, Any] = field(default_factory=dict)


def from_amqp(body: bytes, properties: Basic.Properties) -> tuple[TransportMessage, dict[str, Any]]:
    """:func:`from_wire` for a message pamqp decoded (``basic.get``, or a delivery
    :func:`decode_properties` could not read)."""
    return from_wire(bytes(body), wire_properties(properties))


def wire_properties(properties: Basic.Properties) -> WireProperties:
    """pamqp's ``Basic.Properties`` as :class:`WireProperties`."""
    amqp: dict[str, Any] = {}
    for key, attribute in AMQP_PROPERTIES.items():
        value = getattr(properties, attribute, None)
        if value is None:
            continue
        if key == "timestamp" and isinstance(value, _dt.datetime):
            stamp = value if value.tzinfo else value.replace(tzinfo=_dt.UTC)
            value = int(stamp.timestamp())
        amqp[key] = value
    headers = properties.headers
    return WireProperties(
        properties.content_type or "",
        properties.content_encoding or "",
        dict(headers) if headers else None,
        amqp,
    )


def from_wire(body: bytes, properties: WireProperties) -> tuple[TransportMessage, dict[str, Any]]:
    """The message a peer sent, and the headers celeriac or RabbitMQ added (removed from it).

    The message takes ``properties.headers`` itself (not a copy), without what was set aside.
    """
    raw = properties.headers if properties.headers is not None else {}
    added: dict[str, Any] = {}
    if _has_added(raw):
        for key in list(raw):
            if key.startswith(RESERVED_PREFIX) or key == QUORUM_COUNT_HEADER:
                added[key] = raw.pop(key)
        _strip_delay_deaths(raw, added)
    props = dict(properties.amqp)
    message_id = props.get("message_id")
    if isinstance(message_id, str) and message_id.startswith(AUTO_ID_PREFIX):
        del props["message_id"]
    extras = added.get(PROPERTIES_HEADER)
    if isinstance(extras, dict):
        props.update(extras)
    message = TransportMessage(
        body, properties.content_type, properties.content_encoding, raw, props
    )
    return message, added


#: Every header :func:`from_wire` may set aside starts with one of these.
_ADDED_PREFIXES = (
    RESERVED_PREFIX,
    QUORUM_COUNT_HEADER,
    "x-death",
    "x-first-death-",
    "x-last-death-",
)


def _has_added(headers: dict[str, Any]) -> bool:
    """Whether ``headers`` may hold something celeriac or RabbitMQ added (most messages do not:
    one look at each key spares them the work of setting nothing aside)."""
    return any(map(str.startswith, headers, itertools.repeat(_ADDED_PREFIXES)))


# -- decoding ----------------------------------------------------------------------------------

_unpack_u16 = _UINT16.unpack_from
_unpack_u32 = _UINT32.unpack_from
_unpack_u64 = _UINT64.unpack_from
_unpack_i32 = _INT32.unpack_from
_unpack_i64 = _INT64.unpack_from
_unpack_double = _DOUBLE.unpack_from
_unpack_float = struct.Struct(">f").unpack_from
_unpack_i8 = struct.Struct(">b").unpack_from
_unpack_i16 = struct.Struct(">h").unpack_from
_FLAG_CLUSTER_ID = 1 << 2
#: Nesting the decoder reads; deeper tables and arrays are left to pamqp.
_MAX_READ_DEPTH = 100
_FLAGS_AFTER_HEADERS = sum(flag for _, flag, _ in _WIRE_ORDER) | _FLAG_CLUSTER_ID


def decode_properties(data: bytes) -> WireProperties:
    """The properties of a content header: ``data`` starts at its property flags.

    ValueError (or another exception) when ``data`` is not what this decoder reads: more than
    one flag word, a truncated field, an unknown field type, a string pamqp would not decode.
    """
    flags = _unpack_u16(data, 0)[0]
    if flags & 1:
        raise ValueError("more than one property flag word")
    pos = 2
    content_type = content_encoding = ""
    headers = None
    if flags & _FLAG_CONTENT_TYPE:
        size = data[pos]
        content_type = data[pos + 1 : pos + 1 + size].decode()
        pos += 1 + size
    if flags & _FLAG_CONTENT_ENCODING:
        size = data[pos]
        content_encoding = data[pos + 1 : pos + 1 + size].decode()
        pos += 1 + size
    if flags & _FLAG_HEADERS:
        size = _unpack_u32(data, pos)[0]
        pos += 4
        end = pos + size
        if end > len(data):
            raise ValueError("header table longer than the content header")
        headers = _read_table(data, pos, end, 0)
        pos = end
    amqp: dict[str, Any] = {}
    for key, kind in _plan(flags & _FLAGS_AFTER_HEADERS):
        if kind == _SHORTSTR:
            size = data[pos]
            amqp[key] = data[pos + 1 : pos + 1 + size].decode()
            pos += 1 + size
        elif kind == _OCTET:
            amqp[key] = data[pos]
            pos += 1
        elif kind == _TIMESTAMP:
            amqp[key] = _timestamp_seconds(_unpack_u64(data, pos)[0])
            pos += 8
        else:  # cluster_id: deprecated, not carried
            pos += 1 + data[pos]
    if pos > len(data):
        raise ValueError("truncated content header")
    return WireProperties(content_type, content_encoding, headers, amqp)


_SHORTSTR, _OCTET, _TIMESTAMP, _SKIPPED = range(4)


@functools.cache
def _plan(flags: int) -> tuple[tuple[str, int], ...]:
    """The properties after ``headers`` that ``flags`` marks present, in wire order, with how
    each is read (a handful of combinations recur: each is worked out once)."""
    kinds = {"octet": _OCTET, "shortstr": _SHORTSTR, "timestamp": _TIMESTAMP}
    plan = [(key, kinds[kind]) for key, flag, kind in _WIRE_ORDER if flags & flag]
    if flags & _FLAG_CLUSTER_ID:
        plan.append(("cluster_id", _SKIPPED))
    return tuple(plan)


def _timestamp_seconds(value: int) -> int:
    # As pamqp reads it (above the year 2106 it is taken for milliseconds), then as from_amqp
    # turns pamqp's datetime into seconds.
    if value > 0xFFFFFFFF:
        return int(_dt.datetime.fromtimestamp(value / 1000.0, tz=_dt.UTC).timestamp())
    return value


def _timestamp(value: int) -> _dt.datetime:
    # pamqp's reading of a ``T`` field (milliseconds above the year 2106).
    return _dt.datetime.fromtimestamp(value / 1000.0 if value > 0xFFFFFFFF else value, tz=_dt.UTC)


def _read_table(data: bytes, pos: int, end: int, depth: int) -> dict[str, Any]:
    """The field table in ``data[pos:end]``."""
    table: dict[str, Any] = {}
    while pos < end:
        size = data[pos]
        key = data[pos + 1 : pos + 1 + size].decode()
        pos += 1 + size
        kind = data[pos]
        if kind == 83:  # S, V, I, t: the common cases, read inline
            size = _unpack_u32(data, pos + 1)[0]
            pos += 5
            raw = data[pos : pos + size]
            pos += size
            try:
                table[key] = raw.decode()
            except UnicodeDecodeError:
                table[key] = raw
        elif kind == 86:  # V
            table[key] = None
            pos += 1
        elif kind == 73:  # I
            table[key] = _unpack_i32(data, pos + 1)[0]
            pos += 5
        elif kind == 116:  # t
            table[key] = data[pos + 1] != 0
            pos += 2
        else:
            table[key], pos = _read_value(data, pos, end, depth)
    if pos != end:
        raise ValueError("field table overruns its length")
    return table


def _read_value(data: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
    """The field value (type tag and data) at ``data[pos]``, and where the next one starts."""
    kind = data[pos]
    pos += 1
    value: Any
    if kind == 83:  # S
        size = _unpack_u32(data, pos)[0]
        raw = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
        try:
            value = raw.decode()
        except UnicodeDecodeError:
            value = raw
    elif kind in {86, 0}:  # V, and NUL as pamqp reads it
        value = None
    elif kind == 73:  # I
        value = _unpack_i32(data, pos)[0]
        pos += 4
    elif kind in {108, 76}:  # l, L (pamqp reads both signed)
        value = _unpack_i64(data, pos)[0]
        pos += 8
    elif kind == 116:  # t
        value = data[pos] != 0
        pos += 1
    elif kind == 100:  # d
        value = _unpack_double(data, pos)[0]
        pos += 8
    elif kind in {65, 70}:  # A, F
        if depth >= _MAX_READ_DEPTH:
            raise ValueError("field values nested too deep")
        size = _unpack_u32(data, pos)[0]
        start = pos + 4
        stop = start + size
        if stop > end:
            raise ValueError("nested field longer than its container")
        if kind == 70:
            value = _read_table(data, start, stop, depth + 1)
        else:
            items: list[Any] = []
            while start < stop:
                item, start = _read_value(data, start, stop, depth + 1)
                items.append(item)
            if start != stop:
                raise ValueError("field array overruns its length")
            value = items
        pos = stop
    elif kind == 84:  # T
        value = _timestamp(_unpack_u64(data, pos)[0])
        pos += 8
    elif kind == 98:  # b
        value = _unpack_i8(data, pos)[0]
        pos += 1
    elif kind == 66:  # B
        value = data[pos]
        pos += 1
    elif kind == 115:  # s: a signed short in RabbitMQ's errata (not the spec's short string)
        value = _unpack_i16(data, pos)[0]
        pos += 2
    elif kind == 117:  # u
        value = _unpack_u16(data, pos)[0]
        pos += 2
    elif kind == 105:  # i
        value = _unpack_u32(data, pos)[0]
        pos += 4
    elif kind == 102:  # f
        value = _unpack_float(data, pos)[0]
        pos += 4
    elif kind == 68:  # D
        places = data[pos]
        value = decimal.Decimal(_unpack_i32(data, pos + 1)[0]) * (decimal.Decimal(10) ** -places)
        pos += 5
    elif kind == 120:  # x
        size = _unpack_u32(data, pos)[0]
        value = bytearray(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    else:
        raise ValueError(f"unknown field type {bytes((kind,))!r}")
    if pos > end:
        raise ValueError("field value overruns its container")
    return value, pos


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
