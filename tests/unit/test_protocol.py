"""celeriac.protocol: golden Celery captures, to_v2, from_wire_parts, validation, encode/decode."""

from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import zlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from celeriac import codecs
from celeriac.exceptions import ContentDisallowed, DecodeError, InvalidTaskError
from celeriac.protocol import TaskMessage, decode, encode, from_wire_parts, to_v2
from celeriac.protocol import saferepr as saferepr_module
from celeriac.protocol.envelope import TransportMessage
from celeriac.protocol.saferepr import saferepr
from celeriac.protocol.times import as_utc, format_iso8601, milliseconds_until, parse_iso8601

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

#: Envelope/transport keys of a Redis ``properties`` object that are not task properties.
TRANSPORT_PROPERTIES = {"delivery_info", "delivery_tag", "body_encoding"}

JSON_ONLY = frozenset({"application/json"})
NULL_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def golden(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / name).read_text())
    return data


def expected_message(fields: dict[str, Any]) -> TaskMessage:
    """A golden file's ``expected`` object as a TaskMessage (ISO strings → datetimes)."""
    values = dict(fields)
    for key in ("eta", "expires"):
        if values.get(key) is not None:
            values[key] = datetime.fromisoformat(values[key])
    values["timelimit"] = tuple(values.get("timelimit", (None, None)))
    return TaskMessage(**values)


def golden_transport(name: str) -> TransportMessage:
    """What a transport would hand over for a captured message (Redis envelope or AMQP frame)."""
    data = golden(name)
    if data["transport"] == "redis":
        env = data["envelope"]
        props = {k: v for k, v in env["properties"].items() if k not in TRANSPORT_PROPERTIES}
        return TransportMessage(
            body=base64.b64decode(env["body"]),
            content_type=env["content-type"],
            content_encoding=env["content-encoding"],
            headers=env["headers"],
            properties=props,
        )
    if data["transport"] == "amqp":
        props = dict(data["properties"])
        headers = props.pop("headers")
        return TransportMessage(
            body=data["body"].encode(),
            content_type=props.pop("content_type"),
            content_encoding=props.pop("content_encoding"),
            headers=headers,
            properties=props,
        )
    return TransportMessage(
        body=base64.b64decode(data["body_base64"]),
        content_type=data["content_type"],
        content_encoding=data["content_encoding"],
        headers=data["headers"],
        properties=data["properties"],
    )


V2_CAPTURES = [
    "v2_redis_plain.json",
    "v2_redis_options.json",
    "v2_amqp_firehose.json",
    "v2_redis_retry.json",
]


def full_message(**overrides: Any) -> TaskMessage:
    """A message with every field set to something other than its default."""
    values: dict[str, Any] = {
        "id": "0b0e4d38-9c4e-4f0c-8d1e-6a3f5b2c1d00",
        "task": "tasks.full",
        "args": [1, "two", [3]],
        "kwargs": {"x": {"y": None}},
        "eta": datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "expires": datetime(2030, 1, 2, 4, 4, 5, tzinfo=UTC),
        "retries": 3,
        "timelimit": (60, 50.5),
        "root_id": "root-1",
        "parent_id": "parent-1",
        "group": "group-1",
        "group_index": 4,
        "shadow": "shadowed",
        "origin": "gen1@host",
        "ignore_result": True,
        "argsrepr": "(1, 'two', [3])",
        "kwargsrepr": "{'x': {'y': None}}",
        "callbacks": [{"task": "tasks.cb", "args": [], "kwargs": {}, "options": {}}],
        "errbacks": [{"task": "tasks.eb", "args": [], "kwargs": {}, "options": {}}],
        "chain": [{"task": "tasks.last", "args": [], "kwargs": {}, "options": {}}],
        "chord": {"task": "tasks.body", "args": [], "kwargs": {}, "options": {}},
        "reply_to": "reply-queue",
        "correlation_id": "corr-1",
        "priority": 7,
        "delivery_mode": 1,
        "extra_headers": {"x-custom": [1, 2], "stamps": {"s": 1}, "stamped_headers": ["s"]},
    }
    values.update(overrides)
    return TaskMessage(**values)


def v2_parts(**header_overrides: Any) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    headers, properties, body = to_v2(full_message())
    headers.update(header_overrides)
    return headers, properties, body


