"""celeriac.codecs: serializer registry, accept lists, kombu compatibility, golden bodies."""

from __future__ import annotations

import math
import os
import pickle
import sys
import types
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import kombu.serialization
import pytest

from celeriac import codecs
from celeriac.exceptions import ContentDisallowed, DecodeError, EncodeError, ImproperlyConfigured

JSON = "application/json"
PICKLE = "application/x-python-serialize"
MSGPACK = "application/x-msgpack"
YAML = "application/x-yaml"
XML = "application/xml"
ALL_TYPES = frozenset({JSON, PICKLE, MSGPACK, YAML, XML})

# -- golden bodies of add(2, 3), captured from Celery 5.7 (celery-wire.md §2.4) --------------------

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
ADD_BODY = [[2, 3], {}, EMBED]
GOLDEN_JSON = b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
GOLDEN_PICKLE = (
    b"\x80\x04\x95:\x00\x00\x00\x00\x00\x00\x00K\x02K\x03\x86\x94}\x94}\x94(\x8c\tcallbacks\x94N"
    b"\x8c\x08errbacks\x94N\x8c\x05chain\x94N\x8c\x05chord\x94Nu\x87\x94."
)
GOLDEN_MSGPACK = (
    b"\x93\x92\x02\x03\x80\x84\xa9callbacks\xc0\xa8errbacks\xc0\xa5chain\xc0\xa5chord\xc0"
)
GOLDEN_YAML = (
    b"- - 2\n  - 3\n- {}\n- callbacks: null\n  chain: null\n  chord: null\n  errbacks: null\n"
)


@pytest.mark.parametrize(
    ("data", "content_type", "content_encoding"),
    [
        (GOLDEN_JSON, JSON, "utf-8"),
        (GOLDEN_MSGPACK, MSGPACK, "binary"),
        (GOLDEN_YAML, YAML, "utf-8"),
    ],
)
def test_golden_bodies_decode(data: bytes, content_type: str, content_encoding: str) -> None:
    assert codecs.loads(data, content_type, content_encoding, ALL_TYPES) == ADD_BODY


def test_golden_pickle_body_decodes_to_tuples() -> None:
    assert codecs.loads(GOLDEN_PICKLE, PICKLE, "binary", {PICKLE}) == ((2, 3), {}, EMBED)


@pytest.mark.parametrize(
    ("serializer", "golden", "content_type", "content_encoding"),
    [
        ("json", GOLDEN_JSON, JSON, "utf-8"),
        ("msgpack", GOLDEN_MSGPACK, MSGPACK, "binary"),
        ("yaml", GOLDEN_YAML, YAML, "utf-8"),
    ],
)
def test_encoders_reproduce_captured_bytes(
    serializer: str, golden: bytes, content_type: str, content_encoding: str
) -> None:
    payload = codecs.dumps(ADD_BODY, serializer)
    assert payload == codecs.EncodedPayload(golden, content_type, content_encoding)
    # Tuples are written as arrays, as Celery's own (tuple) body would be.
    assert codecs.dumps(((2, 3), {}, EMBED), serializer).data == golden


def test_pickle_uses_protocol_4_like_kombu() -> None:
    payload = codecs.dumps(((2, 3), {}, EMBED), "pickle")
    assert payload == codecs.EncodedPayload(GOLDEN_PICKLE, PICKLE, "binary")


# -- names, content types, accept lists ------------------------------------------------------------


def test_serializer_names_and_content_types() -> None:
    assert codecs.serializer_names() == ["json", "msgpack", "pickle", "xml", "yaml"]
    assert [codecs.content_type_of(n) for n in ("json", "pickle", "msgpack", "yaml", "xml")] == [
        JSON,
        PICKLE,
        MSGPACK,
        YAML,
        XML,
    ]
    assert codecs.content_type_of(PICKLE) == PICKLE
    with pytest.raises(ImproperlyConfigured, match="known serializers: json, msgpack, pickle"):
        codecs.content_type_of("bson")


def test_dumps_accepts_a_content_type() -> None:
    assert codecs.dumps({"a": 1}, JSON) == codecs.dumps({"a": 1}, "json")


def test_dumps_unknown_serializer_names_the_known_ones() -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        codecs.dumps(1, "jsno")
    message = str(info.value)
    assert "'jsno'" in message
    assert "did you mean 'json'" in message
    assert "json, msgpack, pickle, xml, yaml" in message


def test_resolve_accept_names_and_content_types() -> None:
    assert codecs.resolve_accept(["json", PICKLE, "msgpack"]) == {JSON, PICKLE, MSGPACK}
    assert codecs.resolve_accept([]) == frozenset()
    assert codecs.resolve_accept(["application/data"]) == {"application/data"}


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("jason", "'json'"), ("pickel", "'pickle'"), ("application/jsn", "'application/json'")],
)
def test_resolve_accept_unknown_name_suggests_closest(name: str, suggestion: str) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        codecs.resolve_accept(["json", name])
    assert f"did you mean {suggestion}" in str(info.value)
    assert repr(name) in str(info.value)


