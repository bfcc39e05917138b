"""group and chain on the wire, against the real Celery 5.7: same messages, and each side's worker
continues the other side's chains.

Celery's messages are published through kombu's in-memory transport and read back with the helpers
of :mod:`tests.unit.test_protocol_celery_interop`; celeriac's go through its memory broker.
"""

# celery and kombu ship no type information.
# mypy: disable-error-code="import-untyped,untyped-decorator,no-untyped-call"

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import celery
import pytest

import celeriac
from celeriac.contrib.testing import start_worker
from celeriac.protocol import decode, wire
from celeriac.protocol.envelope import TransportMessage
from tests.unit.test_protocol_celery_interop import (
    ACCEPT_ALL,
    celery_request,
    drain,
    from_envelope,
)

#: Headers that differ between any two messages (ids, the sending process, argument reprs).
PER_MESSAGE = {"id", "root_id", "origin", "argsrepr", "kwargsrepr", "group"}


@pytest.fixture
def capp() -> Iterator[celery.Celery]:
    """A Celery app on kombu's in-memory transport."""
    app = celery.Celery("cv", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.task_default_queue = f"canvas-{uuid.uuid4().hex}"

    @app.task(shared=False, name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="tasks.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    yield app
    app.close()


@pytest.fixture
def app() -> Iterator[celeriac.Celery]:
    """A celeriac app with the same tasks, on its memory transport."""
    name = uuid.uuid4().hex
    app = celeriac.Celery("cv", broker=f"memory://{name}", backend=f"memory://{name}")
    app.conf.task_default_queue = "canvas"

    @app.task(name="tasks.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="tasks.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    yield app
    app.close()


def ours(app: celeriac.Celery) -> list[TransportMessage]:
    """Every message waiting in the celeriac app's default queue, as published."""

    async def take() -> list[TransportMessage]:
        broker = await app.abroker()
        deliveries = await broker.fetch([app.conf.task_default_queue], 1000, 0.05)
        await broker.ack(deliveries)
        return [d.message for d in deliveries]

    return app.run_sync(take())


def publish(app: celeriac.Celery, message: TransportMessage) -> None:
    async def put() -> None:
        broker = await app.abroker()
        await broker.publish(message, exchange="", routing_key=app.conf.task_default_queue)

    app.run_sync(put())


def test_group_members_are_written_as_celery_writes_them(
    capp: celery.Celery, app: celeriac.Celery
) -> None:
    theirs_result = celery.group(capp.tasks["tasks.add"].s(i, i) for i in range(3)).apply_async()
    theirs = [from_envelope(e) for e in drain(capp)]
    our_result = celeriac.group(app.tasks["tasks.add"].s(i, i) for i in range(3)).apply_async()
    mine = ours(app)
    assert len(theirs) == len(mine) == 3
    for index, (their, our) in enumerate(zip(theirs, mine, strict=True)):
        assert list(our.headers) == list(their.headers)
        for key, value in their.headers.items():
            if key not in PER_MESSAGE:
                assert our.headers[key] == value, key
        assert their.headers["group"] == theirs_result.id
        assert our.headers["group"] == our_result.id
        assert our.headers["group_index"] == their.headers["group_index"] == index
        # Each member is its own root, in both.
        assert our.headers["root_id"] == our.headers["id"] == our_result.results[index].id
        assert our.headers["argsrepr"] == their.headers["argsrepr"] == f"({index}, {index})"
        assert our.body == their.body
        assert set(our.properties) == set(their.properties)
        assert our.properties["correlation_id"] == our.headers["id"]
        # And a Celery worker reads our member as it reads its own.
        request = celery_request(capp, our)
        assert (request.id, request.request_dict["group"]) == (our.headers["id"], our_result.id)
        assert request.request_dict["group_index"] == index


def test_a_chain_is_written_as_celery_writes_it(capp: celery.Celery, app: celeriac.Celery) -> None:
    c_add, c_mul = capp.tasks["tasks.add"], capp.tasks["tasks.mul"]
    their_result = (c_add.s(1, 2) | c_add.s(3) | c_mul.si(4, 4)).apply_async()
    (their,) = [decode(from_envelope(e), ACCEPT_ALL) for e in drain(capp)]
    add, mul = app.tasks["tasks.add"], app.tasks["tasks.mul"]
    our_result = (add.s(1, 2) | add.s(3) | mul.si(4, 4)).apply_async()
    (transport,) = ours(app)
    our = decode(transport, ACCEPT_ALL)
    assert (our.task, our.args, our.root_id) == (their.task, their.args, our.id)
    assert our.chain is not None and their.chain is not None
    assert len(our.chain) == len(their.chain) == 2
    for our_step, their_step in zip(our.chain, their.chain, strict=True):
        assert list(our_step) == list(their_step)
        for key in ("task", "args", "kwargs", "subtask_type", "immutable"):
            assert our_step[key] == their_step[key], key
        # Celery also fixes its reply queue in every step; celeriac only needs one for rpc://.
        assert set(our_step["options"]) == set(their_step["options"]) - {"reply_to"}
    # The chain field is reversed: the caller's result is the first element's id, in both.
    assert their.chain[0]["options"]["task_id"] == their_result.id
    assert our.chain[0]["options"]["task_id"] == our_result.id
    assert our.chain[1]["options"]["task_id"] == our_result.parent.id
    assert our_result.parent.parent.id == our.id


def test_celery_continues_our_chain(capp: celery.Celery, app: celeriac.Celery) -> None:
    add, mul = app.tasks["tasks.add"], app.tasks["tasks.mul"]
    result = (add.s(1, 2) | add.s(3) | mul.s(4)).apply_async()
    (first,) = ours(app)
    # Celery's worker runs our first message and sends the next step as Celery does.
    assert celery_request(capp, first).execute() == 3
    (envelope,) = drain(capp)
    second = decode(from_envelope(envelope), ACCEPT_ALL)
    first_id = first.headers["id"]
    assert (second.task, second.args) == ("tasks.add", [3, 3])
    assert second.id == result.parent.id
    assert (second.parent_id, second.root_id) == (first_id, first_id)
    assert [step["options"]["task_id"] for step in second.chain or []] == [result.id]
    # ... and its next step too: the last one carries an empty chain.
    assert celery_request(capp, from_envelope(envelope)).execute() == 6
    (last_envelope,) = drain(capp)
    last = decode(from_envelope(last_envelope), ACCEPT_ALL)
    assert (last.id, last.args, last.chain, last.root_id) == (result.id, [6, 4], [], first_id)


def test_our_worker_continues_celerys_chains(capp: celery.Celery, app: celeriac.Celery) -> None:
    c_add, c_mul = capp.tasks["tasks.add"], capp.tasks["tasks.mul"]
    chained = (c_add.s(1, 2) | c_add.s(3) | c_mul.s(4)).apply_async()
    ending_in_group = (c_add.s(1, 2) | celery.group(c_add.s(10), c_mul.s(20))).apply_async()
    for envelope in drain(capp):
        publish(app, from_envelope(envelope))
    with start_worker(app, queues=[app.conf.task_default_queue], concurrency=2):
        assert app.AsyncResult(chained.id).get(timeout=10) == 24
        assert app.AsyncResult(chained.parent.id).get(timeout=5) == 6
        members = [app.AsyncResult(r.id) for r in ending_in_group.results]
        assert celeriac.GroupResult(ending_in_group.id, members, app=app).get(timeout=10) == [
            13,
            60,
        ]

    async def stored_parent(task_id: str) -> Any:
        backend = await app.aresult_store()
        return (await backend.get(task_id)).get("parent_id")

    assert app.run_sync(stored_parent(chained.id)) == chained.parent.id


def test_a_group_step_sent_by_our_worker_is_what_celerys_would_send(
    capp: celery.Celery, app: celeriac.Celery
) -> None:
    """The members a worker sends for a group step: Celery's trace and ours, side by side."""
    c_add = capp.tasks["tasks.add"]
    (c_add.s(1, 2) | celery.group(c_add.s(10), c_add.s(20))).apply_async()
    (first_envelope,) = drain(capp)
    first = from_envelope(first_envelope)
    celery_request(capp, first).execute()
    # Celery's tracer sends the members through the current app, whose default queue is "celery".
    sent = drain(capp) + drain(capp, "celery")
    theirs = sorted(
        (decode(from_envelope(e), ACCEPT_ALL) for e in sent), key=lambda m: m.group_index
    )
    from celeriac.app.chains import next_step

    message = decode(first, ACCEPT_ALL)
    assert message.chain is not None
    prepared = next_step(app, message.chain, 3, message.id, message.root_id or message.id)
    mine = [wire.decode(wire.encode(o.message), ACCEPT_ALL) for o in prepared.outgoings]
    for our, their in zip(mine, theirs, strict=True):
        for field in ("id", "task", "args", "group", "group_index", "parent_id", "root_id"):
            assert getattr(our, field) == getattr(their, field), field


def test_a_chain_of_one_task_is_that_task(app: celeriac.Celery) -> None:
    add = app.tasks["tasks.add"]
    result = celeriac.chain(add.s(2, 2)).apply_async()
    (transport,) = ours(app)
    message = decode(transport, ACCEPT_ALL)
    assert (message.id, message.args, message.chain) == (result.id, [2, 2], None)
