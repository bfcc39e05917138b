"""Deliveries read by celeriac itself: the frame tap (:mod:`celeriac.brokers._amqp_tap`) and the
content-header decoder (:func:`celeriac.brokers._amqp_codec.decode_properties`).

Without a server: the decoder reads every AMQP field type and property into what pamqp (the
client's decoder, which it replaces on the consuming path) reads; the tap hands over the diverted
deliveries and passes every other byte on unchanged, however the stream is cut. Against the real
RabbitMQ: what Celery (py-amqp) sends arrives as sent, priorities and the redelivered flag
included, and a delivery the decoder refuses still arrives, decoded by the client.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import struct
import time
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from celeriac.brokers import _amqp_codec as codec
from celeriac.brokers import _amqp_tap
from celeriac.brokers import amqp as amqp_module
from celeriac.brokers._amqp_tap import DeliveryTap
from celeriac.brokers.amqp import AMQPBroker
from celeriac.brokers.base import PublishRequest, QueueSpec, TransportMessage
from tests import services
from tests.brokers.conftest import bodies, message
from tests.brokers.test_amqp import URL, Env, fetch_all

# -- the decoder (no server) -----------------------------------------------------------------------


def _field(tag: bytes, data: bytes) -> bytes:
    return tag + data


def _long(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _table(entries: list[tuple[str, bytes]]) -> bytes:
    """A field table (without its length) from keys and encoded field values."""
    return b"".join(bytes((len(k.encode()),)) + k.encode() + v for k, v in entries)


#: One field of every type RabbitMQ's errata table has (what pamqp reads), as raw bytes.
EVERY_FIELD_TYPE: list[tuple[str, bytes]] = [
    ("t", _field(b"t", b"\x01")),
    ("t0", _field(b"t", b"\x00")),
    ("b", _field(b"b", struct.pack(">b", -5))),
    ("B", _field(b"B", b"\xfa")),
    ("s", _field(b"s", struct.pack(">h", -300))),
    ("u", _field(b"u", struct.pack(">H", 65000))),
    ("I", _field(b"I", struct.pack(">i", -70000))),
    ("i", _field(b"i", struct.pack(">I", 4_000_000_000))),
    ("l", _field(b"l", struct.pack(">q", -(2**40)))),
    ("L", _field(b"L", struct.pack(">q", 2**62))),
    ("f", _field(b"f", struct.pack(">f", 0.1))),
    ("d", _field(b"d", struct.pack(">d", 0.1))),
    ("D", _field(b"D", b"\x02" + struct.pack(">i", -1234))),
    ("S", _field(b"S", _long("ünïcode ✓".encode()))),
    ("S empty", _field(b"S", _long(b""))),
    ("S not utf-8", _field(b"S", _long(b"\xff\xfe"))),
    ("x", _field(b"x", _long(b"\x00\xff\x01"))),
    ("T", _field(b"T", struct.pack(">Q", 1_700_000_000))),
    ("T ms", _field(b"T", struct.pack(">Q", 1_700_000_000_123))),
    ("V", b"V"),
    ("NUL", b"\x00"),
    ("F", _field(b"F", _long(_table([("k", _field(b"S", _long(b"v"))), ("n", b"V")])))),
    ("F empty", _field(b"F", _long(b""))),
    (
        "A",
        _field(
            b"A",
            _long(
                _field(b"I", struct.pack(">i", 1))
                + _field(b"S", _long(b"two"))
                + b"V"
                + _field(b"A", _long(_field(b"d", struct.pack(">d", 3.5))))
                + _field(b"F", _long(_table([("deep", _field(b"t", b"\x01"))])))
            ),
        ),
    ),
    ("A empty", _field(b"A", _long(b""))),
]


def _nested(depth: int) -> bytes:
    """An array holding an array ... ``depth`` deep."""
    value = b"V"
    for _ in range(depth):
        value = b"A" + _long(value)
    return value


def _properties(headers: bytes | None = None, **values: str) -> bytes:
    """A content header's property flags and list: ``headers`` as a raw table, and the other
    properties given (pamqp's attribute names, values as strings)."""
    flags = 0
    parts: list[bytes] = []
    order = [
        ("content_type", 15),
        ("content_encoding", 14),
        ("headers", 13),
        ("delivery_mode", 12),
        ("priority", 11),
        ("correlation_id", 10),
        ("reply_to", 9),
        ("expiration", 8),
        ("message_id", 7),
        ("timestamp", 6),
        ("message_type", 5),
        ("user_id", 4),
        ("app_id", 3),
        ("cluster_id", 2),
    ]
    for name, bit in order:
        if name == "headers":
            if headers is None:
                continue
            parts.append(_long(headers))
        elif name in values:
            value: Any = values[name]
            if name in ("delivery_mode", "priority"):
                parts.append(bytes((int(value),)))
            elif name == "timestamp":
                parts.append(struct.pack(">Q", int(value)))
            else:
                raw = str(value).encode()
                parts.append(bytes((len(raw),)) + raw)
        else:
            continue
        flags |= 1 << bit
    return struct.pack(">H", flags) + b"".join(parts)


def _pamqp(data: bytes) -> codec.WireProperties:
    """What pamqp decodes from the same bytes, as the transport sees it."""
    properties = Basic.Properties()
    properties.unmarshal(struct.unpack(">h", data[:2])[0], data[2:])
    return codec.wire_properties(properties)


def _same(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal values of the very same types, all the way down."""
    assert type(ours) is type(theirs), (where, ours, theirs)
    if isinstance(ours, dict):
        assert list(ours) == list(theirs), where
        for key in ours:
            _same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(ours, datetime.datetime):
        assert (ours, ours.tzinfo) == (theirs, theirs.tzinfo), where
    else:
        assert ours == theirs, (where, ours, theirs)


def _same_properties(data: bytes) -> codec.WireProperties:
    ours = codec.decode_properties(data)
    theirs = _pamqp(data)
    assert (ours.content_type, ours.content_encoding) == (
        theirs.content_type,
        theirs.content_encoding,
    )
    _same(ours.headers, theirs.headers, "headers")
    _same(ours.amqp, theirs.amqp, "properties")
    return ours


def test_every_field_type_is_read_as_pamqp_reads_it() -> None:
    decoded = _same_properties(_properties(_table(EVERY_FIELD_TYPE)))
    headers = decoded.headers
    assert headers is not None and len(headers) == len(EVERY_FIELD_TYPE)
    assert headers["S not utf-8"] == b"\xff\xfe"
    assert headers["T"] == datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC)
    assert headers["D"] == decimal.Decimal("-12.34")
    assert headers["A"] == [1, "two", None, [3.5], {"deep": True}]
    # Each alone too, as the first and only field (no neighbour to hide an offset error).
    for key, value in EVERY_FIELD_TYPE:
        _same_properties(_properties(_table([(key, value)])))


def test_every_property_is_read_as_pamqp_reads_it() -> None:
    every = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": "2",
        "priority": "9",
        "correlation_id": "c-1",
        "reply_to": "",  # empty, as Celery sends it: kept
        "expiration": "60000",
        "message_id": "m-1",
        "timestamp": "1700000000",
        "message_type": "task",
        "user_id": "guest",
        "app_id": "app",
        "cluster_id": "",
    }
    decoded = _same_properties(_properties(_table([("a", b"V")]), **every))
    assert decoded.amqp["timestamp"] == 1_700_000_000 and decoded.amqp["type"] == "task"
    _same_properties(_properties(None))  # nothing at all
    _same_properties(_properties(None, timestamp=str(1_700_000_000_123)))  # milliseconds
    for name, value in every.items():  # each alone
        _same_properties(_properties(None, **{name: value}))


def test_what_kombu_and_celeriac_write_is_read_as_pamqp_reads_it() -> None:
    from amqp.serialization import dumps

    headers = {
        "lang": "py",
        "task": "proj.add",
        "id": "6f1e",
        "eta": None,
        "timelimit": [None, 0.1],
        "retries": 0,
        "big": 2**40,
        "neg": -(2**62),
        "flag": False,
        "raw": b"\xff",
        "nested": {"ünïcode": "✓", "list": [1, "two", None, [3.5]]},
        "when": datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "cost": decimal.Decimal("12.34"),
    }
    # py-amqp's table, as Celery sends it: 'L' for big integers, bytes as 'S'.
    kombus = dumps("F", [headers])
    _same_properties(struct.pack(">H", 1 << 13) + kombus)
    ours = codec.encode(
        message("{}", headers=headers, correlation_id="c", reply_to="", priority=3, x="y")
    )
    decoded = _same_properties(ours.properties)
    got, added = codec.from_wire(b"{}", decoded)
    assert got.headers == headers and got.properties == {
        "correlation_id": "c",
        "reply_to": "",
        "priority": 3,
        "delivery_mode": 2,
        "x": "y",
    }
    assert set(added) == {codec.PROPERTIES_HEADER}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x20",  # flags cut short
        struct.pack(">H", 1 << 15) + b"\x05ab",  # content type cut short
        struct.pack(">H", 1 << 13) + struct.pack(">I", 100),  # table longer than the header
        _properties(_table([("k", b"Z")])),  # unknown field type
        _properties(_table([("k", b"S" + struct.pack(">I", 50) + b"short")])),  # value overruns
        _properties(_table([("k", b"I\x00")])),  # integer cut short
        _properties(_table([("k", b"A" + struct.pack(">I", 3) + b"I\x00\x00\x00\x01")])),
        struct.pack(">H", (1 << 15) | 1) + b"\x00\x00" + b"\x01a",  # a second flag word
        _properties(b"\x01\xffV"),  # a key that is not UTF-8
        _properties(_table([("cut", b"A\x00\x00")])),  # array length cut short
        _properties(_table([("deep", _nested(101))])),  # deeper than the decoder reads
    ],
)
def test_what_the_decoder_cannot_read_is_refused(data: bytes) -> None:
    """Refused (for the client to decode, or fail on, as it would have), never misread."""
    with pytest.raises(Exception):  # noqa: B017 - any exception hands the delivery to pamqp
        codec.decode_properties(data)


# -- the tap (no server) ---------------------------------------------------------------------------


def _deliver(channel: int, tag: int, body: bytes, *, ctag: str = "ctag1", **kw: Any) -> bytes:
    """The frames of one basic.deliver, marshalled by pamqp; the body split at 10 bytes."""
    properties = Basic.Properties(content_type="application/json", headers={"id": str(tag)}, **kw)
    frames = [
        pamqp_frame.marshal(
            Basic.Deliver(
                consumer_tag=ctag,
                delivery_tag=tag,
                redelivered=tag % 2 == 0,
                exchange="ex",
                routing_key="rk",
            ),
            channel,
        ),
        pamqp_frame.marshal(ContentHeader(0, len(body), properties), channel),
    ]
    frames += [
        pamqp_frame.marshal(ContentBody(body[i : i + 10]), channel) for i in range(0, len(body), 10)
    ]
    return b"".join(frames)


def _other_frames(channel: int) -> bytes:
    """Frames the tap must pass on: a reply, a basic.get-ok with its content, a heartbeat."""
    get_ok = pamqp_frame.marshal(
        Basic.GetOk(delivery_tag=99, exchange="", routing_key="q", message_count=0), channel
    )
    header = pamqp_frame.marshal(ContentHeader(0, 3, Basic.Properties()), channel)
    return (
        pamqp_frame.marshal(Basic.QosOk(), channel)
        + get_ok
        + header
        + pamqp_frame.marshal(ContentBody(b"got"), channel)
        + pamqp_frame.marshal(Heartbeat(), 0)
    )


class Taken:
    def __init__(self, *, refuse: bool = False, fail: bool = False) -> None:
        self.deliveries: list[tuple[Any, ...]] = []
        self.refuse, self.fail = refuse, fail

    def __call__(self, *args: Any) -> bool:
        if self.fail:
            raise RuntimeError("cannot take it")
        self.deliveries.append(args)
        return not self.refuse


def _feed(stream: bytes, chunk: int, **sinks: Taken) -> bytes:
    """Feed ``stream`` to a tap in pieces of ``chunk`` bytes (sinks by channel ``c<n>``); what
    it passed on to the client."""
    loop = asyncio.new_event_loop()
    try:
        tap = DeliveryTap(loop)
        for name, sink in sinks.items():
            tap.divert(int(name[1:]), sink)
        for start in range(0, len(stream), chunk):
            tap.feed_data(stream[start : start + chunk])
        tap.feed_eof()
        return loop.run_until_complete(tap.read())
    finally:
        loop.close()


@pytest.mark.parametrize("chunk", [1, 7, 61, 1000, 1 << 20])
def test_the_tap_takes_the_diverted_deliveries_and_passes_the_rest_on(chunk: int) -> None:
    long_body = bytes(range(256)) * 3  # 77 body frames
    stream = b"".join(
        [
            _deliver(1, 1, b"first"),
            _other_frames(1),  # a reply, and a get-ok's content, on the diverted channel
            _deliver(2, 1, b"not diverted"),
            _deliver(1, 2, long_body, priority=5),
            _other_frames(2),
            _deliver(1, 3, b""),  # no body frame at all
        ]
    )
    sink = Taken()
    passed = _feed(stream, chunk, c1=sink)
    assert passed == _other_frames(1) + _deliver(2, 1, b"not diverted") + _other_frames(2)
    assert [d[:5] for d in sink.deliveries] == [
        ("ctag1", 1, False, "ex", "rk"),
        ("ctag1", 2, True, "ex", "rk"),
        ("ctag1", 3, False, "ex", "rk"),
    ]
    assert [d[6] for d in sink.deliveries] == [b"first", long_body, b""]
    second = codec.decode_properties(sink.deliveries[1][5])
    assert second.headers == {"id": "2"} and second.amqp == {"priority": 5}


@pytest.mark.parametrize("chunk", [1, 13, 1 << 20])
def test_a_refused_delivery_reaches_the_client_as_it_came(chunk: int) -> None:
    stream = (
        _deliver(1, 1, b"x" * 25, message_id="m")
        + _other_frames(1)
        + _deliver(1, 2, b"", ctag="other")
    )
    for sink in (Taken(refuse=True), Taken(fail=True)):
        passed = _feed(stream, chunk, c1=sink)
        assert passed == stream


def test_what_is_not_frames_goes_to_the_client_whole() -> None:
    # The server refusing the protocol version answers with a protocol header, not a frame.
    refusal = b"AMQP\x00\x00\x09\x01"
    passed = _feed(refusal, 3, c1=Taken())
    assert passed == refusal
    # A corrupt frame mid-stream: a delivery being assembled and everything after go on as is.
    start = _deliver(1, 1, b"0123456789abc")
    cut = len(start) - 12  # inside the second body frame
    broken = start[:cut] + b"\x01\x00\x01\x00\x00\x00\x01Z\x00" + _deliver(1, 2, b"y")
    sink = Taken()
    passed = _feed(broken, 1 << 20, c1=sink)
    assert sink.deliveries == []
    assert passed == broken


def test_a_frame_cut_short_by_the_end_of_the_stream_reaches_the_client() -> None:
    stream = _other_frames(1) + _deliver(2, 1, b"body")[:-3]
    passed = _feed(stream, 5, c1=Taken())
    assert passed == stream


def test_the_client_is_shown_a_heartbeat_while_only_deliveries_arrive() -> None:
    loop = asyncio.new_event_loop()
    try:
        tap = DeliveryTap(loop)
        sink = Taken()
        tap.divert(1, sink)
        tap.feed_data(_deliver(1, 1, b"a"))  # just started: nothing to show
        assert len(tap._buffer) == 0
        tap._passed_at = time.monotonic() - 2 * _amqp_tap._LIVENESS
        tap.feed_data(_deliver(1, 2, b"b"))
        assert bytes(tap._buffer) == pamqp_frame.marshal(Heartbeat(), 0)
        tap.feed_data(_deliver(1, 3, b"c"))  # not again at once
        assert bytes(tap._buffer) == pamqp_frame.marshal(Heartbeat(), 0)
        assert len(sink.deliveries) == 3
        tap.stop_diverting(1)
        tap.feed_data(_deliver(1, 4, b"d"))
        assert bytes(tap._buffer).endswith(_deliver(1, 4, b"d"))
    finally:
        loop.close()


def test_ack_frames_are_written_as_the_client_writes_them() -> None:
    from celeriac.brokers.amqp import _ACK_FRAME

    for channel, tag, multiple in [(1, 1, False), (7, 2**40, True), (65535, 2**63 - 1, False)]:
        ours = _ACK_FRAME.pack(1, channel, 13, 60, 80, tag, 1 if multiple else 0, 0xCE)
        assert ours == pamqp_frame.marshal(Basic.Ack(tag, multiple), channel)


# -- against RabbitMQ ------------------------------------------------------------------------------


@pytest.fixture
def env() -> Iterator[Env]:
    services.require_rabbitmq()
    environment = Env()
    yield environment
    environment.cleanup()


def _tapped(broker: AMQPBroker) -> bool:
    """Whether the broker's consuming channel is read by the tap."""
    link = broker._link
    return (
        link is not None
        and link.tap is not None
        and link.consumption is not None
        and link.tap.diverting(link.consumption.channel.number)
    )


def test_what_celery_sends_arrives_as_sent_with_priorities(env: Env) -> None:
    """py-amqp (Celery's client) writes every header type it has; priorities order the queue."""
    headers = {
        "lang": "py",
        "task": "proj.add",
        "eta": None,
        "timelimit": [None, 0.1],
        "retries": 0,
        "big": 2**40,
        "neg": -(2**62),
        "flag": True,
        "raw": b"\xff\xfe",
        "nested": {"ünïcode": "✓", "list": [1, "two", None, [3.5]], "empty": {}},
        "when": datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "cost": decimal.Decimal("-12.34"),
    }

    async def scenario() -> None:
        broker = await env.broker()
        await broker.declare(QueueSpec("prio", exchange="prio", routing_key="prio", max_priority=9))
        with kombu.Connection(URL) as connection:
            producer = kombu.Producer(connection.default_channel)
            for i, priority in enumerate([0, 9, 3, 9, 5]):
                producer.publish(
                    f"[{i}]".encode(),
                    exchange=env.wire("prio"),
                    routing_key="prio",
                    content_type="application/json",
                    content_encoding="utf-8",
                    headers={**headers, "id": str(i)},
                    correlation_id=str(i),
                    reply_to="",
                    priority=priority,
                    delivery_mode=2,
                    expiration=60,  # seconds, sent as "60000" (milliseconds)
                    timestamp=1_700_000_000,
                    type="task",
                    app_id="bench",
                )
        got = await fetch_all(broker, "prio", 5, 5)
        assert _tapped(broker)
        assert [d.message.priority for d in got] == [9, 9, 5, 3, 0]
        assert bodies(got) == ["[1]", "[3]", "[4]", "[2]", "[0]"]
        for delivery in got:
            _same(delivery.message.headers, {**headers, "id": delivery.message.body[1:2].decode()})
            assert delivery.message.properties == {
                "correlation_id": delivery.message.headers["id"],
                "reply_to": "",
                "priority": delivery.message.priority,
                "delivery_mode": 2,
                "expiration": "60000",
                "timestamp": 1_700_000_000,
                "type": "task",
                "app_id": "bench",
            }
            assert (delivery.exchange, delivery.routing_key, delivery.queue) == (
                "prio",
                "prio",
                "prio",
            )
            assert (delivery.redelivered, delivery.delivery_count) == (False, 1)
        await broker.ack(got)

    env.run(scenario)


def test_redelivered_and_large_messages_through_the_tap(env: Env) -> None:
    """A message a closed connection held comes back flagged and counted; a body larger than
    RabbitMQ's frame size (three body frames) arrives whole."""
    large = bytes(range(256)) * 1200  # 307,200 bytes

    async def scenario() -> None:
        first = await env.broker()
        await first.publish_many(
            [
                PublishRequest(message("held", correlation_id="c"), "", "q"),
                PublishRequest(
                    TransportMessage(large, "application/octet-stream", "binary"), "", "q"
                ),
            ]
        )
        [held] = await first.fetch(["q"], 1, 5)
        assert _tapped(first) and (held.redelivered, held.delivery_count) == (False, 1)
        await first.close()  # gives back the large one unused; "held" comes back redelivered
        second = await env.broker()
        got = await fetch_all(second, "q", 2, 5)
        assert _tapped(second)
        by_body = {d.message.body[:4]: d for d in got}
        again = by_body[b"held"]
        assert (again.redelivered, again.delivery_count) == (True, 2)
        assert again.message == held.message
        whole = next(d for d in got if d is not again)
        assert whole.message.body == large and not whole.redelivered
        await second.ack(got)
        assert await second.size("q") == 0

    env.run(scenario)


def test_a_delivery_the_decoder_refuses_is_decoded_by_the_client(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tap hands such a delivery to aiormq as it came; its consumer callback takes it."""
    refused: list[bytes] = []
    decode = codec.decode_properties

    def picky(data: bytes) -> codec.WireProperties:
        properties = decode(data)
        if properties.amqp.get("correlation_id") == "refuse":
            refused.append(data)
            raise ValueError("not this one")
        return properties

    monkeypatch.setattr(codec, "decode_properties", picky)

    async def scenario() -> None:
        broker = await env.broker()
        await broker.publish_many(
            [
                PublishRequest(message(body, correlation_id=body, priority=1), "", "q")
                for body in ("a", "refuse", "b")
            ]
        )
        got = await fetch_all(broker, "q", 3, 5)
        assert _tapped(broker) and len(refused) == 1
        assert sorted(bodies(got)) == ["a", "b", "refuse"]
        slow = next(d for d in got if d.message.body == b"refuse")
        assert slow.message.properties == {
            "correlation_id": "refuse",
            "priority": 1,
            "delivery_mode": 2,
        }
        await broker.ack(got)
        assert await broker.size("q") == 0

    env.run(scenario)


@pytest.mark.parametrize("frames", [True, False])
def test_acks_written_as_frames_or_by_the_client(
    env: Env, monkeypatch: pytest.MonkeyPatch, frames: bool
) -> None:
    """Acks go out as celeriac's frames, or through aiormq's basic_ack where its frame type
    lacks what that needs; RabbitMQ takes both (an unknown tag would close the channel)."""
    if not frames:
        monkeypatch.setattr(amqp_module, "_writes_frames", lambda channel: False)

    async def scenario() -> None:
        broker = await env.broker()
        await broker.publish_many([PublishRequest(message(str(i)), "", "q") for i in range(12)])
        got = await fetch_all(broker, "q", 12, 5)
        link = broker._link
        assert link is not None and link.consumption is not None
        consumption = link.consumption
        await broker.ack(got[4:8])  # singles: older ones are still unsettled
        await broker.ack(got[:4])  # the oldest run: one multiple ack
        await broker.ack([got[11], got[8], got[8]])
        await broker.ack(got)
        assert await broker.size("q") == 0
        assert link.consumption is consumption and consumption.alive  # no channel error
        await broker.publish(message("next"), exchange="", routing_key="q")
        assert bodies(await fetch_all(broker, "q", 1, 5)) == ["next"]

    env.run(scenario)
