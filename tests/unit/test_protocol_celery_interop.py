"""celeriac.protocol against the real Celery 5.7 / kombu packages, in both directions.

* Celery → celeriac: messages built by ``app.amqp.as_task_v2`` / ``as_task_v1`` and by the public
  calling API (``apply_async``, ``chain``, ``group``, ``chord``) published through kombu's in-memory
  transport, whose envelope is the Redis transport's, are read by :func:`celeriac.protocol.decode`.
  Each is also read by Celery's own worker ``Request``, and both readings must agree.
* celeriac → Celery: :func:`celeriac.protocol.encode` output is handed to a kombu ``Message`` and a
  Celery worker ``Request`` (``celery/worker/request.py``), which must see the same id, name,
  arguments, times, limits and links; executing it runs the real ``celery.app.trace`` code, whose
  follow-up messages (callbacks, next chain step, errbacks) are read back with celeriac.
"""

# celery and kombu ship no type information.
# mypy: disable-error-code="import-untyped,untyped-decorator,no-untyped-call"

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from queue import Empty
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery import Celery, chain, chord, group
from celery.worker.request import Request
from celery.worker.strategy import hybrid_to_proto2
from kombu import compression as kombu_compression
from kombu import serialization
from kombu.message import Message

from celeriac import codecs
from celeriac.exceptions import ContentDisallowed
from celeriac.protocol import TaskMessage, decode, encode
from celeriac.protocol.envelope import TransportMessage

ACCEPT_ALL = codecs.resolve_accept(["json", "pickle", "msgpack", "yaml"])
KOMBU_ACCEPT = [
    "application/json",
    "application/x-python-serialize",
    "application/x-msgpack",
    "application/x-yaml",
]
#: Envelope-level keys of the virtual (Redis/memory) transport, not task properties.
TRANSPORT_PROPERTIES = {"delivery_info", "delivery_tag", "body_encoding"}


@pytest.fixture
def calls() -> list[Any]:
    """What the app's tasks record when Celery runs them."""
    return []


