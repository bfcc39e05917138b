"""What the Redis transport stores, and how: key names, the message envelope, priority buckets.

The layout is kombu 5.7's (``kombu/transport/redis.py``), so Celery workers and clients share a
Redis with celeriac: each side reads what the other writes. What celeriac adds lives under keys of
its own (``_celeriac.*``) that kombu never reads. Every key and pub/sub channel starts with the
transport option ``global_keyprefix`` (``P`` below, empty by default), as in kombu.

Shared with kombu
-----------------

``P<queue>``, ``P<queue>\\x06\\x16<step>`` — lists
    Ready messages, one JSON envelope per item. Producers ``LPUSH``, consumers pop from the right
    (``RPOP``): the list is FIFO from right to left, and ``RPUSH`` puts a message at the front.
    Priorities go to buckets: the message's ``priority`` property (0-9, capped by the queue's
    ``max_priority``) is rounded down to a step of ``priority_steps`` (default 0, 3, 6, 9); bucket
    0 is the plain queue name, the others carry the separator (transport option ``sep``) and the
    step. Buckets are consumed step 0 first, then 3, 6, 9 — **priority 0 is served first on
    Redis**, the opposite of AMQP, exactly as kombu does, so a mixed fleet agrees on the order.
``P_kombu.binding.<exchange>``, ``P_kombu.binding_permanent.<exchange>`` — sets
    Bindings of named exchanges: members ``<binding key><sep><pattern><sep><queue>``. ``pattern``
    is empty for direct and fanout exchanges; for topic exchanges it is the regular expression
    kombu derives from the binding key (:func:`topic_pattern`), so that kombu publishers can match
    it. celeriac itself routes topics by the binding key with AMQP's rules (``logs.#`` matches
    ``logs``; kombu's regular expression does not). The permanent set (kombu 5.7) keeps kombu's
    binding sweeper from deleting a table that a queue without ``x-expires`` still needs.
``Punacked`` — hash, ``Punacked_index`` — sorted set
    kombu's in-flight record: ``tag -> JSON [envelope, exchange, routing_key]`` and ``tag -> time
    of delivery (or last renewal)``. celeriac records every fetched message there too, under a tag
    of its own, fresh for each delivery: ``celeriac:<order>:<16 hex>:<step>``. ``order`` is the
    time of the fetch in microseconds (16 digits) and the rank in that fetch (6 digits), the hex
    part is random, and the step names the bucket the message came from. Its entry is
    ``[envelope, "", <queue>]``: with the default exchange and the queue as routing key, a Celery
    worker's restore (``QoS.restore_visible``) puts the message back into exactly the queue it was
    fetched from, where restoring by the original exchange would copy it to every queue bound to
    it.
``P/<db>.<exchange>`` and ``P/<db>.<exchange>/<routing key>`` — pub/sub channels
    Fanout exchanges, as kombu: a message published to a fanout exchange goes to whoever is
    subscribed at that moment, and is stored nowhere (best effort). celeriac subscribes both the
    plain channel and every routing key (``…/*``), because AMQP fanout ignores routing keys.

celeriac's own
--------------

``P_celeriac.leases.<queue>`` — sorted set
    ``token -> lease deadline`` (UNIX time) of every delivery of that queue made by celeriac.
    :meth:`renew` moves the deadline; once it passed, the next fetch of that queue puts the
    message back at the front of its bucket, with kombu's ``redelivered`` flags set and the
    delivery counter counted up. One sorted set per queue makes "is anything of this queue due"
    cheap for every fetch, and lets :meth:`size` count expired leases of one queue.
``P_celeriac.delayed.<queue>`` — sorted set, ``P_celeriac.delayed_messages.<queue>`` — hash
    Messages published with ``not_before`` in the future, and deferred deliveries: ``member -> due
    time`` and ``member -> "<step>:<envelope>"``. The fetch script moves due ones to the front of
    their bucket, in due order, inside the same atomic step that leases — so exactly one consumer
    promotes each, however many there are.
``P_celeriac.exchanges`` — hash
    ``exchange -> type`` (direct, topic, fanout) of exchanges celeriac declared, because kombu
    keeps exchange types in process memory only. A named exchange that only kombu declared (no
    entry here, but a binding table) is taken as topic if one of its bindings has a pattern, else
    direct.
``P_celeriac.max_priority`` — hash
    ``queue -> max_priority`` of queues declared with one (priorities above it are capped).
``P_celeriac.dead_letters`` — list, newest first
    ``{"queue", "reason", "at", "message": <envelope>}`` of rejected messages, trimmed to the
    transport option ``dead_letter_limit`` (default 10,000).

The envelope
------------

kombu's JSON document (:func:`encode_envelope`)::

    {"body": "<base64>", "content-encoding": "utf-8", "content-type": "application/json",
     "headers": {...}, "properties": {..., "delivery_info": {"exchange": "", "routing_key": "q"},
     "body_encoding": "base64", "delivery_tag": "<uuid4>"}}

``delivery_info``, ``delivery_tag`` and ``body_encoding`` belong to the transport and are set on
publish. A restore sets ``headers.redelivered`` and ``properties.delivery_info.redelivered`` as
kombu does; celeriac's restore also counts the delivery in the property
``x-celeriac-delivery-count`` (the number of the delivery that was lost), which kombu carries
through untouched. A message given back to the front of its queue (a restore, a requeue) also
gets its token's ``order`` in ``x-celeriac-order``, and goes behind the messages at the front
that were given back before it but delivered earlier: messages given back one by one keep the
order they were fetched in. A fetched message comes back without ``delivery_info``,
``delivery_tag``, these two properties and a ``redelivered: true`` header: the
:class:`~celeriac.brokers.base.Delivery` reports them instead.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import secrets
from binascii import a2b_base64
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from celeriac.brokers._common import check_message
from celeriac.brokers.base import TransportMessage
from celeriac.codecs.json import Scanner
from celeriac.exceptions import ImproperlyConfigured, PublishError
from celeriac.protocol.message import uuid4_text

#: kombu's separator between a queue name and its priority step, and inside binding members.
DEFAULT_SEP = "\x06\x16"
#: kombu's default priority buckets.
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
#: kombu caps priorities at 9 on Redis; celeriac does the same so both pick the same bucket.
MAX_PRIORITY = 9
#: Envelope property holding the number of the last delivery a restore gave back.
DELIVERY_COUNT = "x-celeriac-delivery-count"
#: Envelope property of a message given back: when and in which rank it had been delivered.
ORDER = "x-celeriac-order"
#: Properties the transport owns: set on publish, removed from fetched messages.
TRANSPORT_PROPERTIES = ("delivery_info", "delivery_tag", DELIVERY_COUNT, ORDER)


_json_decoder = json.JSONDecoder()
_json_decode = _json_decoder.decode
_json_scan: Scanner = _json_decoder.scan_once  # type: ignore[attr-defined]


def _c_encoder_factory() -> Callable[..., Callable[[Any, int], list[str]]] | None:
    try:
        from _json import make_encoder
    except ImportError:  # pragma: no cover - CPython always has it
        return None
    return cast("Callable[..., Callable[[Any, int], list[str]]]", make_encoder)


_make_encoder = _c_encoder_factory()
_json_default = json.JSONEncoder().default


def _json_dumps(document: dict[str, Any]) -> str:
    """``json.dumps(document)`` with its defaults, the same text, without the call's setting up.

    ``json.dumps`` checks its arguments and builds a C encoder on every call, which costs a
    fifth of encoding an envelope; this builds the encoder ``json.dumps`` would build (fresh
    circular-reference markers each time, as there) and runs it.
    """
    if _make_encoder is None:  # pragma: no cover
        return json.dumps(document)
    encode = _make_encoder(
        {},
        _json_default,
        json.encoder.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        True,
    )
    return "".join(encode(document, 0))


class MalformedEnvelope(ValueError):
    """A list item that is not a kombu envelope celeriac can read."""


@dataclass(slots=True, frozen=True)
class Layout:
    """Key and channel names of one Redis broker (one ``global_keyprefix`` on one database)."""

    prefix: str = ""
    sep: str = DEFAULT_SEP
    steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    db: int = 0

    # -- kombu's keys ---------------------------------------------------------------------------

    def bucket(self, queue: str, step: int = 0) -> str:
        """The list of ``queue`` holding priority step ``step``."""
        if step == 0:
            return self.prefix + queue
        return f"{self.prefix}{queue}{self.sep}{step}"

    def buckets(self, queue: str) -> list[str]:
        return [self.bucket(queue, step) for step in self.steps]

    def fetch_order(self, queues: Sequence[str]) -> list[tuple[str, int, int]]:
        """``(key, queue index, step)`` in kombu's consume order: by step, then queue order."""
        return [
            (self.bucket(queue, step), index, step)
            for step in self.steps
            for index, queue in enumerate(queues)
        ]

    def step_for(self, priority: int, max_priority: int | None = None) -> int:
        """The bucket step of a message priority (capped at 9 and at the queue's maximum)."""
        ceiling = MAX_PRIORITY if max_priority is None else min(max_priority, MAX_PRIORITY)
        value = min(max(priority, 0), ceiling)
        return self.steps[bisect_right(self.steps, value) - 1]

    @property
    def unacked(self) -> str:
        return self.prefix + "unacked"

    @property
    def unacked_index(self) -> str:
        return self.prefix + "unacked_index"

    def binding(self, exchange: str) -> str:
        return f"{self.prefix}_kombu.binding.{exchange}"

    def binding_permanent(self, exchange: str) -> str:
        return f"{self.prefix}_kombu.binding_permanent.{exchange}"

    def binding_member(self, spec_routing_key: str, pattern: str, queue: str) -> str:
        return self.sep.join([spec_routing_key, pattern, queue])

    @property
    def channel_prefix(self) -> str:
        """Start of every fanout channel: ``P/<db>.``."""
        return f"{self.prefix}/{self.db}."

    def fanout_channel(self, exchange: str, routing_key: str) -> str:
        """The channel a message to a fanout exchange is published on (kombu's fanout_patterns)."""
        channel = self.channel_prefix + exchange
        return f"{channel}/{routing_key}" if routing_key else channel

    def fanout_patterns(self, exchange: str) -> tuple[str, str]:
        """PSUBSCRIBE patterns receiving every message of ``exchange``, whatever its routing key."""
        channel = _glob_escape(self.channel_prefix + exchange)
        return channel, channel + "/*"

    # -- celeriac's keys ------------------------------------------------------------------------

    def leases(self, queue: str) -> str:
        return f"{self.prefix}_celeriac.leases.{queue}"

    def delayed(self, queue: str) -> str:
        return f"{self.prefix}_celeriac.delayed.{queue}"

    def delayed_messages(self, queue: str) -> str:
        return f"{self.prefix}_celeriac.delayed_messages.{queue}"

    @property
    def exchanges(self) -> str:
        return self.prefix + "_celeriac.exchanges"

    @property
    def max_priority(self) -> str:
        return self.prefix + "_celeriac.max_priority"

    @property
    def dead_letters(self) -> str:
        return self.prefix + "_celeriac.dead_letters"