# -- golden captures: decode ------------------------------------------------------------------


@pytest.mark.parametrize("name", [*V2_CAPTURES, "v1_redis_json.json"])
def test_golden_capture_decodes_to_expected_message(name: str) -> None:
    message = decode(golden_transport(name), JSON_ONLY)
    assert message == expected_message(golden(name)["expected"])


@pytest.mark.parametrize("name", [*V2_CAPTURES, "v1_redis_json.json"])
def test_golden_capture_from_wire_parts_with_stdlib_json(name: str) -> None:
    # The sans-IO entry point, independent of celeriac.codecs.
    transport = golden_transport(name)
    body = json.loads(transport.body)
    message = from_wire_parts(transport.headers, transport.properties, body)
    assert message == expected_message(golden(name)["expected"])


def test_golden_v1_body_matches_captured_base64_prefix() -> None:
    data = golden("v1_redis_json.json")
    assert data["envelope"]["body"].startswith(data["captured_body_prefix"])


def test_golden_timestamps_are_utc_aware() -> None:
    message = decode(golden_transport("v2_redis_options.json"), JSON_ONLY)
    assert message.eta == datetime(2026, 11, 23, 22, 9, 16, 419419, tzinfo=UTC)
    assert message.eta is not None and message.eta.utcoffset() == timedelta(0)
    assert message.expires == datetime(2026, 11, 23, 22, 10, 46, 419419, tzinfo=UTC)


def test_golden_retry_ignores_origin_leaked_into_properties() -> None:
    transport = golden_transport("v2_redis_retry.json")
    assert transport.properties["origin"] == "gen21899@vm"
    message = decode(transport, JSON_ONLY)
    assert message.origin == "gen21899@vm"
    assert message.extra_headers == {}
    assert (message.retries, message.parent_id) == (1, message.id)


def test_golden_chain_is_kept_reversed_as_on_the_wire() -> None:
    data = golden("v2_chain_body.json")
    transport = TransportMessage(
        body=data["body"].encode(),
        content_type=data["content_type"],
        content_encoding=data["content_encoding"],
        headers=data["headers"],
    )
    message = decode(transport, JSON_ONLY)
    assert message.chain == data["expected_chain"]
    assert message.chain is not None and message.chain[-1]["task"] == "tasks.add"  # next step
    assert message.args == [1, 2]


@pytest.mark.parametrize("index", [0, 1])
def test_golden_minimal_message_is_accepted(index: int) -> None:
    data = golden("v2_minimal.json")
    transport = TransportMessage(
        body=data["bodies"][index].encode(),
        content_type=data["content_type"],
        content_encoding=data["content_encoding"],
        headers=data["headers"],
        properties=data["properties"],
    )
    message = decode(transport, JSON_ONLY)
    assert (message.task, message.args, message.kwargs) == ("tasks.add", [1, 2], {})
    assert (message.callbacks, message.errbacks, message.chain, message.chord) == (None,) * 4
    assert message.root_id is None and message.retries == 0 and message.priority is None


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_golden_serializer_bodies_decode(index: int) -> None:
    data = golden("v2_serializers.json")
    entry = data["bodies"][index]
    transport = golden_transport("v2_redis_plain.json")
    transport.body = base64.b64decode(entry["body_base64"])
    transport.content_type = entry["content_type"]
    transport.content_encoding = entry["content_encoding"]
    accept = codecs.resolve_accept(["json", "pickle", "msgpack", "yaml"])
    message = decode(transport, accept)
    assert message.args == data["expected_args"]
    assert message.kwargs == data["expected_kwargs"]
    if entry["content_type"] != "application/json":
        with pytest.raises(ContentDisallowed):
            decode(transport, JSON_ONLY)


# -- golden captures: to_v2 reproduces them -------------------------------------------------------


@pytest.mark.parametrize("name", V2_CAPTURES)
def test_to_v2_reproduces_captured_headers_properties_and_body(name: str) -> None:
    data = golden(name)
    transport = golden_transport(name)
    captured_body = json.loads(transport.body)
    message = expected_message(data["expected"])
    now = datetime.fromisoformat(data["published_at"]) if "published_at" in data else None

    headers, properties, body = to_v2(message, now=now)

    assert headers == transport.headers
    assert list(headers) == list(transport.headers)  # Celery's order, too
    wanted_props = {k: v for k, v in transport.properties.items() if k != "origin"}
    assert properties == wanted_props
    assert body == captured_body
    # Byte for byte what kombu's JSON serializer wrote.
    assert codecs.dumps(body, "json").data == transport.body