@pytest.fixture
def app(calls: list[Any]) -> Iterator[Celery]:
    """A Celery app on kombu's in-memory transport, with its own default queue."""
    celery_app = Celery(
        "interop", broker="memory://", backend="cache+memory://", set_as_current=False
    )
    queue = f"interop-{uuid.uuid4().hex}"
    celery_app.conf.task_default_queue = queue
    celery_app.conf.accept_content = ["json", "pickle", "msgpack", "yaml"]

    @celery_app.task(shared=False, name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    @celery_app.task(shared=False, name="tasks.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @celery_app.task(shared=False, name="tasks.on_err")
    def on_err(task_id: str) -> None:
        calls.append(("on_err", task_id))

    @celery_app.task(shared=False, name="tasks.fail")
    def fail(*args: Any) -> None:
        raise ValueError("fails on purpose")

    @celery_app.task(shared=False, name="tasks.probe", bind=True)
    def probe(self: Any, *args: Any, **kwargs: Any) -> str:
        request = self.request
        names = ["id", "retries", "timelimit", "group", "group_index", "chord", "root_id"]
        names += ["parent_id", "reply_to", "correlation_id", "delivery_info"]
        calls.append({n: getattr(request, n, None) for n in names})
        calls.append({"args": list(args), "kwargs": kwargs})
        return "probed"

    yield celery_app
    celery_app.close()


def default_queue(app: Celery) -> str:
    name: str = app.conf.task_default_queue
    return name


def drain(app: Celery, queue: str | None = None) -> list[dict[str, Any]]:
    """Every raw envelope waiting in ``queue``, oldest first (the Redis envelope layout)."""
    envelopes = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        while True:
            try:
                envelopes.append(channel._get(queue or default_queue(app)))
            except Empty:
                return envelopes


def from_envelope(envelope: dict[str, Any]) -> TransportMessage:
    props = envelope["properties"]
    assert props["body_encoding"] == "base64"
    return TransportMessage(
        body=base64.b64decode(envelope["body"]),
        content_type=envelope["content-type"],
        content_encoding=envelope["content-encoding"],
        headers=envelope["headers"],
        properties={k: v for k, v in props.items() if k not in TRANSPORT_PROPERTIES},
    )


def to_kombu(transport: TransportMessage) -> Message:
    """What a Celery worker's consumer holds for a delivered message."""
    return Message(
        body=transport.body,
        content_type=transport.content_type,
        content_encoding=transport.content_encoding,
        headers=dict(transport.headers),
        properties=dict(transport.properties),
        delivery_info={"exchange": "", "routing_key": "celery"},
        accept=KOMBU_ACCEPT,
    )


def celery_request(app: Celery, transport: TransportMessage) -> Request:
    kombu_message = to_kombu(transport)
    if "task" not in transport.headers:  # protocol v1, as celery.worker.strategy converts it
        body, headers, decoded, utc = hybrid_to_proto2(kombu_message, kombu_message.decode())
        return Request(
            kombu_message,
            app=app,
            task=app.tasks[headers["task"]],
            body=body,
            headers=headers,
            decoded=decoded,
            utc=utc,
        )
    return Request(kombu_message, app=app, task=app.tasks[transport.headers["task"]])


def jsonish(value: Any) -> Any:
    """Tuples → lists, as any serializer but pickle delivers them."""
    return json.loads(json.dumps(value))


def assert_same_reading(msg: TaskMessage, req: Request) -> None:
    """celeriac's TaskMessage and Celery's worker Request describe the same task."""
    rd = req.request_dict
    assert (msg.id, msg.task) == (req.id, req.type)
    assert req.name == (msg.shadow or msg.task)
    assert jsonish(msg.args) == jsonish(list(req.args))
    assert msg.kwargs == req.kwargs
    assert msg.eta == req.eta
    assert msg.expires == req.expires
    assert list(msg.timelimit) == list(req.time_limits)
    assert msg.retries == rd.get("retries", 0)
    assert (msg.root_id, msg.parent_id) == (req.root_id, req.parent_id)
    assert (msg.group, msg.group_index) == (rd.get("group"), rd.get("group_index"))
    if "ignore_result" in rd:
        assert msg.ignore_result == rd["ignore_result"]
    assert msg.correlation_id == req.correlation_id
    assert (msg.reply_to or "") == (req.reply_to or "")
    _, _, embed = req._payload
    embed = embed or {}
    for key in ("callbacks", "errbacks", "chain", "chord"):
        assert jsonish(getattr(msg, key)) == jsonish(embed.get(key)), key


# -- Celery → celeriac ----------------------------------------------------------------------------

ETA = datetime(2026, 11, 23, 22, 9, 16, 419419, tzinfo=UTC)
EXPIRES = datetime(2026, 11, 23, 22, 10, 46, 419419, tzinfo=UTC)

AS_TASK_OPTIONS: list[dict[str, Any]] = [
    {},
    {"eta": ETA, "expires": EXPIRES},
    {"expires": EXPIRES, "retries": 4, "time_limit": 60, "soft_time_limit": 50},
    {"time_limit": None, "soft_time_limit": 2.5},
    {"group_id": "g-1", "group_index": 2, "root_id": "root", "parent_id": "parent"},
    {"shadow": "add-shadow", "reply_to": "reply-q", "ignore_result": True, "origin": "me@here"},
    {"kwargs": {"y": 3, "nested": {"a": [1, 2]}}, "args": (1,)},
]


def signature_dicts(app: Celery) -> dict[str, Any]:
    mul, on_err = app.tasks["tasks.mul"], app.tasks["tasks.on_err"]
    return {
        "callbacks": [dict(mul.s(10)), dict(mul.si(2, 2))],
        "errbacks": [dict(on_err.s())],
        "chain": [dict(mul.s(4)), dict(mul.s(3))],
        "chord": dict(app.tasks["tasks.add"].s(100)),
    }


@pytest.mark.parametrize("options", AS_TASK_OPTIONS)
@pytest.mark.parametrize("with_links", [False, True])
def test_as_task_v2_is_decoded(app: Celery, options: dict[str, Any], with_links: bool) -> None:
    options = {"args": (2, 3), **options}
    if with_links:
        options.update(signature_dicts(app))
    task_id = str(uuid.uuid4())
    built = app.amqp.as_task_v2(task_id, "tasks.add", **options)
    content_type, encoding, data = serialization.dumps(built.body, serializer="json")
    transport = TransportMessage(
        body=data.encode() if isinstance(data, str) else data,
        content_type=content_type,
        content_encoding=encoding,
        headers=built.headers,
        properties=built.properties,
    )

    msg = decode(transport, ACCEPT_ALL)

    links = signature_dicts(app) if with_links else {}
    expected = TaskMessage(
        id=task_id,
        task="tasks.add",
        args=list(options["args"]),
        kwargs=options.get("kwargs", {}),
        eta=options.get("eta"),
        expires=options.get("expires"),
        retries=options.get("retries", 0),
        timelimit=(options.get("time_limit"), options.get("soft_time_limit")),
        root_id=options.get("root_id", task_id),
        parent_id=options.get("parent_id"),
        group=options.get("group_id"),
        group_index=options.get("group_index"),
        shadow=options.get("shadow"),
        origin=built.headers["origin"],
        ignore_result=options.get("ignore_result", False),
        argsrepr=built.headers["argsrepr"],
        kwargsrepr=built.headers["kwargsrepr"],
        callbacks=jsonish(links.get("callbacks")),
        errbacks=jsonish(links.get("errbacks")),
        chain=jsonish(links.get("chain")),
        chord=jsonish(links.get("chord")),
        reply_to=options.get("reply_to"),
        correlation_id=task_id,
    )
    assert msg == expected
    assert_same_reading(msg, celery_request(app, transport))


@pytest.mark.parametrize("serializer", ["json", "pickle", "msgpack", "yaml"])
@pytest.mark.parametrize("method", [None, "gzip", "bzip2", "lzma"])
def test_kombu_serializers_and_compression_are_decoded(
    app: Celery, serializer: str, method: str | None
) -> None:
    built = app.amqp.as_task_v2(
        "id-1", "tasks.add", args=(2, 3), kwargs={"k": "v"}, eta=ETA, **signature_dicts(app)
    )
    content_type, encoding, data = serialization.dumps(built.body, serializer=serializer)
    data = data.encode() if isinstance(data, str) else data
    headers = dict(built.headers)
    if method is not None:
        data, headers["compression"] = kombu_compression.compress(data, method)
    transport = TransportMessage(data, content_type, encoding, headers, dict(built.properties))

    msg = decode(transport, ACCEPT_ALL)

    assert (msg.id, msg.args, msg.kwargs, msg.eta) == ("id-1", [2, 3], {"k": "v"}, ETA)
    assert jsonish(msg.callbacks) == jsonish(signature_dicts(app)["callbacks"])
    assert jsonish(msg.chain) == jsonish(signature_dicts(app)["chain"])
    assert_same_reading(msg, celery_request(app, transport))


def test_apply_async_with_every_option_through_the_broker(app: Celery) -> None:
    add, mul, on_err = app.tasks["tasks.add"], app.tasks["tasks.mul"], app.tasks["tasks.on_err"]
    before = datetime.now(UTC)
    add.apply_async(
        (2, 3),
        countdown=30,
        expires=120,
        priority=5,
        headers={"x-custom": "v"},
        time_limit=60,
        soft_time_limit=50,
        shadow="add-shadow",
        link=mul.s(10),
        link_error=on_err.s(),
        task_id="11111111-2222-3333-4444-555555555555",
        ignore_result=True,
        retries=2,
    )
    (envelope,) = drain(app)
    transport = from_envelope(envelope)

    msg = decode(transport, ACCEPT_ALL)

    assert msg.id == msg.root_id == msg.correlation_id == "11111111-2222-3333-4444-555555555555"
    assert (msg.task, msg.shadow, msg.args, msg.kwargs) == ("tasks.add", "add-shadow", [2, 3], {})
    assert msg.eta is not None and msg.expires is not None
    assert before + timedelta(seconds=30) <= msg.eta <= datetime.now(UTC) + timedelta(seconds=30)
    assert msg.expires - msg.eta == timedelta(seconds=90)
    assert (msg.timelimit, msg.priority, msg.ignore_result) == ((60, 50), 5, True)
    assert msg.retries == 2
    assert msg.extra_headers == {"x-custom": "v"}
    assert msg.callbacks is not None and msg.callbacks[0]["task"] == "tasks.mul"
    assert msg.callbacks[0]["args"] == [10]
    assert msg.errbacks is not None and msg.errbacks[0]["task"] == "tasks.on_err"
    assert msg.reply_to  # Celery sets its oid on every message
    assert_same_reading(msg, celery_request(app, transport))
    # And our writer would produce the very same headers and task properties for it.
    properties = {k: v for k, v in transport.properties.items() if k != "expiration"}
    assert encode(msg).headers == transport.headers
    assert {k: v for k, v in encode(msg).properties.items() if k != "expiration"} == properties


def test_apply_async_with_serializer_and_compression_options(app: Celery) -> None:
    app.tasks["tasks.add"].apply_async(
        (7, 8), serializer="msgpack", compression="bzip2", task_id="c-1"
    )
    (envelope,) = drain(app)
    transport = from_envelope(envelope)
    assert transport.headers["compression"] == "application/x-bz2"
    assert transport.content_type == "application/x-msgpack"
    with pytest.raises(ContentDisallowed):
        decode(transport, codecs.resolve_accept(["json"]))
    msg = decode(transport, ACCEPT_ALL)
    assert (msg.id, msg.args) == ("c-1", [7, 8])


def test_chain_through_the_broker(app: Celery) -> None:
    add, mul = app.tasks["tasks.add"], app.tasks["tasks.mul"]
    result = chain(add.s(1, 2), add.s(3), mul.s(4)).apply_async()
    (envelope,) = drain(app)
    msg = decode(from_envelope(envelope), ACCEPT_ALL)
    assert (msg.task, msg.args) == ("tasks.add", [1, 2])
    assert msg.chain is not None
    # Reversed: the next step is the last element; the final step is the first.
    assert [(s["task"], s["args"]) for s in msg.chain] == [("tasks.mul", [4]), ("tasks.add", [3])]
    assert msg.chain[0]["options"]["task_id"] == result.id


def test_group_through_the_broker(app: Celery) -> None:
    add = app.tasks["tasks.add"]
    result = group(add.s(1, 1), add.s(2, 2)).apply_async()
    messages = [decode(from_envelope(e), ACCEPT_ALL) for e in drain(app)]
    assert [(m.args, m.group, m.group_index) for m in messages] == [
        ([1, 1], result.id, 0),
        ([2, 2], result.id, 1),
    ]


def test_chord_through_the_broker(app: Celery) -> None:
    add = app.tasks["tasks.add"]
    result = chord([add.s(1, 1), add.s(2, 2)], add.s(100)).apply_async()
    messages = [decode(from_envelope(e), ACCEPT_ALL) for e in drain(app)]
    assert len(messages) == 2
    for index, msg in enumerate(messages):
        assert msg.group_index == index and msg.group is not None
        assert msg.chord is not None
        assert msg.chord["task"] == "tasks.add" and msg.chord["args"] == [100]
        assert msg.chord["options"]["task_id"] == result.id


def test_as_task_v1_is_decoded_and_agrees_with_celerys_conversion(app: Celery) -> None:
    built = app.amqp.as_task_v1(
        "v1-id",
        "tasks.add",
        args=(2, 3),
        kwargs={"z": 1},
        eta=ETA,
        expires=EXPIRES,
        retries=1,
        time_limit=10,
        soft_time_limit=5,
        group_id="g",
        **{k: v for k, v in signature_dicts(app).items() if k != "chain"},
    )
    assert built.headers == {}
    content_type, encoding, data = serialization.dumps(built.body, serializer="json")
    transport = TransportMessage(data.encode(), content_type, encoding, {}, built.properties)

    msg = decode(transport, ACCEPT_ALL)

    assert msg.protocol == 1
    assert (msg.id, msg.task, msg.args, msg.kwargs) == ("v1-id", "tasks.add", [2, 3], {"z": 1})
    assert (msg.eta, msg.expires, msg.retries, msg.timelimit) == (ETA, EXPIRES, 1, (10, 5))
    assert msg.group == "g" and msg.chain is None
    assert msg.chord is not None and msg.chord["args"] == [100]
    assert_same_reading(msg, celery_request(app, transport))


def test_as_task_v1_pickle_is_decoded_only_when_accepted(app: Celery) -> None:
    built = app.amqp.as_task_v1("v1-p", "tasks.add", args=(9, 42))
    content_type, encoding, data = serialization.dumps(built.body, serializer="pickle")
    transport = TransportMessage(data, content_type, encoding, {}, built.properties)
    with pytest.raises(ContentDisallowed):
        decode(transport, codecs.resolve_accept(["json"]))
    msg = decode(transport, ACCEPT_ALL)
    assert (msg.args, msg.protocol) == ([9, 42], 1)


def test_as_task_v1_local_time_when_utc_is_off() -> None:
    local_app = Celery("local", broker="memory://", set_as_current=False)
    local_app.conf.enable_utc = False
    local_app.conf.timezone = "America/New_York"
    zone = ZoneInfo("America/New_York")
    built = local_app.amqp.as_task_v1("v1-l", "tasks.add", eta=datetime(2026, 7, 1, 12, 0))
    assert built.body["utc"] is False
    content_type, encoding, data = serialization.dumps(built.body, serializer="json")
    transport = TransportMessage(data.encode(), content_type, encoding, {}, built.properties)
    msg = decode(transport, ACCEPT_ALL, local_tz=zone)
    assert msg.eta == datetime(2026, 7, 1, 12, 0, tzinfo=zone)
    local_app.close()


# -- celeriac → Celery ----------------------------------------------------------------------------


def rich_message(app: Celery, **overrides: Any) -> TaskMessage:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "task": "tasks.probe",
        "args": [1, "two"],
        "kwargs": {"three": 3},
        "eta": now + timedelta(seconds=30),
        "expires": now + timedelta(hours=1),
        "retries": 2,
        "timelimit": (60, 50),
        "root_id": "root-1",
        "parent_id": "parent-1",
        "group": "group-1",
        "group_index": 1,
        "shadow": "probe-shadow",
        "ignore_result": False,
        "origin": "celeriac@test",
        "argsrepr": "(1, 'two')",
        "kwargsrepr": "{'three': 3}",
        "callbacks": jsonish([app.tasks["tasks.mul"].s(10)]),
        "errbacks": jsonish([app.tasks["tasks.on_err"].s()]),
        "chain": jsonish([app.tasks["tasks.mul"].s(3)]),
        "reply_to": "reply-q",
        "priority": 3,
        "extra_headers": {"x-custom": "v"},
    }
    values.update(overrides)
    return TaskMessage(**values)


@pytest.mark.parametrize("serializer", ["json", "pickle", "msgpack", "yaml"])
@pytest.mark.parametrize("method", [None, "gzip", "bzip2", "lzma"])
def test_celery_worker_reads_our_message(app: Celery, serializer: str, method: str | None) -> None:
    msg = rich_message(app)
    transport = encode(msg, serializer=serializer, compression=method)
    req = celery_request(app, transport)

    assert req.id == msg.id and req.type == "tasks.probe" and req.name == "probe-shadow"
    assert list(req.args) == [1, "two"] and req.kwargs == {"three": 3}
    assert req.eta == msg.eta and req.expires == msg.expires
    assert req.eta is not None and req.eta.tzinfo is not None
    assert list(req.time_limits) == [60, 50]
    assert req.request_dict["retries"] == 2
    assert req.request_dict["x-custom"] == "v"
    assert req.delivery_info["priority"] == 3
    # Our reading of our own message is the message (with the correlation id to_v2 filled in),
    # and it agrees with Celery's on every field.
    decoded = decode(transport, ACCEPT_ALL)
    assert decoded == replace(msg, correlation_id=msg.id)
    assert_same_reading(decoded, req)


def test_celery_runs_our_message_and_its_links(app: Celery) -> None:
    msg = rich_message(app, eta=None, expires=None, task="tasks.add", args=[2, 3], kwargs={})
    req = celery_request(app, encode(msg))

    assert req.execute() == 5

    follow_ups = [decode(from_envelope(e), ACCEPT_ALL) for e in drain(app)]
    # The callback mul(5, 10), then the next chain step mul(5, 3), both sent by Celery's tracer.
    assert [(m.task, m.args) for m in follow_ups] == [("tasks.mul", [5, 10]), ("tasks.mul", [5, 3])]
    for follow_up in follow_ups:
        assert follow_up.parent_id == msg.id
        assert follow_up.root_id == msg.root_id
    assert follow_ups[1].chain == []  # the last step carries an empty chain


def test_celery_passes_our_request_fields_to_the_task(app: Celery, calls: list[Any]) -> None:
    msg = rich_message(app, eta=None, expires=None, callbacks=None, chain=None, errbacks=None)
    msg.chord = dict(app.tasks["tasks.add"].s(100))
    celery_request(app, encode(msg)).execute()

    context, call = calls
    assert call == {"args": [1, "two"], "kwargs": {"three": 3}}
    assert context["id"] == msg.id
    assert context["retries"] == 2
    assert list(context["timelimit"]) == [60, 50]
    assert (context["group"], context["group_index"]) == ("group-1", 1)
    assert (context["root_id"], context["parent_id"]) == ("root-1", "parent-1")
    assert context["chord"]["task"] == "tasks.add"
    assert (context["reply_to"], context["correlation_id"]) == ("reply-q", msg.id)
    assert context["delivery_info"]["priority"] == 3


def test_celery_sends_our_errback_on_failure(app: Celery) -> None:
    msg = TaskMessage(
        id="failing-1",
        task="tasks.fail",
        errbacks=[dict(app.tasks["tasks.on_err"].s())],
    )
    req = celery_request(app, encode(msg))
    req.execute()
    (errback,) = [decode(from_envelope(e), ACCEPT_ALL) for e in drain(app)]
    # Old-style errback: published with the failed task's id as its first argument.
    assert (errback.task, errback.args) == ("tasks.on_err", ["failing-1"])


def test_celery_honours_expiry_of_our_message(app: Celery) -> None:
    msg = TaskMessage(id="late-1", task="tasks.add", args=[1, 2], expires=datetime(2000, 1, 1))
    transport = encode(msg)
    assert transport.properties["expiration"] == "0"
    req = celery_request(app, transport)
    assert req.expires == datetime(2000, 1, 1, tzinfo=UTC)
    assert req.maybe_expire()
