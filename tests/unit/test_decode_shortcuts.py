"""The shortcuts of decoding a message and writing its result give what the long way gives.

Both run once per task, so they take shortcuts for the usual case: type checks inline instead of a
validator call per field, the JSON scanner without the decoder's wrapper, one C encoder built once,
the date of ``date_done`` formatted once a second, constructors called positionally. Each test
holds a shortcut to the computation it replaces, over usual and unusual inputs alike: the same
value, or the same error.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import time
import types
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

import pytest

from celeriac import codecs
from celeriac.app.context import Context
from celeriac.backends.meta import build_meta, now_text
from celeriac.brokers._redis_layout import (
    DELIVERY_COUNT,
    ORDER,
    TRANSPORT_PROPERTIES,
    MalformedEnvelope,
    decode_envelope,
    parse_envelope,
)
from celeriac.brokers.base import Delivery
from celeriac.codecs import json as json_codec
from celeriac.exceptions import DecodeError, EncodeError, InvalidTaskError
from celeriac.protocol import validate
from celeriac.protocol.envelope import TransportMessage
from celeriac.protocol.message import TaskMessage
from celeriac.worker.request import Request

GOLDEN = Path(__file__).parent.parent / "golden"

# -- build_message -----------------------------------------------------------------------------


def long_way(
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    args: Any,
    kwargs: Any,
    embed: Any,
    *,
    protocol: int,
    naive_tz: tzinfo | None = UTC,
) -> TaskMessage:
    """``build_message`` as one validator call per field, in the order of the fields."""
    v = validate
    if embed is None:
        embed = {}
    elif not isinstance(embed, Mapping):
        raise v._invalid("embed", "an object with callbacks/errbacks/chain/chord, or null", embed)
    get = headers.get
    return TaskMessage(
        id=v._required_str("id", get("id")),
        task=v._required_str("task", get("task")),
        args=v._args(args),
        kwargs=v._kwargs(kwargs),
        eta=v._when("eta", get("eta"), naive_tz),
        expires=v._when("expires", get("expires"), naive_tz),
        retries=v._retries(get("retries", 0)),
        timelimit=v._timelimit(get("timelimit")),
        root_id=v._optional_str("root_id", get("root_id")),
        parent_id=v._optional_str("parent_id", get("parent_id")),
        group=v._optional_str("group", get("group")),
        group_index=v._optional_index("group_index", get("group_index")),
        shadow=v._optional_str("shadow", get("shadow")),
        origin=v._optional_str("origin", get("origin")),
        ignore_result=v._optional_bool("ignore_result", get("ignore_result")),
        argsrepr=v._optional_str("argsrepr", get("argsrepr")),
        kwargsrepr=v._optional_str("kwargsrepr", get("kwargsrepr")),
        callbacks=v._optional_signatures("callbacks", embed.get("callbacks")),
        errbacks=v._optional_signatures("errbacks", embed.get("errbacks")),
        chain=v._optional_signatures("chain", embed.get("chain")),
        chord=v._optional_signature("chord", embed.get("chord")),
        reply_to=v._optional_str("reply_to", properties.get("reply_to")) or None,
        correlation_id=v._optional_str("correlation_id", properties.get("correlation_id")),
        priority=v._optional_priority(properties.get("priority")),
        delivery_mode=v._delivery_mode(properties.get("delivery_mode")),
        extra_headers=long_way_extra(headers),
        protocol=protocol,
    )


def long_way_extra(headers: Mapping[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for key, value in headers.items():
        if key in validate.MODEL_HEADERS or key in validate.DROPPED_HEADERS:
            continue
        if not isinstance(key, str):
            raise validate._invalid("headers", "a mapping with string keys", key)
        defaults = validate.DEFAULTED_HEADERS
        if key in defaults and value == defaults[key]:
            continue
        extra[key] = value
    return extra


class Text(str):
    pass


class Items(list[Any]):
    pass


ABSENT = object()
SIGNATURE = {"task": "t", "args": [], "kwargs": {}, "options": {}}
ID = "2d3f4a6e-0d0c-4f2b-9a55-6a1d0c3b7e21"
STRINGS = [None, "x", "", 5, Text("t"), ["x"]]

#: Per header (and argument, embed key and property): the usual value first, then the others.
HEADER_VALUES: dict[str, list[Any]] = {
    "lang": ["py", ABSENT],
    "task": ["tasks.add", ABSENT, "", None, 7, Text("tasks.sub")],
    "id": [ID, ABSENT, "", None, b"id", Text("i")],
    "shadow": STRINGS,
    "eta": [
        None,
        ABSENT,
        "",
        "2026-01-02T03:04:05.123456+00:00",
        "2026-01-02T03:04:05",
        "2026-01-02T03:04:05+02:00",
        "not a date",
        5,
        datetime(2026, 1, 2, tzinfo=timezone(timedelta(hours=-3))),
    ],
    "expires": [None, ABSENT, "2027-01-01T00:00:00Z", "soon", 1.5],
    "group": STRINGS,
    "group_index": [None, ABSENT, 0, 3, -1, True, 1.5, "1"],
    "retries": [0, ABSENT, 4, -1, True, 1.0, None, "1"],
    "timelimit": [
        [None, None],
        ABSENT,
        None,
        (None, None),
        [1, None],
        [None, 2.5],
        [True, None],
        [float("inf"), None],
        [-1, 2],
        [1],
        "1",
    ],
    "root_id": [ID, ABSENT, *STRINGS],
    "parent_id": STRINGS,
    "argsrepr": ["(1, 2)", ABSENT, *STRINGS],
    "kwargsrepr": ["{}", ABSENT, *STRINGS],
    "origin": ["gen1@host", ABSENT, *STRINGS],
    "ignore_result": [False, ABSENT, True, None, 0, "yes"],
    "replaced_task_nesting": [0, ABSENT, 1, False, 0.0, "0"],
    "stamped_headers": [None, ABSENT, ["s"], []],
    "stamps": [{}, ABSENT, {"s": ["v"]}, None, []],
    "x-custom": [ABSENT, 1, None],
    "redelivered": [ABSENT, True],
    "compression": [ABSENT, "application/x-gzip"],
}
ARG_VALUES: list[Any] = [[1, 2], [], (1, 2), Items([3]), "ab", None, {"a": 1}]
KWARG_VALUES: list[Any] = [
    {},
    {"x": 1},
    types.MappingProxyType({"y": 2}),
    {1: 2},
    [],
    None,
    "x",
]
EMBED_VALUES: dict[str, list[Any]] = {
    "callbacks": [None, ABSENT, [SIGNATURE], (SIGNATURE,), "x", [1], [{1: 2}]],
    "errbacks": [None, ABSENT, [SIGNATURE], {}],
    "chain": [None, ABSENT, [SIGNATURE, SIGNATURE], [None]],
    "chord": [None, ABSENT, SIGNATURE, [SIGNATURE], types.MappingProxyType(SIGNATURE)],
    "x-unknown": [ABSENT, 1],
}
PROPERTY_VALUES: dict[str, list[Any]] = {
    "correlation_id": [ID, ABSENT, *STRINGS],
    "reply_to": ["", ABSENT, "queue", None, 5],
    "delivery_mode": [2, ABSENT, 1, None, 3, True, 2.0, "2"],
    "priority": [0, ABSENT, None, 9, 255, 256, -1, True, 1.0],
    "x-other": [ABSENT, "v"],
}


def pick(values: list[Any], rng: random.Random, odd: float) -> Any:
    return values[0] if rng.random() > odd else rng.choice(values[1:])


def pick_all(table: dict[str, list[Any]], rng: random.Random, odd: float) -> dict[str, Any]:
    chosen = {name: pick(values, rng, odd) for name, values in table.items()}
    return {name: value for name, value in chosen.items() if value is not ABSENT}


def outcome(build: Callable[..., TaskMessage], *parts: Any, **options: Any) -> Any:
    try:
        message = build(*parts, **options)
    except InvalidTaskError as exc:
        return ("refused", str(exc))
    return (
        "built",
        [
            (f.name, type(getattr(message, f.name)), getattr(message, f.name))
            for f in dataclasses.fields(message)
        ],
    )


def test_build_message_agrees_with_the_field_validators() -> None:
    rng = random.Random(20261124)
    for case in range(4000):
        # Mostly one or two unusual fields (which one is reported, when several are bad?), and
        # now and then the all-usual message the shortcuts are for.
        odd = 0.0 if case % 10 == 0 else rng.choice((0.05, 0.1, 0.3))
        headers: Any = pick_all(HEADER_VALUES, rng, odd)
        if rng.random() < odd:
            headers[rng.choice((1, None))] = "non-text key"
        if rng.random() < 0.05:
            headers = types.MappingProxyType(headers)
        properties = pick_all(PROPERTY_VALUES, rng, odd)
        embed: Any = pick_all(EMBED_VALUES, rng, odd)
        if rng.random() < odd:
            embed = rng.choice((None, [], "x", types.MappingProxyType(embed)))
        parts = (
            headers,
            properties,
            pick(ARG_VALUES, rng, odd),
            pick(KWARG_VALUES, rng, odd),
            embed,
        )
        for options in ({"protocol": 2}, {"protocol": 1, "naive_tz": timezone(timedelta(hours=2))}):
            expected = outcome(long_way, *parts, **options)
            assert outcome(validate.build_message, *parts, **options) == expected, parts


def test_the_usual_message_takes_no_extra_headers_and_keeps_its_values() -> None:
    envelope = json.loads((GOLDEN / "v2_redis_plain.json").read_text())
    for document in _envelopes(envelope):
        headers, properties = document["headers"], document["properties"]
        body = json.loads(base64.b64decode(document["body"]))
        built = validate.build_message(headers, properties, *body, protocol=2)
        assert built == long_way(headers, properties, *body, protocol=2)
        assert built.extra_headers == {}


def _envelopes(value: Any) -> list[dict[str, Any]]:
    """Every kombu envelope (a dict with headers, properties and a base64 body) in ``value``."""
    found: list[dict[str, Any]] = []
    if isinstance(value, dict):
        if {"headers", "properties", "body"} <= value.keys() and isinstance(value["body"], str):
            found.append(value)
        for item in value.values():
            found += _envelopes(item)
    elif isinstance(value, list):
        for item in value:
            found += _envelopes(item)
    return found


# -- Request.context ---------------------------------------------------------------------------


class _Task:
    def resolved_ignore_result(self) -> bool:
        return True


def test_context_has_each_value_in_its_own_field() -> None:
    message = TaskMessage(
        id="the-id",
        task="the.task",
        args=[1],
        kwargs={"k": 2},
        eta=datetime(2030, 1, 1, tzinfo=UTC),
        expires=datetime(2031, 1, 1, tzinfo=UTC),
        retries=3,
        timelimit=(10.0, 5.0),
        root_id="the-root",
        parent_id="the-parent",
        group="the-group",
        group_index=4,
        shadow="the-shadow",
        origin="the-origin",
        ignore_result=False,
        argsrepr="(1,)",
        kwargsrepr="{'k': 2}",
        callbacks=[{"task": "cb"}],
        errbacks=[{"task": "eb"}],
        chain=[{"task": "next"}],
        chord={"task": "body"},
        reply_to="the-reply-queue",
        correlation_id="the-correlation",
        priority=7,
    )
    headers = {"id": "the-id", "x": 1}
    delivery = Delivery(
        message=TransportMessage(b"", "application/json", "utf-8", headers, {}),
        queue="q",
        delivery_tag="tag",
        exchange="the-exchange",
        routing_key="the-key",
        redelivered=True,
        delivery_count=6,
    )
    request = Request(delivery, message, _Task(), "worker@host")  # type: ignore[arg-type]
    context = request.context()
    assert context == Context(
        id="the-id",
        task="the.task",
        args=[1],
        kwargs={"k": 2},
        retries=3,
        eta=message.eta,
        expires=message.expires,
        root_id="the-root",
        parent_id="the-parent",
        group="the-group",
        group_index=4,
        correlation_id="the-correlation",
        reply_to="the-reply-queue",
        origin="the-origin",
        hostname="worker@host",
        delivery_info={
            "exchange": "the-exchange",
            "routing_key": "the-key",
            "priority": 7,
            "redelivered": True,
        },
        headers=headers,
        callbacks=[{"task": "cb"}],
        errbacks=[{"task": "eb"}],
        chain=[{"task": "next"}],
        chord={"task": "body"},
        timelimit=(10.0, 5.0),
        ignore_result=True,
        is_eager=False,
        delivery_count=6,
    )
    assert context.headers is not headers  # the task may change its copy


# -- JSON ---------------------------------------------------------------------------------------


class Reducer:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __json__(self) -> Any:
        return self.value


ENCODABLE: list[Any] = [
    {"status": "SUCCESS", "result": 3, "traceback": None, "children": [], "task_id": ID},
    [[1, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
    "plain",
    Text("text subclass"),
    'naïve ☃ \ud83d\ude00 \x00 \n "quoted"',
    [1.5, -0.0, 1e300, 5e-324, float("nan"), float("inf"), -float("inf")],
    2**200,
    -(2**70),
    {1: "int key", 2.5: "float key", False: "bool key", None: "null key"},
    (1, (2, 3)),
    [datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), b"bytes", b"\xff\xfe"],
    Reducer({"reduced": [1]}),
    [[[[[[[[[[[]]]]]]]]]]],
    {"shared": (shared := [1]), "again": shared},
]


@pytest.mark.parametrize("value", ENCODABLE, ids=range(len(ENCODABLE)))
def test_json_encoding_is_json_dumps(value: Any) -> None:
    expected = json.dumps(value, default=json_codec._default).encode()
    assert codecs.dumps(value, "json").data == expected
    assert codecs.dumps_data(value, "json") == expected


def _cycle() -> list[Any]:
    value: list[Any] = [1]
    value.append({"again": value})
    return value


def _reduces_to_itself() -> Reducer:
    reducer = Reducer(None)
    reducer.value = [reducer]
    return reducer


@pytest.mark.parametrize("make", [_cycle, _reduces_to_itself])
def test_json_refuses_a_value_that_contains_itself_as_json_dumps_does(
    make: Callable[[], Any],
) -> None:
    with pytest.raises(ValueError, match="Circular reference detected"):
        json.dumps(make(), default=json_codec._default)
    with pytest.raises(EncodeError, match="json cannot encode value: Circular reference detected"):
        codecs.dumps(make(), "json")


def test_json_refuses_nesting_deeper_than_the_stack() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EncodeError, match="recursion"):
        codecs.dumps(deep, "json")


def test_json_encoding_after_a_failure_starts_afresh() -> None:
    shared = [1]
    with pytest.raises(EncodeError, match="cannot encode object of type object"):
        codecs.dumps([shared, [shared, object()]], "json")
    # Nothing of the failed encoding is remembered: the shared list is no cycle.
    assert codecs.dumps([shared, [shared]], "json").data == b"[[1], [[1]]]"


DECODABLE: list[bytes] = [
    b'[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
    b" [1] ",
    b"[1]\n",
    b"\t{}",
    b'"text"',
    b"12",
    b"NaN",
    b"[1e400, -0, 18446744073709551616]",
    b'{"a": "\\ud800"}',
    b'{"a": 1, "a": 2}',
    b'{"__type__": "date", "__value__": "2024-01-02"}',
    b'{"\\u005f_type__": "uuid", "__value__": {"hex": "00000000000000000000000000000001"}}',
    b'{"__type__": "nope", "__value__": 1}',
    b"[1] x",
    b"[1,",
    b"[1, ]",
    b" ",
    b"\xef\xbb\xbf[1]",
    b"\xff",
    b"[" * 100_000,
]


def _long_way_loads(data: bytes) -> Any:
    try:
        return (
            "value",
            json.JSONDecoder(object_hook=json_codec._object_hook).decode(data.decode()),
        )
    except DecodeError as exc:
        return ("error", str(exc))
    except Exception as exc:
        return ("error", f"json payload could not be decoded: {exc}")


def _loads(data: bytes) -> Any:
    try:
        return ("value", codecs.loads(data, "application/json", "utf-8", {"application/json"}))
    except DecodeError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("data", DECODABLE, ids=range(len(DECODABLE)))
def test_json_decoding_is_the_decoders(data: bytes) -> None:
    assert repr(_loads(data)) == repr(_long_way_loads(data))


def _outcome(load: Callable[[Any], Any], text: Any) -> Any:
    try:
        return ("value", repr(load(text)))
    except Exception as exc:
        return ("error", type(exc), str(exc))


@pytest.mark.parametrize("data", DECODABLE, ids=range(len(DECODABLE)))
def test_loads_text_is_json_loads(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    assert _outcome(json_codec.loads_text, text) == _outcome(json.loads, text)
    assert _outcome(json_codec.loads_text, data) == _outcome(json.loads, data)


# -- the Redis envelope -------------------------------------------------------------------------


def _long_way_parse(raw: bytes) -> dict[str, Any]:
    try:
        document = json.JSONDecoder().decode(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEnvelope(f"not a JSON envelope: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedEnvelope(f"not a JSON object but {type(document).__name__}")
    return document


@pytest.mark.parametrize("data", [*DECODABLE, b' {"a": 1}\n'], ids=range(len(DECODABLE) + 1))
def test_parse_envelope_is_the_decoders(data: bytes) -> None:
    assert _outcome(parse_envelope, data) == _outcome(_long_way_parse, data)


def _envelope(**properties: Any) -> dict[str, Any]:
    return {
        "body": base64.b64encode(b"[[], {}, null]").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "t", "id": ID},
        "properties": {"body_encoding": "base64", "priority": 3, **properties},
    }


@pytest.mark.parametrize("header", [ABSENT, True, False, "true"])
@pytest.mark.parametrize("flag", [ABSENT, True, 1])
@pytest.mark.parametrize("counted", [ABSENT, 0, 1, 4, -2, True, 2.0, "3"])
def test_redelivery_and_delivery_count(header: Any, flag: Any, counted: Any) -> None:
    info: dict[str, Any] = {"exchange": "ex", "routing_key": "rk"}
    if flag is not ABSENT:
        info["redelivered"] = flag
    properties: dict[str, Any] = {"delivery_info": info, "delivery_tag": "t", ORDER: "1"}
    if counted is not ABSENT:
        properties[DELIVERY_COUNT] = counted
    document = _envelope(**properties)
    if header is not ABSENT:
        document["headers"]["redelivered"] = header
    decoded = decode_envelope(document, "q")
    # The rules, as written down in the module's documentation.
    number = counted if type(counted) is int and counted >= 0 else 0
    flagged = header is True or flag is True
    assert decoded.redelivered == (flagged or number > 0)
    assert decoded.delivery_count == max(number + 1, 2 if flagged else 1)
    assert ("redelivered" in decoded.message.headers) == (header not in (ABSENT, True))
    assert not set(TRANSPORT_PROPERTIES) & decoded.message.properties.keys()
    assert decoded.message.properties == {"body_encoding": "base64", "priority": 3}
    assert (decoded.exchange, decoded.routing_key) == ("ex", "rk")
    assert decoded.message.body == b"[[], {}, null]"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("é", "body cannot be decoded: string argument should contain only ASCII characters"),
        ("abc", "body cannot be decoded: Incorrect padding"),
        (5, "a base64 body must be a string"),
    ],
)
def test_a_base64_body_that_is_not_base64_is_malformed(body: Any, reason: str) -> None:
    document = _envelope(delivery_tag="t")
    document["body"] = body
    with pytest.raises(MalformedEnvelope) as info:
        decode_envelope(document, "q")
    assert str(info.value) == reason
    assert document["properties"]["delivery_tag"] == "t"  # left untouched


# -- date_done ----------------------------------------------------------------------------------


def test_now_text_is_isoformat_of_that_time() -> None:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    start = time.time_ns() // 1000 * 1000
    rng = random.Random(7)
    moments = [start, start + 999, start - start % 1_000_000_000]  # sub-microsecond, whole second
    moments += [start + rng.randrange(-(10**13), 10**13) for _ in range(2000)]
    moments += [start + step * 250_000_000 for step in range(12)]  # on and across second borders
    for ns in moments:
        expected = (epoch + timedelta(microseconds=ns // 1000)).isoformat()
        assert now_text(ns) == expected, ns


def test_date_done_defaults_to_now() -> None:
    before = datetime.now(UTC)
    done = datetime.fromisoformat(build_meta(ID, "SUCCESS", 1)["date_done"])
    assert before <= done <= datetime.now(UTC)
    assert build_meta(ID, "STARTED")["date_done"] is None
    given = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    assert build_meta(ID, "STARTED", date_done=given)["date_done"] == "2026-01-02T02:04:05+00:00"