@pytest.mark.parametrize("name", V2_CAPTURES)
def test_to_v2_computes_argsrepr_like_celery(name: str) -> None:
    data = golden(name)
    captured = golden_transport(name).headers
    message = expected_message(data["expected"])
    message.argsrepr = message.kwargsrepr = None
    headers, _, _ = to_v2(message)
    assert (headers["argsrepr"], headers["kwargsrepr"]) == (
        captured["argsrepr"],
        captured["kwargsrepr"],
    )


def test_golden_legacy_pickle_message_needs_pickle_in_accept() -> None:
    transport = golden_transport("v1_legacy_pickle.json")
    with pytest.raises(ContentDisallowed):
        decode(transport, codecs.resolve_accept(["json"]))
    message = decode(transport, codecs.resolve_accept(["json", "pickle"]))
    assert message == expected_message(golden("v1_legacy_pickle.json")["expected"])
    assert tuple(message.args) == (9, 42)
    assert message.task == "test_celery.add_together" and message.protocol == 1


def test_golden_legacy_pickle_with_sans_io_entry_point() -> None:
    transport = golden_transport("v1_legacy_pickle.json")
    body = pickle.loads(transport.body)  # trusted fixture
    assert body["args"] == (9, 42)
    message = from_wire_parts({}, {}, body)
    assert message.args == [9, 42] and message.timelimit == (None, None)


# -- to_v2 ----------------------------------------------------------------------------------------


def test_to_v2_headers_are_celerys_full_set_in_order() -> None:
    headers, _, _ = to_v2(TaskMessage(id="i", task="t", origin="o"))
    assert list(headers) == [
        "lang",
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
        "replaced_task_nesting",
        "stamped_headers",
        "stamps",
    ]
    assert headers["lang"] == "py"
    assert headers["root_id"] == "i"
    assert headers["ignore_result"] is False
    assert headers["timelimit"] == [None, None]
    assert (headers["argsrepr"], headers["kwargsrepr"]) == ("()", "{}")


def test_to_v2_extra_headers_are_merged_last_at_top_level() -> None:
    msg = TaskMessage(id="i", task="t", extra_headers={"x-custom": "v", "stamps": {"a": 1}})
    headers, _, _ = to_v2(msg)
    assert list(headers)[-1] == "x-custom"
    assert headers["x-custom"] == "v" and headers["stamps"] == {"a": 1}


def test_to_v2_properties_defaults_and_no_expiration_without_expires() -> None:
    _, properties, _ = to_v2(TaskMessage(id="i", task="t"))
    assert properties == {"correlation_id": "i", "reply_to": "", "delivery_mode": 2, "priority": 0}


def test_to_v2_expiration_is_milliseconds_left_or_zero() -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    msg = TaskMessage(id="i", task="t", expires=expires)
    _, props, _ = to_v2(msg, now=expires - timedelta(seconds=1, microseconds=500_999))
    assert props["expiration"] == "1500"
    _, props, _ = to_v2(msg, now=expires + timedelta(hours=1))
    assert props["expiration"] == "0"
    _, props, _ = to_v2(TaskMessage(id="i", task="t", expires=datetime.now(UTC) + timedelta(1)))
    assert 86_000_000 < int(props["expiration"]) <= 86_400_000


def test_to_v2_datetimes_are_utc_with_explicit_offset() -> None:
    plus_two = timezone(timedelta(hours=2))
    msg = TaskMessage(
        id="i",
        task="t",
        eta=datetime(2030, 1, 1, 12, 0, tzinfo=plus_two),
        expires=datetime(2030, 1, 1, 12, 0),  # naive: taken as UTC
    )
    headers, _, _ = to_v2(msg)
    assert headers["eta"] == "2030-01-01T10:00:00+00:00"
    assert headers["expires"] == "2030-01-01T12:00:00+00:00"


def test_to_v2_default_origin_is_celerys_anon_nodename() -> None:
    headers, _, _ = to_v2(TaskMessage(id="i", task="t"))
    assert headers["origin"] == f"gen{os.getpid()}@{socket.gethostname()}"