def test_resolve_accept_refuses_a_bare_string_and_non_strings() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"use \['json'\]"):
        codecs.resolve_accept("json")
    with pytest.raises(ImproperlyConfigured, match="must be strings"):
        codecs.resolve_accept(["json", 3])  # type: ignore[list-item]


def test_content_not_accepted_is_refused() -> None:
    payload = codecs.dumps([1], "msgpack")
    with pytest.raises(ContentDisallowed, match=r"msgpack \(application/x-msgpack\)"):
        codecs.loads(payload.data, payload.content_type, payload.content_encoding, {JSON})


def test_refusal_hints_at_unresolved_accept_lists() -> None:
    with pytest.raises(ContentDisallowed, match="resolve_accept"):
        codecs.loads(GOLDEN_JSON, JSON, "utf-8", ["json"])


class _MakeDirectory:
    """Unpickling this calls os.mkdir(path): a visible side effect of deserializing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.path),))


def test_accept_is_checked_before_anything_is_decoded(tmp_path: Path) -> None:
    # Control: the payload really has a side effect when pickle is accepted.
    accepted = tmp_path / "accepted"
    codecs.loads(pickle.dumps(_MakeDirectory(accepted)), PICKLE, "binary", {PICKLE})
    assert accepted.is_dir()

    refused = tmp_path / "refused"
    evil = pickle.dumps(_MakeDirectory(refused))
    with pytest.raises(ContentDisallowed):
        codecs.loads(evil, PICKLE, "binary", codecs.resolve_accept(["json"]))
    assert not refused.exists()


def test_unknown_content_type() -> None:
    with pytest.raises(ContentDisallowed):
        codecs.loads(b"x", "application/bson", "binary", {JSON})
    with pytest.raises(DecodeError, match="no serializer is registered"):
        codecs.loads(b"x", "application/bson", "binary", {JSON, "application/bson"})


@pytest.mark.parametrize(
    ("data", "content_type", "content_encoding"),
    [
        (b"\x00\xffraw", "application/data", "binary"),
        ("h\u00e9llo".encode(), "application/text", "utf-8"),
        ("h\u00e9llo".encode(), "application/data", "utf-8"),
        (b"abc", "application/text", "binary"),
        (b"latin \xe9", "application/text", "latin-1"),
        (b"", "application/data", "binary"),
        (b"no type", "", "binary"),
    ],
)
def test_trusted_raw_content_ignores_accept_like_kombu(
    data: bytes, content_type: str, content_encoding: str
) -> None:
    ours = codecs.loads(data, content_type, content_encoding, frozenset())
    theirs = kombu.serialization.loads(data, content_type, content_encoding, accept=[])
    assert ours == theirs
    assert type(ours) is type(theirs)


def test_trusted_raw_content_with_bad_text_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        codecs.loads(b"\xff", "application/text", "utf-8", frozenset())
    with pytest.raises(DecodeError, match="zlib_codec"):
        # A bytes-to-bytes codec is not a text encoding and must not run.
        codecs.loads(b"x", "application/text", "zlib_codec", frozenset())


# -- errors ----------------------------------------------------------------------------------------


class Foo:
    pass


@pytest.mark.parametrize("serializer", ["json", "msgpack", "yaml", "xml"])
def test_encode_error_names_serializer_and_type(serializer: str) -> None:
    with pytest.raises(EncodeError, match=f"^{serializer} cannot encode object of type Foo$"):
        codecs.dumps({"args": [1, Foo()]}, serializer)


def test_encode_error_for_other_failures_is_wrapped() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EncodeError, match="json cannot encode value: Circular reference") as info:
        codecs.dumps(loop, "json")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(EncodeError, match="pickle cannot encode value") as info:
        codecs.dumps(lambda: None, "pickle")
    assert info.value.__cause__ is not None
    with pytest.raises(EncodeError, match="json cannot encode value: keys must be"):
        codecs.dumps({(1, 2): 3}, "json")


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"[1, 2", JSON),
        (b"\xff\xfe[]", JSON),
        (b"[1] [2]", JSON),
        (b"\x80\x04garbage", PICKLE),
        (b"\xc1", MSGPACK),
        (b"\x93\x01", MSGPACK),
        (b"a: [1, 2", YAML),
        (b"<list><int>1</int>", XML),
        (b"", JSON),
        (b"", YAML),
    ],
)
def test_garbage_is_a_decode_error(data: bytes, content_type: str) -> None:
    with pytest.raises(DecodeError) as info:
        codecs.loads(data, content_type, "utf-8", ALL_TYPES)
    assert data == b"" or info.value.__cause__ is not None


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(b"[" * 100_000, JSON), (b"[" * 100_000, YAML), (b"\x91" * 100_000, MSGPACK)],
)
def test_hostile_nesting_is_a_decode_error(data: bytes, content_type: str) -> None:
    with pytest.raises(DecodeError, match=r"could not be decoded: \w"):
        codecs.loads(data, content_type, "utf-8", ALL_TYPES)


def test_yaml_refuses_python_tags(tmp_path: Path) -> None:
    target = tmp_path / "made-by-yaml"
    attacks = [
        f"!!python/object/apply:os.mkdir [{str(target)!r}]".encode(),
        b"!!python/object:collections.OrderedDict {}",
        b"!!python/name:os.system ''",
    ]
    for attack in attacks:
        with pytest.raises(DecodeError, match="could not determine a constructor"):
            codecs.loads(attack, YAML, "utf-8", {YAML})
    assert not target.exists()


def test_yaml_safe_types_round_trip() -> None:
    value = {"when": datetime(2024, 1, 2, 3, 4, 5), "day": date(2024, 1, 2), "raw": b"\x00\xff"}
    payload = codecs.dumps(value, "yaml")
    assert codecs.loads(payload.data, YAML, "utf-8", {YAML}) == value


def test_msgpack_round_trip() -> None:
    value = {"s": "h\u00e9", "b": b"\x00\xff", "n": [1, -2, 2**63, 1.5, None, True], "t": (1, 2)}
    payload = codecs.dumps(value, "msgpack")
    assert payload.content_type == MSGPACK and payload.content_encoding == "binary"
    decoded = codecs.loads(payload.data, MSGPACK, "binary", {MSGPACK})
    assert decoded == {**value, "t": [1, 2]}
    assert isinstance(decoded["b"], bytes) and isinstance(decoded["s"], str)
    theirs = kombu.serialization.loads(payload.data, MSGPACK, "binary", accept=[MSGPACK])
    assert theirs == decoded
    assert kombu.serialization.dumps(value, "msgpack")[2] == payload.data


def test_msgpack_has_no_datetime_extension_like_kombu() -> None:
    with pytest.raises(EncodeError, match="msgpack cannot encode object of type datetime"):
        codecs.dumps([datetime.now(UTC)], "msgpack")


@pytest.mark.parametrize(
    ("module", "serializer", "content_type", "extra"),
    [("msgpack", "msgpack", MSGPACK, "msgpack"), ("yaml", "yaml", YAML, "yaml")],
)
def test_missing_optional_dependency(
    monkeypatch: pytest.MonkeyPatch, module: str, serializer: str, content_type: str, extra: str
) -> None:
    data = codecs.dumps([1], serializer).data
    monkeypatch.setitem(sys.modules, module, None)  # makes "import <module>" fail
    hint = f"pip install 'celeriac\\[{extra}\\]'"
    with pytest.raises(ImproperlyConfigured, match=hint):
        codecs.dumps([1], serializer)
    with pytest.raises(ImproperlyConfigured, match=hint):
        codecs.loads(data, content_type, "binary", {content_type})


# -- custom serializers ----------------------------------------------------------------------------


def test_register_custom_serializer() -> None:
    def encode(value: Any) -> bytes:
        if not isinstance(value, str):
            raise TypeError("only text")
        return value[::-1].encode()

    def decode(data: bytes) -> Any:
        return data.decode()[::-1]

    codecs.register("reverse", "application/x-reverse", "utf-8", encode, decode)
    try:
        payload = codecs.dumps("abc", "reverse")
        assert payload == codecs.EncodedPayload(b"cba", "application/x-reverse", "utf-8")
        accept = codecs.resolve_accept(["reverse"])
        assert codecs.loads(payload.data, payload.content_type, "utf-8", accept) == "abc"
        assert "reverse" in codecs.serializer_names()
        with pytest.raises(EncodeError, match="reverse cannot encode value: only text"):
            codecs.dumps(1, "reverse")
    finally:
        codecs.unregister("reverse")
    assert "reverse" not in codecs.serializer_names()
    with pytest.raises(ImproperlyConfigured):
        codecs.dumps("abc", "application/x-reverse")


@pytest.mark.parametrize(
    ("name", "content_type", "encoding"),
    [("", "a/b", "utf-8"), ("a/b", "a/b", "utf-8"), ("x", "nope", "utf-8"), ("x", "a/b", "")],
)
def test_register_validates(name: str, content_type: str, encoding: str) -> None:
    with pytest.raises(ImproperlyConfigured):
        codecs.register(name, content_type, encoding, bytes, bytes)
    with pytest.raises(ImproperlyConfigured, match="reserved"):
        codecs.register("raw", "application/data", "binary", bytes, bytes)


# -- JSON, byte-compatible with kombu --------------------------------------------------------------


class Reducible:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __json__(self) -> Any:
        return {"reduced": self.value}


UTC_PLUS_2 = timezone(timedelta(hours=2))

#: (value, what it reads back as). Both implementations must agree on bytes and on values.
JSON_CASES: list[tuple[Any, Any]] = [
    (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), None),
    (datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC_PLUS_2), None),
    (datetime(2024, 1, 2, 3, 4, 5), None),
    (date(2024, 1, 2), None),
    (time(3, 4, 5, 6), None),
    (time(3, 4, tzinfo=UTC), None),
    (Decimal("1.5"), None),
    (Decimal("-1E+30"), None),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), None),
    (b"hi", None),
    (b"\x00\xff\xfe", None),
    (b"", None),
    ("h\u00e9llo \U0001f600", None),
    ((1, (2, 3)), [1, [2, 3]]),
    ({"nested": [{"when": date(2020, 2, 29)}, {"raw": b"\x80"}]}, None),
    ({"__type__": "x", "__value__": 1, "extra": True}, None),
    ({"__type__": "datetime"}, None),
    ([2**70, -(2**70), 1.5, 1e300, float("inf"), True, None], None),
    ({"__type__": "bytes", "__value__": "looks like a marker"}, b"looks like a marker"),
    (Reducible(date(2021, 1, 1)), {"reduced": date(2021, 1, 1)}),
    (
        {
            "when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            "u": uuid.UUID(int=1),
            "b": b"hi",
            "d": Decimal("1.5"),
        },
        None,
    ),
]


@pytest.mark.parametrize(("value", "expected"), JSON_CASES)
def test_json_matches_kombu_both_ways(value: Any, expected: Any) -> None:
    expected = value if expected is None else expected
    ours = codecs.dumps(value, "json")
    content_type, content_encoding, theirs = kombu.serialization.dumps(value, "json")
    theirs = theirs.encode() if isinstance(theirs, str) else theirs
    assert ours == codecs.EncodedPayload(theirs, content_type, content_encoding)
    read_by_kombu = kombu.serialization.loads(ours.data, JSON, "utf-8", accept=[JSON])
    read_by_us = codecs.loads(theirs, JSON, "utf-8", {JSON})
    assert read_by_kombu == expected
    assert read_by_us == expected
    assert type(read_by_us) is type(read_by_kombu)
    if isinstance(expected, datetime | time):
        assert read_by_us.tzinfo == expected.tzinfo


def test_json_datetime_marker_text() -> None:
    value = {"when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)}
    assert codecs.dumps(value, "json").data == (
        b'{"when": {"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}}'
    )


def test_json_nan_like_kombu() -> None:
    data = codecs.dumps([float("nan")], "json").data
    assert data == b"[NaN]"
    assert math.isnan(codecs.loads(data, JSON, "utf-8", {JSON})[0])


@pytest.mark.parametrize(
    "data",
    [
        b'{"__type__": "pickle", "__value__": "x"}',
        b'[{"__type__": ["datetime"], "__value__": "2024-01-01"}]',
        b'{"__type__": "datetime", "__value__": "not a date"}',
        b'{"__type__": "uuid", "__value__": "not a dict"}',
        b'{"__type__": "decimal", "__value__": "one"}',
    ],
)
def test_json_bad_markers_are_decode_errors(data: bytes) -> None:
    with pytest.raises(DecodeError):
        codecs.loads(data, JSON, "utf-8", {JSON})


def test_json_unknown_marker_message() -> None:
    with pytest.raises(DecodeError, match="unknown JSON type marker 'pickle'"):
        codecs.loads(b'{"__type__": "pickle", "__value__": "x"}', JSON, "utf-8", {JSON})


def test_json_writes_django_lazy_text_when_django_is_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    functional = types.ModuleType("django.utils.functional")

    class Promise:
        def __str__(self) -> str:
            return "translated"

    functional.Promise = Promise  # type: ignore[attr-defined]
    with pytest.raises(EncodeError):
        codecs.dumps([Promise()], "json")
    monkeypatch.setitem(sys.modules, "django.utils.functional", functional)
    assert codecs.dumps([Promise()], "json").data == b'["translated"]'


def test_json_is_strict_utf8_like_kombu() -> None:
    utf16 = '["x"]'.encode("utf-16")
    with pytest.raises(DecodeError):
        codecs.loads(utf16, JSON, "utf-8", {JSON})
    with pytest.raises(kombu.exceptions.DecodeError):
        kombu.serialization.loads(utf16, JSON, "utf-8", accept=[JSON])
