"""celeriac.codecs.xml: round trips of every type, schema checks and safe parsing."""

from __future__ import annotations

import enum
import math
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from celeriac import codecs
from celeriac.codecs.xml import MAX_DEPTH
from celeriac.exceptions import DecodeError, EncodeError

XML = "application/xml"


def dumps(value: Any) -> bytes:
    payload = codecs.dumps(value, "xml")
    assert (payload.content_type, payload.content_encoding) == (XML, "utf-8")
    return payload.data


def loads(data: bytes) -> Any:
    return codecs.loads(data, XML, "utf-8", {XML})


class Color(enum.IntEnum):
    RED = 1


class Name(enum.StrEnum):
    ADA = "ada"


ROUND_TRIPS: list[Any] = [
    None,
    True,
    False,
    0,
    -12,
    2**200,
    1.5,
    -0.0,
    1e-310,
    float("inf"),
    float("-inf"),
    "",
    "plain",
    "  leading and trailing whitespace  ",
    "line\nbreaks\tand tabs",
    "carriage\r\nreturns\r",
    "markup <&> ]]> \"quotes\" 'apostrophes'",
    "control \x00\x01\x1f chars",
    "lone surrogate \ud800",
    "non-characters \ufffe\uffff",
    "h\u00e9llo \u4e16\u754c \U0001f600",
    b"",
    b"\x00\xffbinary",
    [],
    [[], [[]]],
    {},
    {"a": 1, "b": [None, {"c": "d"}]},
    {"": "empty key", "key with\r\x00 odd chars": 1, "tab\tkey": 2, "\U0001f600": 3},
    datetime(2024, 1, 2, 3, 4, 5),
    datetime(2024, 1, 2, 3, 4, 5, 678, tzinfo=UTC),
    datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    date(2024, 2, 29),
    time(3, 4, 5, 6),
    time(23, 59, tzinfo=UTC),
    Decimal("1.5"),
    Decimal("-0"),
    Decimal("1E+30"),
    Decimal("NaN"),
    Decimal("-Infinity"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    [[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
]


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=repr)
def test_round_trip(value: Any) -> None:
    decoded = loads(dumps(value))
    if isinstance(value, Decimal) and value.is_nan():
        assert decoded.is_nan()
        return
    assert decoded == value
    assert type(decoded) is type(value)
    if isinstance(value, float):
        assert math.copysign(1, decoded) == math.copysign(1, value)
    if isinstance(value, datetime | time):
        assert decoded.tzinfo == value.tzinfo


def test_nan_round_trips() -> None:
    assert math.isnan(loads(dumps(float("nan"))))


def test_tuples_and_subclasses_are_written_as_their_base_type() -> None:
    decoded = loads(dumps({"t": (1, (2,)), "e": Color.RED, "s": Name.ADA}))
    assert decoded == {"t": [1, [2]], "e": 1, "s": "ada"}
    assert type(decoded["e"]) is int and type(decoded["s"]) is str


def test_document_shape() -> None:
    data = dumps({"a": [1, "x"], "b": None})
    assert data == (
        b"<?xml version='1.0' encoding='utf-8'?>\n"
        b'<dict><item key="a"><list><int>1</int><str>x</str></list></item>'
        b'<item key="b"><none /></item></dict>'
    )
    # Plain, standard XML: any parser reads it.
    assert ET.fromstring(data).tag == "dict"


def test_unsafe_text_is_base64_flagged() -> None:
    data = dumps({"k\x00": "v\x01"})
    assert b'key-base64="awA="' in data
    assert b'<str encoding="base64">dgE=</str>' in data


def test_pretty_printed_documents_are_read() -> None:
    value = {"a": [1, {"b": " spaced "}], "c": []}
    tree = ET.fromstring(dumps(value))
    ET.indent(tree)
    assert loads(ET.tostring(tree, encoding="utf-8")) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1: "x"}, "xml cannot encode dict key of type int"),
        ({"a": {1, 2}}, "xml cannot encode object of type set"),
        (object(), "xml cannot encode object of type object"),
    ],
)
def test_encode_errors(value: Any, message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        codecs.dumps(value, "xml")


def test_encode_depth_limit_and_cycles() -> None:
    deep: list[Any] = []
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(EncodeError, match="nested more than"):
        codecs.dumps(deep, "xml")
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(EncodeError, match="nested more than"):
        codecs.dumps(cycle, "xml")


def test_deepest_allowed_document_round_trips() -> None:
    value: list[Any] = []
    for _ in range(MAX_DEPTH - 1):
        value = [value]
    assert loads(dumps(value)) == value


def test_decode_depth_limit() -> None:
    depth = MAX_DEPTH + 1
    data = b"<list>" * depth + b"</list>" * depth
    with pytest.raises(DecodeError, match="nested more than"):
        loads(data)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<str>&lol3;</str>"""


def test_doctype_and_entities_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    external = (
        f'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "{secret.as_uri()}">]><str>&x;</str>'
    ).encode()
    for document in (BILLION_LAUGHS, external, b"<!doctype str><str>x</str>"):
        with pytest.raises(DecodeError, match="DOCTYPE and ENTITY declarations are not allowed"):
            loads(document)


def test_undeclared_entity_is_an_error() -> None:
    with pytest.raises(DecodeError):
        loads(b"<str>&nope;</str>")


@pytest.mark.parametrize(
    "document",
    [
        b"<object />",
        b"<list><item key='a'><int>1</int></item></list>",
        b"<dict><int>1</int></dict>",
        b"<dict><item><int>1</int></item></dict>",
        b"<dict><item key='a' key-base64='YQ=='><int>1</int></item></dict>",
        b"<dict><item key='a'><int>1</int><int>2</int></item></dict>",
        b"<dict><item key='a' /></dict>",
        b"<dict><item key='a'><int>1</int></item><item key='a'><int>2</int></item></dict>",
        b"<list>text<int>1</int></list>",
        b"<int><int>1</int></int>",
        b"<int>1_000</int>",
        b"<int> 1</int>",
        b"<int />",
        b"<float>1_0.5</float>",
        b"<float>infinity</float>",
        b"<bool>yes</bool>",
        b"<none>x</none>",
        b"<int kind='x'>1</int>",
        b"<str encoding='rot13'>x</str>",
        b"<str encoding='base64'>not base64!</str>",
        b"<bytes>@@@@</bytes>",
        b"<datetime>yesterday</datetime>",
        b"<decimal>one</decimal>",
        b"<uuid>123</uuid>",
        b"<str xmlns='urn:x'>x</str>",
        b"<list /><list />",
        b"<str>caf\xe9</str>",
        b"",
    ],
)
def test_schema_violations_are_decode_errors(document: bytes) -> None:
    with pytest.raises(DecodeError):
        loads(document)