def test_to_v2_body_has_three_elements_and_tuple_args_become_a_list() -> None:
    _, _, body = to_v2(TaskMessage(id="i", task="t", args=(1, 2), kwargs={"k": 3}))  # type: ignore[arg-type]
    assert body == [[1, 2], {"k": 3}, NULL_EMBED]
    assert type(body[0]) is list


def test_to_v2_argsrepr_is_truncated_to_1024() -> None:
    headers, _, _ = to_v2(
        TaskMessage(id="i", task="t", args=["x" * 5000], kwargs={"k": "y" * 5000})
    )
    assert 1024 <= len(headers["argsrepr"]) <= 1024 + 10
    assert headers["argsrepr"].startswith("('xxx") and headers["argsrepr"].endswith(",)")
    assert 1024 <= len(headers["kwargsrepr"]) <= 1024 + 10
    assert headers["kwargsrepr"].endswith("}")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"id": ""}, "'id'"),
        ({"task": ""}, "'task'"),
        ({"args": "ab"}, "'args'"),
        ({"kwargs": {1: 2}}, "'kwargs'"),
        ({"retries": -1}, "'retries'"),
        ({"timelimit": (1,)}, "'timelimit'"),
        ({"extra_headers": {"id": "other"}}, "'id'"),
        ({"extra_headers": {"compression": "application/x-gzip"}}, "'compression'"),
    ],
)
def test_to_v2_refuses_messages_a_worker_could_not_read(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidTaskError, match=field):
        to_v2(full_message(**overrides))


def test_round_trip_of_a_full_message_is_exact() -> None:
    msg = full_message()
    headers, properties, body = to_v2(msg)
    # Through JSON, as on the wire.
    assert from_wire_parts(headers, properties, json.loads(json.dumps(body))) == msg


def test_round_trip_through_encode_decode_with_compression() -> None:
    msg = full_message()
    transport = encode(msg, compression="gzip")
    assert transport.headers["compression"] == "application/x-gzip"
    assert transport.body.startswith(b"x\x9c")  # a zlib stream, like kombu's "gzip"
    assert (transport.content_type, transport.content_encoding) == ("application/json", "utf-8")
    assert decode(transport, JSON_ONLY) == msg


def test_encode_json_body_is_what_kombu_writes() -> None:
    transport = encode(TaskMessage(id="i", task="t", args=[2, 3], origin="o"))
    assert transport.body == (
        b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    )
    assert "compression" not in transport.headers


# -- from_wire_parts: detection -------------------------------------------------------------------


def test_task_header_means_v2_even_with_a_v1_looking_body() -> None:
    with pytest.raises(InvalidTaskError, match="3-element array"):
        from_wire_parts({"task": "t", "id": "i"}, {}, {"task": "t", "id": "i", "args": []})


def test_no_task_header_means_v1_and_a_list_body_is_neither() -> None:
    with pytest.raises(InvalidTaskError, match="not a protocol v1 object"):
        from_wire_parts({"id": "i"}, {}, [[1], {}, None])


def test_v1_body_without_task_key_is_refused() -> None:
    with pytest.raises(InvalidTaskError, match="no 'task' key"):
        from_wire_parts({}, {}, {"id": "i", "args": []})


def test_headers_must_be_a_mapping() -> None:
    with pytest.raises(InvalidTaskError, match="headers must be a mapping"):
        from_wire_parts(None, {}, [[], {}, None])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        [[1], {}],  # 2 elements: crashes a Celery 5.7 worker
        [[1], {}, None, None],
        "[[1], {}, null]",
        b"abc",
        None,
        {"args": [1]},
    ],
)
def test_v2_body_must_be_a_three_element_array(body: Any) -> None:
    with pytest.raises(InvalidTaskError, match="3-element array"):
        from_wire_parts({"task": "t", "id": "i"}, {}, body)