def check_priority_steps(value: Any) -> tuple[int, ...]:
    """Validate the ``priority_steps`` transport option (kombu's name and meaning)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ImproperlyConfigured(
            f"priority_steps must be a list of integers starting with 0, e.g. [0, 3, 6, 9], "
            f"got {value!r}"
        )
    steps = list(value)
    if (
        not steps
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
        or steps[0] != 0
        or any(b <= a for a, b in itertools.pairwise(steps))
        or steps[-1] > MAX_PRIORITY
    ):
        raise ImproperlyConfigured(
            f"priority_steps must be increasing integers from 0 to at most {MAX_PRIORITY}, "
            f"starting with 0 (kombu's default is [0, 3, 6, 9]), got {value!r}"
        )
    return tuple(steps)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def topic_pattern(binding_key: str) -> str:
    """The regular expression kombu stores for a topic binding (``TopicExchange.key_to_pattern``).

    ``*`` becomes one word, ``#`` any run of characters, everything else is escaped, and the words
    are joined with ``\\.``: ``a.*.#`` -> ``^a\\.[^\\.]+\\..*?$``.
    """
    escaped = "".join(
        c if c.isalnum() or c in ".#*" else ("\\000" if c == "\000" else "\\" + c)
        for c in binding_key
    )
    wildcards = {"*": r"[^\.]+", "#": r".*?"}
    words = r"\.".join(wildcards.get(word, word) for word in escaped.split("."))
    return f"^{words}$"


def lease_token_base() -> str:
    """The random part shared by the tokens of one fetch (the script adds time and rank)."""
    return secrets.token_hex(8)


# -- the envelope -----------------------------------------------------------------------------


def encode_envelope(
    message: TransportMessage, exchange: str, routing_key: str, tag: str | None = None
) -> tuple[bytes, str]:
    """kombu's JSON envelope of ``message`` and its ``delivery_tag``; PublishError if not JSON.

    ``tag`` is the delivery tag to give it (a UUID's text); a fresh one when not given.
    """
    body = check_message(message)
    properties = {k: v for k, v in message.properties.items() if k not in TRANSPORT_PROPERTIES}
    properties["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    properties["body_encoding"] = "base64"
    if tag is None:
        tag = uuid4_text()
    properties["delivery_tag"] = tag
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": properties,
    }
    try:
        # kombu's own spelling: json.dumps defaults (", " and ": ", ASCII only).
        text = _json_dumps(envelope)
    except (TypeError, ValueError) as exc:
        raise PublishError(f"message cannot be carried by the broker: {exc}") from exc
    return text.encode("ascii"), tag


class Decoded(NamedTuple):
    """A fetched envelope, as celeriac hands it to a consumer."""

    message: TransportMessage
    exchange: str
    routing_key: str
    redelivered: bool
    delivery_count: int


def parse_envelope(raw: bytes) -> dict[str, Any]:
    """The JSON object of a list item; MalformedEnvelope if it is none."""
    try:
        # kombu stores text (ASCII JSON): UTF-8, without json.loads' sniffing of UTF-16/32.
        text = raw.decode("utf-8")
        # The scanner straight away (see celeriac.codecs.json.decode); text it does not take
        # whole goes through the decoder, whose error names what is wrong.
        try:
            document, end = _json_scan(text, 0)
        except StopIteration:
            document = end = None
        if end != len(text):
            document = _json_decode(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEnvelope(f"not a JSON envelope: {exc}") from None
    if type(document) is not dict:
        raise MalformedEnvelope(f"not a JSON object but {type(document).__name__}")
    return document


def decode_envelope(document: dict[str, Any], queue: str) -> Decoded:
    """Rebuild the message of an envelope; MalformedEnvelope says what is wrong with it.

    The message takes the envelope's ``headers`` and ``properties`` dicts over (without the
    transport's own entries) rather than copying them: ``document`` is a freshly parsed envelope
    nobody else holds. It is left untouched when the envelope is malformed.
    """
    get = document.get
    headers = get("headers")
    properties = get("properties")
    if headers is None:
        headers = {}
    if properties is None:
        properties = {}
    if not isinstance(headers, dict) or not isinstance(properties, dict):
        raise MalformedEnvelope("headers and properties must be JSON objects")
    body = get("body")
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        if not isinstance(body, str):
            raise MalformedEnvelope("a base64 body must be a string")
        try:
            # What base64.b64decode does with text, without its argument handling.
            data = a2b_base64(body)
        except ValueError as exc:  # binascii.Error, or text that is not ASCII
            raise MalformedEnvelope(f"body cannot be decoded: {exc}") from None
    elif encoding is None or (isinstance(encoding, str) and encoding.lower() == "utf-8"):
        if not isinstance(body, str):
            raise MalformedEnvelope("the body must be a string")
        try:
            data = body.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate from a \ud800 escape
            raise MalformedEnvelope(f"body cannot be decoded: {exc}") from None
    else:
        raise MalformedEnvelope(f"unknown body_encoding {encoding!r}")
    # The transport's own properties (TRANSPORT_PROPERTIES) leave the message here.
    info = properties.pop("delivery_info", None)
    properties.pop("delivery_tag", None)
    counted = properties.pop(DELIVERY_COUNT, 0)
    properties.pop(ORDER, None)
    if not isinstance(info, dict):
        info = _NO_INFO
    if (
        type(counted) is not int and (not isinstance(counted, int) or isinstance(counted, bool))
    ) or counted < 0:
        counted = 0
    if headers.get("redelivered") is True:
        del headers["redelivered"]
        redelivered = True
    else:
        redelivered = info.get("redelivered") is True
    exchange = info.get("exchange")
    routing_key = info.get("routing_key")
    content_type = get("content-type")
    content_encoding = get("content-encoding")
    return Decoded(
        TransportMessage(
            data,
            content_type if isinstance(content_type, str) else "",
            content_encoding if isinstance(content_encoding, str) else "",
            headers,
            properties,
        ),
        exchange if isinstance(exchange, str) else "",
        routing_key if isinstance(routing_key, str) else queue,
        redelivered or counted > 0,
        # A message kombu restored carries the flags but no counter: at least its second delivery.
        counted + 1 if counted or not redelivered else 2,
    )


#: What a missing ``delivery_info`` stands for (only read).
_NO_INFO: dict[str, Any] = {}


def mark_redelivered(raw: bytes) -> bytes:
    """The envelope as a restore leaves it (the Python twin of the scripts' ``redelivered``)."""
    document = parse_envelope(raw)
    headers = document.get("headers")
    properties = document.get("properties")
    if not isinstance(properties, dict):
        properties = document["properties"] = {}
    info = properties.get("delivery_info")
    counted = properties.get(DELIVERY_COUNT)
    if not isinstance(counted, int) or isinstance(counted, bool) or counted < 0:
        counted = 0
    flagged = (isinstance(headers, dict) and headers.get("redelivered") is True) or (
        isinstance(info, dict) and info.get("redelivered") is True
    )
    if isinstance(headers, dict):
        headers["redelivered"] = True
    if isinstance(info, dict):
        info["redelivered"] = True
    properties[DELIVERY_COUNT] = max(counted + 1, 2 if flagged else 1)
    return json.dumps(document).encode("ascii")