def test_v2_body_as_tuple_is_accepted_like_pickle_gives_it() -> None:
    msg = from_wire_parts({"task": "t", "id": "i"}, {}, ((1, 2), {}, None))
    assert msg.args == [1, 2] and msg.callbacks is None


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "field"),
    [
        ("id", None, "'id'"),
        ("id", "", "'id'"),
        ("id", 5, "'id'"),
        ("task", None, "'task'"),
        ("task", ["t"], "'task'"),
        ("retries", -1, "'retries'"),
        ("retries", "1", "'retries'"),
        ("retries", True, "'retries'"),
        ("retries", None, "'retries'"),
        ("retries", 1.0, "'retries'"),
        ("timelimit", [1], "'timelimit'"),
        ("timelimit", [1, 2, 3], "'timelimit'"),
        ("timelimit", "1,2", "'timelimit'"),
        ("timelimit", ["1", None], "'timelimit \\(hard\\)'"),
        ("timelimit", [None, True], "'timelimit \\(soft\\)'"),
        ("timelimit", [None, -5], "'timelimit \\(soft\\)'"),
        ("timelimit", [float("nan"), None], "'timelimit \\(hard\\)'"),
        ("eta", "tomorrow", "'eta'"),
        ("eta", "2026-13-01T00:00:00", "'eta'"),
        ("eta", 1700000000, "'eta'"),
        ("expires", "soon", "'expires'"),
        ("expires", ["2026-01-01"], "'expires'"),
        ("group", 5, "'group'"),
        ("parent_id", 5, "'parent_id'"),
        ("root_id", {}, "'root_id'"),
        ("shadow", 1, "'shadow'"),
        ("origin", 1, "'origin'"),
        ("argsrepr", 1, "'argsrepr'"),
        ("group_index", "1", "'group_index'"),
        ("group_index", -1, "'group_index'"),
        ("group_index", False, "'group_index'"),
        ("ignore_result", "yes", "'ignore_result'"),
        ("ignore_result", 1, "'ignore_result'"),
    ],
)
def test_bad_header_is_refused_naming_the_field(header: str, value: Any, field: str) -> None:
    headers, properties, body = v2_parts(**{header: value})
    with pytest.raises(InvalidTaskError, match=field):
        from_wire_parts(headers, properties, body)


def test_missing_id_is_refused() -> None:
    headers, properties, body = v2_parts()
    del headers["id"]
    with pytest.raises(InvalidTaskError, match="'id' must be a non-empty string"):
        from_wire_parts(headers, properties, body)


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (0, "12", "'args'"),
        (0, {"a": 1}, "'args'"),
        (0, None, "'args'"),
        (1, [], "'kwargs'"),
        (1, {1: "x"}, "'kwargs'"),
        (2, [], "'embed'"),
        (2, "x", "'embed'"),
        (2, {"callbacks": {"task": "x"}}, "'callbacks'"),
        (2, {"callbacks": ["tasks.x"]}, "'callbacks\\[0\\]'"),
        (2, {"errbacks": [{"task": "x"}, 5]}, "'errbacks\\[1\\]'"),
        (2, {"chain": {"task": "x"}}, "'chain'"),
        (2, {"chord": [{"task": "x"}]}, "'chord'"),
        (2, {"chord": {1: "x"}}, "'chord'"),
    ],
)
def test_bad_body_part_is_refused_naming_the_field(index: int, value: Any, field: str) -> None:
    headers, properties, body = v2_parts()
    body[index] = value
    with pytest.raises(InvalidTaskError, match=field):
        from_wire_parts(headers, properties, body)


@pytest.mark.parametrize(
    ("prop", "value", "field"),
    [
        ("priority", "5", "'priority'"),
        ("priority", 300, "'priority'"),
        ("delivery_mode", 3, "'delivery_mode'"),
        ("reply_to", 5, "'reply_to'"),
        ("correlation_id", 5, "'correlation_id'"),
    ],
)
def test_bad_property_is_refused_naming_it(prop: str, value: Any, field: str) -> None:
    headers, properties, body = v2_parts()
    properties[prop] = value
    with pytest.raises(InvalidTaskError, match=field):
        from_wire_parts(headers, properties, body)


def test_error_message_shows_a_bounded_repr_of_the_value() -> None:
    headers, properties, body = v2_parts(eta="x" * 10_000)
    with pytest.raises(InvalidTaskError) as info:
        from_wire_parts(headers, properties, body)
    assert len(str(info.value)) < 300


def test_timestamps_in_other_iso_forms() -> None:
    cases = {
        "2026-11-23T22:09:16Z": datetime(2026, 11, 23, 22, 9, 16, tzinfo=UTC),
        "2026-11-23T23:09:16.5+01:00": datetime(2026, 11, 23, 22, 9, 16, 500000, tzinfo=UTC),
        "2026-11-23T22:09:16": datetime(2026, 11, 23, 22, 9, 16, tzinfo=UTC),  # naive = UTC (v2)
        "20261123T220916": datetime(2026, 11, 23, 22, 9, 16, tzinfo=UTC),
    }
    for text, wanted in cases.items():
        headers, properties, body = v2_parts(eta=text)
        msg = from_wire_parts(headers, properties, body)
        assert msg.eta == wanted, text
        assert msg.eta is not None and msg.eta.tzinfo is UTC


def test_empty_eta_means_none_as_in_celery() -> None:
    headers, properties, body = v2_parts(eta="", expires=None)
    msg = from_wire_parts(headers, properties, body)
    assert msg.eta is None and msg.expires is None


def test_defaults_for_absent_optional_headers() -> None:
    msg = from_wire_parts({"task": "t", "id": "i"}, {}, [[], {}, None])
    assert msg == TaskMessage(id="i", task="t")


def test_extra_headers_keep_unknown_and_non_default_stamping_headers() -> None:
    headers, properties, body = v2_parts()
    headers.update(
        {
            "x-trace": "abc",
            "meth": "x",
            "redelivered": True,
            "compression": "application/x-gzip",
            "lang": "go",
            "replaced_task_nesting": 2,
        }
    )
    msg = from_wire_parts(headers, properties, body)
    assert msg.extra_headers == {
        "x-custom": [1, 2],
        "stamps": {"s": 1},
        "stamped_headers": ["s"],
        "x-trace": "abc",
        "meth": "x",
        "replaced_task_nesting": 2,
    }


def test_default_valued_stamping_headers_do_not_clutter_extra_headers() -> None:
    headers, properties, body = to_v2(TaskMessage(id="i", task="t"))
    assert from_wire_parts(headers, properties, body).extra_headers == {}


def test_signature_subclasses_become_plain_dicts_and_unknown_embed_keys_are_tolerated() -> None:
    class Sig(dict[str, Any]):
        pass

    embed = {"callbacks": (Sig(task="a"),), "chord": Sig(task="b"), "future_key": 1}
    msg = from_wire_parts({"task": "t", "id": "i"}, {}, [[], {}, embed])
    assert msg.callbacks == [{"task": "a"}]
    assert msg.callbacks is not None and type(msg.callbacks[0]) is dict
    assert type(msg.chord) is dict


def test_reply_to_empty_string_means_none() -> None:
    msg = from_wire_parts({"task": "t", "id": "i"}, {"reply_to": ""}, [[], {}, None])
    assert msg.reply_to is None


# -- protocol v1 ----------------------------------------------------------------------------------


def v1_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "tasks.add",
        "id": "v1-id",
        "args": [2, 3],
        "kwargs": {},
        "retries": 0,
        "eta": None,
        "expires": None,
        "utc": True,
        "callbacks": None,
        "errbacks": None,
        "timelimit": [None, None],
        "taskset": None,
        "chord": None,
    }
    body.update(overrides)
    return body


def test_v1_full_body_is_converted() -> None:
    body = v1_body(
        args=(1,),
        kwargs={"k": 1},
        retries=2,
        eta="2026-01-01T00:00:00+00:00",
        expires="2026-01-02T00:00:00+00:00",
        callbacks=[{"task": "cb"}],
        errbacks=[{"task": "eb"}],
        chord={"task": "body"},
        timelimit=(10, 5),
        root_id="r",
        parent_id="p",
        shadow="s",
        group="g",
        group_index=1,
        origin="o",
    )
    msg = from_wire_parts({}, {"correlation_id": "v1-id"}, body)
    assert msg == TaskMessage(
        id="v1-id",
        task="tasks.add",
        args=[1],
        kwargs={"k": 1},
        retries=2,
        eta=datetime(2026, 1, 1, tzinfo=UTC),
        expires=datetime(2026, 1, 2, tzinfo=UTC),
        callbacks=[{"task": "cb"}],
        errbacks=[{"task": "eb"}],
        chord={"task": "body"},
        timelimit=(10, 5),
        root_id="r",
        parent_id="p",
        shadow="s",
        group="g",
        group_index=1,
        origin="o",
        correlation_id="v1-id",
        protocol=1,
    )
    assert msg.chain is None  # v1 cannot carry a chain


def test_v1_taskset_stands_in_for_group() -> None:
    assert from_wire_parts({}, {}, v1_body(taskset="ts")).group == "ts"
    assert from_wire_parts({}, {}, v1_body(taskset="ts", group="g")).group == "g"


def test_v1_real_headers_overlay_body_keys() -> None:
    msg = from_wire_parts({"retries": 4, "x-extra": 1}, {}, v1_body(retries=1))
    assert msg.retries == 4 and msg.extra_headers == {"x-extra": 1}


def test_v1_without_args_or_kwargs_gets_empty_ones() -> None:
    msg = from_wire_parts({}, {}, {"task": "t", "id": "i"})
    assert (msg.args, msg.kwargs, msg.protocol) == ([], {}, 1)


def test_v1_utc_false_means_naive_times_are_local() -> None:
    zone = ZoneInfo("America/New_York")
    body = v1_body(utc=False, eta="2026-07-01T12:00:00", expires="2026-07-01T12:00:00+00:00")
    msg = from_wire_parts({}, {}, body, local_tz=zone)
    assert msg.eta == datetime(2026, 7, 1, 16, 0, tzinfo=UTC)  # EDT is UTC-4
    assert msg.expires == datetime(2026, 7, 1, 12, 0, tzinfo=UTC)  # explicit offset wins
    # Without local_tz: this system's zone, as astimezone() understands it.
    local = from_wire_parts({}, {}, body).eta
    assert local == datetime(2026, 7, 1, 12, 0).astimezone(UTC)


def test_v1_utc_true_means_naive_times_are_utc() -> None:
    msg = from_wire_parts(
        {}, {}, v1_body(eta="2026-07-01T12:00:00"), local_tz=ZoneInfo("Asia/Tokyo")
    )
    assert msg.eta == datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"utc": "yes"}, "'utc'"),
        ({"args": "12"}, "'args'"),
        ({"kwargs": [1]}, "'kwargs'"),
        ({"id": None}, "'id'"),
        ({"task": ""}, "'task'"),
        ({"eta": "not a date"}, "'eta'"),
        ({"timelimit": 5}, "'timelimit'"),
        ({"callbacks": "x"}, "'callbacks'"),
    ],
)
def test_v1_bad_fields_are_refused(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidTaskError, match=field):
        from_wire_parts({}, {}, v1_body(**overrides))


def test_v1_eta_datetime_objects_from_pickle_bodies() -> None:
    when = datetime(2026, 1, 1, 12, 0)
    msg = from_wire_parts({}, {}, v1_body(eta=when))
    assert msg.eta == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


# -- decode: bytes-level failures -----------------------------------------------------------------


def plain_transport(**changes: Any) -> TransportMessage:
    transport = encode(TaskMessage(id="i", task="t", args=[1]))
    for key, value in changes.items():
        setattr(transport, key, value)
    return transport


def test_decode_refuses_disallowed_content_type_before_decoding() -> None:
    transport = plain_transport(
        body=b"\x80\x04not really pickle", content_type="application/x-python-serialize"
    )
    with pytest.raises(ContentDisallowed):
        decode(transport, JSON_ONLY)


def test_decode_refuses_disallowed_content_before_decompressing() -> None:
    transport = plain_transport(
        body=b"garbage that is not zlib",
        content_type="application/x-python-serialize",
        headers={"task": "t", "id": "i", "compression": "application/x-gzip"},
    )
    with pytest.raises(ContentDisallowed):
        decode(transport, JSON_ONLY)


def test_decode_garbled_json_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode(plain_transport(body=b"[[1], {}, {"), JSON_ONLY)


def test_decode_body_over_the_limit() -> None:
    transport = plain_transport()
    with pytest.raises(DecodeError, match="over the limit"):
        decode(transport, JSON_ONLY, max_body_size=len(transport.body) - 1)
    assert decode(transport, JSON_ONLY, max_body_size=len(transport.body)).args == [1]


def test_decode_compressed_bomb_is_stopped() -> None:
    # 50 MB of zeros compress to ~50 kB: far under the limit, until decompressed.
    bomb = zlib.compress(b"[" + b" " * 50_000_000 + b"]")
    assert len(bomb) < 100_000
    transport = plain_transport(
        body=bomb, headers={"task": "t", "id": "i", "compression": "application/x-gzip"}
    )
    with pytest.raises(DecodeError, match="more than"):
        decode(transport, JSON_ONLY, max_body_size=1_000_000)


def test_decode_unknown_compression() -> None:
    transport = plain_transport(
        headers={"task": "t", "id": "i", "compression": "application/x-rar"}
    )
    with pytest.raises(DecodeError, match="compression"):
        decode(transport, JSON_ONLY)


def test_decode_compression_header_must_be_a_string() -> None:
    transport = plain_transport(headers={"task": "t", "id": "i", "compression": 1})
    with pytest.raises(DecodeError, match="'compression' header"):
        decode(transport, JSON_ONLY)


def test_decode_corrupt_compressed_body() -> None:
    transport = encode(TaskMessage(id="i", task="t"), compression="gzip")
    transport.body = transport.body[:-5]
    with pytest.raises(DecodeError):
        decode(transport, JSON_ONLY)


def test_decode_v2_two_element_body_is_invalid_task() -> None:
    with pytest.raises(InvalidTaskError, match="2-element list"):
        decode(plain_transport(body=b"[[1], {}]"), JSON_ONLY)


@pytest.mark.parametrize("serializer", ["json", "pickle", "msgpack", "yaml"])
def test_encode_decode_each_serializer(serializer: str) -> None:
    msg = full_message()
    transport = encode(msg, serializer=serializer)
    accept = codecs.resolve_accept([serializer])
    assert decode(transport, accept) == msg


@pytest.mark.parametrize("method", ["gzip", "bzip2", "lzma"])
def test_encode_decode_each_compression(method: str) -> None:
    msg = full_message()
    assert decode(encode(msg, compression=method), JSON_ONLY) == msg


# -- times and saferepr ---------------------------------------------------------------------------


def test_times_helpers() -> None:
    assert parse_iso8601("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="not an ISO-8601"):
        parse_iso8601("yesterday")
    naive = datetime(2026, 1, 1, 12)
    assert as_utc(naive) == datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert as_utc(naive, ZoneInfo("Europe/Paris")) == datetime(2026, 1, 1, 11, tzinfo=UTC)
    assert format_iso8601(datetime(2026, 1, 1, tzinfo=ZoneInfo("Asia/Tokyo"))) == (
        "2025-12-31T15:00:00+00:00"
    )
    assert milliseconds_until(naive, naive - timedelta(seconds=2)) == 2000
    assert milliseconds_until(naive, naive + timedelta(seconds=2)) == 0


def test_saferepr_matches_repr_for_ordinary_arguments() -> None:
    for value in [(2, 3), (1,), (), {}, {"a": [1, {"b": None}]}, ("s", b"b", 1.5, True, None)]:
        assert saferepr(value) == repr(value)
    assert saferepr({1, 2}) == "{1, 2}" and saferepr(set()) == "set()"


def test_saferepr_of_flat_arguments_is_what_the_general_walk_writes() -> None:
    """Flat tuples, lists and dicts of plain values take a shortcut; it must not show."""

    class Loud(str):
        def __repr__(self) -> str:
            return "LOUD"

    def walked(value: Any, maxlen: int) -> str:
        out = saferepr_module._Writer(maxlen)
        saferepr_module._write(out, value, 0, 3, set())
        return "".join(out.parts)

    values: list[Any] = [
        (2, 3),
        (Loud("x"),),
        {"k": "quote ' and \" and \n", "n": float("nan")},
        ("x" * 1019,),
        ("x" * 1030,),
        tuple(range(64)),
        tuple(range(65)),
        [10**5000],
    ]
    for value in values:
        for maxlen in (1024, 12, 3):
            assert saferepr(value, maxlen=maxlen) == walked(value, maxlen)


def test_saferepr_limits_depth_length_and_survives_bad_objects() -> None:
    assert saferepr(([[[1]]],)) == "([[[...]]],)"
    long = saferepr(list(range(10_000)), maxlen=50)
    assert len(long) <= 60 and long.endswith("...]")
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert "Recursion" in saferepr(cyclic)

    class Bad:
        def __repr__(self) -> str:
            raise RuntimeError("boom")

    assert "unrepresentable Bad" in saferepr([Bad()])
    assert "unrepresentable int" in saferepr([10**5000])  # int repr limit, not a crash
