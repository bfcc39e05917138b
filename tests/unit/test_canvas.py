"""group and chain: building them, publishing a group in batches, and running them on a real worker.

The worker is the production one (``celeriac.contrib.testing.start_worker``) on the memory and
SQLite transports; messages are really encoded and results really stored.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from celeriac import (
    AsyncResult,
    Celery,
    GroupResult,
    Signature,
    chain,
    group,
    maybe_signature,
    signature,
    states,
)
from celeriac.app.base import PUBLISH_BATCH
from celeriac.brokers.base import PublishRequest
from celeriac.brokers.memory import MemoryBroker
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import EncodeError, ImproperlyConfigured, PublishError, TimeoutError
from celeriac.protocol import TaskMessage, wire
from celeriac.signals import after_task_publish, before_task_publish
from tests.services import free_port

ACCEPT = frozenset({"application/json"})


def make_app(broker: str, backend: str) -> Celery:
    app = Celery("canvas", broker=broker, backend=backend, set_as_current=False)

    @app.task(name="canvas.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="canvas.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="canvas.fail")
    def fail(*args: Any) -> None:
        raise KeyError(f"failed with {list(args)}")

    @app.task(name="canvas.ids", bind=True)
    def ids(self: Any, *args: Any) -> dict[str, Any]:
        request = self.request
        return {"id": request.id, "parent_id": request.parent_id, "root_id": request.root_id}

    @app.task(name="canvas.unencodable")
    def unencodable(*args: Any) -> object:
        return object()

    @app.task(name="canvas.sleep")
    def sleep(seconds: float) -> float:
        import time

        time.sleep(seconds)
        return seconds

    return app


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Celery]:
    if request.param == "memory":
        name = uuid.uuid4().hex
        app = make_app(f"memory://{name}", f"memory://{name}")
    else:
        app = make_app(
            f"sqlite:///{tmp_path}/broker.sqlite3", f"sqlite:///{tmp_path}/results.sqlite3"
        )
    yield app
    app.close()


@pytest.fixture
def memory_app() -> Iterator[Celery]:
    name = uuid.uuid4().hex
    app = make_app(f"memory://{name}", f"memory://{name}")
    yield app
    app.close()


def task(app: Celery, name: str) -> Any:
    return app.tasks[f"canvas.{name}"]


def waiting_messages(app: Celery, queue: str = "celery") -> list[TaskMessage]:
    """Take every message waiting in ``queue`` (decoded) off the broker."""

    async def take() -> list[TaskMessage]:
        broker = await app.abroker()
        deliveries = await broker.fetch([queue], 100_000, 0.05)
        await broker.ack(deliveries)
        return [wire.decode(d.message, ACCEPT) for d in deliveries]

    return app.run_sync(take())


# -- building ------------------------------------------------------------------------------------


def test_pipe_builds_a_flat_chain(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    built = add.s(1, 2) | add.s(3) | add.si(4, 4)
    assert isinstance(built, chain)
    assert [(s.task, s.args, s.immutable) for s in built.tasks] == [
        ("canvas.add", [1, 2], False),
        ("canvas.add", [3], False),
        ("canvas.add", [4, 4], True),
    ]
    assert chain(add.s(1, 2), add.s(3), add.si(4, 4)).tasks == built.tasks
    assert chain([add.s(1, 2), add.s(3), add.si(4, 4)]).tasks == built.tasks
    nested = chain(add.s(1, 2), chain(add.s(3), add.si(4, 4)))
    assert nested.tasks == built.tasks
    joined = (add.s(1, 2) | add.s(3)) | (add.si(4, 4) | add.s(5))
    assert len(joined.tasks) == 4
    sig = add.s(1, 2)
    sig |= add.s(3)  # chains, as in Celery; a plain dict would merge in place
    assert isinstance(sig, chain)
    assert repr(built) == "canvas.add(1, 2) | canvas.add(3) | canvas.add(4, 4)!"


def test_group_takes_signatures_or_one_iterable(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    assert len(group(add.s(i, i) for i in range(5))) == 5
    assert len(group([add.s(1, 1), add.s(2, 2)])) == 2
    assert len(group(add.s(1, 1), add.s(2, 2))) == 2
    assert group(add.s(1, 1)).tasks == [add.s(1, 1)]
    with pytest.raises(ImproperlyConfigured, match="signatures or one iterable"):
        group(42)
    with pytest.raises(ImproperlyConfigured, match="a dict with a task name"):
        group([add.s(1, 1), "canvas.add"])


def test_chords_are_refused_when_built(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    with pytest.raises(NotImplementedError, match="chord"):
        _ = group(add.s(1, 1), add.s(2, 2)) | add.s(3)
    with pytest.raises(NotImplementedError, match="chord"):
        chain(group(add.s(1, 1)), add.s(3))
    with pytest.raises(NotImplementedError, match="chord"):
        _ = add.s(1, 1) | group(add.s(1), add.s(2)) | add.s(3)


def test_links_on_a_group_are_refused_as_celery_refuses_them(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    with pytest.raises(TypeError, match="Cannot add link to a group"):
        group(add.s(1, 1)).apply_async(link=add.s(1))
    with pytest.raises(TypeError, match="Cannot add link_error to a group"):
        group(add.s(1, 1)).apply_async(link_error=add.s(1))


def test_workflows_travel_as_plain_dicts_and_come_back(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    workflow = add.s(1, 2) | group(add.s(10), add.s(20))
    wire_form = json.loads(json.dumps(workflow.as_wire()))
    assert wire_form["subtask_type"] == "chain"
    assert wire_form["kwargs"]["tasks"][1]["subtask_type"] == "group"
    back = maybe_signature(wire_form, app=memory_app)
    assert isinstance(back, chain)
    assert isinstance(back.tasks[1], group)
    assert [s.args for s in back.tasks[1].tasks] == [[10], [20]]
    assert isinstance(signature(wire_form["kwargs"]["tasks"][1]), group)
    chord_dict = {"task": "celery.chord", "args": [], "kwargs": {}, "subtask_type": "chord"}
    unknown = maybe_signature(chord_dict, app=memory_app)
    assert type(unknown) is Signature and unknown.subtask_type == "chord"
    with pytest.raises(NotImplementedError, match="a chord"):
        unknown.apply_async()
    assert type(workflow.clone()) is chain
    assert type(group(add.s(1, 1)).clone()) is group


def test_freeze_fixes_ids_in_place(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    sig = add.s(1, 2)
    frozen = sig.freeze(group_id="g", group_index=3)
    assert isinstance(frozen, AsyncResult)
    assert sig.options == {"task_id": frozen.id, "group_id": "g", "group_index": 3}
    assert sig.freeze().id == frozen.id  # a frozen id is kept
    grouped = group(add.s(1, 1), add.s(2, 2))
    result = grouped.freeze()
    assert isinstance(result, GroupResult)
    assert [s.options["task_id"] for s in grouped.tasks] == [r.id for r in result.results]
    assert [s.options["group_index"] for s in grouped.tasks] == [0, 1]
    chained = add.s(1, 2) | add.s(3)
    last = chained.freeze()
    assert last.id == chained.tasks[1].id
    assert last.parent is not None and last.parent.id == chained.tasks[0].id


# -- publishing a group --------------------------------------------------------------------------


class CountingBroker(MemoryBroker):
    """The memory broker, recording the size of every publish_many call."""

    def __init__(self, url: str) -> None:
        from celeriac.brokers.base import BrokerOptions

        super().__init__(url, BrokerOptions())
        self.calls: list[int] = []

    async def publish_many(self, items: Sequence[PublishRequest]) -> None:
        self.calls.append(len(items))
        await super().publish_many(items)


def test_a_group_is_published_in_batches_with_signals_per_message(memory_app: Celery) -> None:
    add, mul = task(memory_app, "add"), task(memory_app, "mul")
    before: list[str] = []
    after: list[str] = []

    def on_before(sender: str, headers: dict[str, Any], **kwargs: Any) -> None:
        before.append(headers["id"])
        headers["x-traced"] = "yes"  # receivers may change headers before publishing

    def on_after(sender: str, headers: dict[str, Any], **kwargs: Any) -> None:
        after.append(headers["id"])

    before_task_publish.connect(on_before)
    after_task_publish.connect(on_after)
    count = PUBLISH_BATCH * 2 + 500
    members = [add.s(i, i) for i in range(count)] + [mul.s(2, 3).set(queue="other")]

    async def send() -> tuple[GroupResult, list[int]]:
        broker = CountingBroker(memory_app.conf.resolved_broker_url())
        await broker.connect()
        memory_app.use_connections(broker, None)
        result = await group(members).aapply_async()
        return result, broker.calls

    try:
        result, calls = memory_app.run_sync(send())
    finally:
        before_task_publish.disconnect(on_before)
        after_task_publish.disconnect(on_after)
    # One call per PUBLISH_BATCH messages of a route, and one for the other queue.
    assert sorted(calls) == sorted([PUBLISH_BATCH, PUBLISH_BATCH, 500, 1])
    ids = [r.id for r in result.results]
    assert before == after == ids
    assert len(set(ids)) == len(ids)
    assert {uuid.UUID(task_id).version for task_id in ids} == {4}
    messages = waiting_messages(memory_app)
    assert [m.id for m in messages] == ids[:-1]
    assert all(m.group == result.id for m in messages)
    assert [m.group_index for m in messages] == list(range(count))
    assert all(m.root_id == m.id and m.parent_id is None for m in messages)
    assert messages[7].args == [7, 7]
    assert messages[0].extra_headers["x-traced"] == "yes"
    (other,) = waiting_messages(memory_app, "other")
    assert (other.task, other.args, other.group_index) == ("canvas.mul", [2, 3], count)


def test_an_argument_that_does_not_serialize_sends_nothing(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    seen: list[Any] = []

    def on_before(sender: str, **kwargs: Any) -> None:
        seen.append(sender)

    before_task_publish.connect(on_before)
    try:
        with pytest.raises(EncodeError):
            group([add.s(i, i) for i in range(2000)] + [add.s(1, object())]).apply_async()
    finally:
        before_task_publish.disconnect(on_before)
    assert seen == []
    assert waiting_messages(memory_app) == []


def test_group_options_apply_to_every_member_over_their_own(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    members = [add.s(1, 1).set(priority=1), add.s(2, 2), add.si(3, 3)]
    result = group(members).apply_async((100,), queue="q1", priority=7, task_id="my-group")
    assert result.id == "my-group"
    messages = waiting_messages(memory_app, "q1")
    # Partial arguments go first, except for an immutable member; the group's options win.
    assert [m.args for m in messages] == [[100, 1, 1], [100, 2, 2], [3, 3]]
    assert [m.priority for m in messages] == [7, 7, 7]
    assert {m.group for m in messages} == {"my-group"}
    assert members[0].options == {"priority": 1}  # the caller's signatures are not changed


def test_nested_groups_are_flattened_and_chains_are_members(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    result = group(add.s(1, 1), group(add.s(2, 2), add.s(3, 3)), add.s(4, 4) | add.s(5)).delay()
    assert len(result) == 4
    messages = waiting_messages(memory_app)
    assert [m.args for m in messages] == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert [m.group_index for m in messages[:3]] == [0, 1, 2]
    # The chain's first message carries the rest; its last task is the group's member.
    last_step = messages[3].chain[0]  # type: ignore[index]
    assert last_step["options"]["task_id"] == result.results[3].id
    assert last_step["options"]["group_id"] == result.id
    assert last_step["options"]["group_index"] == 3
    assert messages[3].group is None


def test_an_empty_group_sends_nothing(memory_app: Celery) -> None:
    result = group([]).apply_async()
    assert isinstance(result, GroupResult) and len(result) == 0
    assert result.get(timeout=1) == []
    assert waiting_messages(memory_app) == []


def test_a_task_routed_by_a_function_is_routed_per_member(tmp_path: Path) -> None:
    name = uuid.uuid4().hex
    app = make_app(f"memory://{name}", f"memory://{name}")

    def by_parity(name: str, args: Any, kwargs: Any, options: Any, task: Any = None) -> Any:
        return {"queue": "even" if args[0] % 2 == 0 else "odd"}

    app.conf.task_routes = [by_parity]
    group(task(app, "add").s(i, i) for i in range(6)).apply_async()
    assert [m.args[0] for m in waiting_messages(app, "even")] == [0, 2, 4]
    assert [m.args[0] for m in waiting_messages(app, "odd")] == [1, 3, 5]
    app.close()


# -- running: groups -----------------------------------------------------------------------------


def test_group_results_come_back_in_order(app: Celery) -> None:
    add = task(app, "add")
    with start_worker(app, concurrency=4):
        result = group(add.s(i, i) for i in range(60)).apply_async()
        assert result.get(timeout=10) == [i + i for i in range(60)]
        assert result.ready() and result.successful() and not result.failed()
        assert not result.waiting()
        assert result.completed_count() == 60
        assert [r.get(timeout=1) for r in result] == [i + i for i in range(60)]
        assert result[3].id == result.results[3].id and len(result) == 60
        restored = GroupResult(result.id, [AsyncResult(r.id, app=app) for r in result], app=app)
        assert restored.join(timeout=5) == result.get()
        assert restored == result


def test_a_failed_member_is_raised_or_returned(app: Celery) -> None:
    add, fail = task(app, "add"), task(app, "fail")
    with start_worker(app, concurrency=2):
        result = group(add.s(1, 1), fail.s(7), add.s(2, 2)).apply_async()
        with pytest.raises(KeyError, match=r"failed with \[7\]"):
            result.get(timeout=10)
        values = result.get(timeout=10, propagate=False)
        assert values[0] == 2 and values[2] == 4
        assert isinstance(values[1], KeyError)
        assert result.ready() and result.failed() and not result.successful()
        assert result.completed_count() == 2


def test_waiting_for_a_group_times_out(memory_app: Celery) -> None:
    sleep = task(memory_app, "sleep")
    with start_worker(memory_app, concurrency=2):
        result = group(sleep.s(0.01), sleep.s(0.6)).apply_async()
        with pytest.raises(TimeoutError, match="1 task"):
            result.get(timeout=0.3)
        assert not result.ready()
        assert result.completed_count() == 1
        assert result.get(timeout=5) == [0.01, 0.6]


def test_async_callers_have_twins(memory_app: Celery) -> None:
    add = task(memory_app, "add")

    async def run() -> tuple[list[int], bool, int]:
        result = await group(add.s(i, 1) for i in range(10)).aapply_async()
        values = await result.aget(timeout=10)
        chained = await (add.s(1, 2) | add.s(3)).adelay()
        assert await chained.aget(timeout=10) == 6
        return values, await result.aready(), await result.acompleted_count()

    with start_worker(memory_app, concurrency=2):
        values, ready, count = asyncio.run(run())
    assert values == [i + 1 for i in range(10)]
    assert ready and count == 10


def test_waiting_for_a_group_inside_a_task_is_refused(memory_app: Celery) -> None:
    add = task(memory_app, "add")

    @memory_app.task(name="canvas.waits")
    def waits() -> Any:
        return group(add.s(1, 1)).apply_async().get(timeout=5)

    with start_worker(memory_app, concurrency=2), pytest.raises(RuntimeError, match="deadlock"):
        waits.delay().get(timeout=10)


# -- running: chains -----------------------------------------------------------------------------


def test_a_chain_passes_each_result_on(app: Celery) -> None:
    add, mul = task(app, "add"), task(app, "mul")
    with start_worker(app, concurrency=2):
        result = (add.s(1, 2) | add.s(3) | add.s(4)).apply_async()
        assert result.get(timeout=10) == 10
        assert result.parent is not None and result.parent.get(timeout=5) == 6
        assert result.parent.parent is not None and result.parent.parent.get(timeout=5) == 3
        assert len(result.as_list()) == 3
        # Partial arguments go to the first task; an immutable step ignores the result.
        assert chain(add.s(2), mul.si(5, 5), mul.s(2)).apply_async((1,)).get(timeout=10) == 50
        assert chain(add.s(1, 1))().get(timeout=10) == 2
        named = (add.s(1, 1) | add.s(1)).apply_async(task_id="the-last")
        assert named.id == "the-last" and named.get(timeout=10) == 3


def test_every_step_shares_the_root_and_knows_its_parent(memory_app: Celery) -> None:
    add, ids = task(memory_app, "add"), task(memory_app, "ids")
    with start_worker(memory_app, concurrency=2):
        result = (add.s(1, 1) | ids.s() | ids.s()).apply_async()
        last = result.get(timeout=10)
        middle = result.parent.get(timeout=5)
        first_id = result.parent.parent.id
        assert middle == {"id": result.parent.id, "parent_id": first_id, "root_id": first_id}
        assert last == {"id": result.id, "parent_id": result.parent.id, "root_id": first_id}


def test_a_failed_step_fails_the_rest_of_the_chain(app: Celery) -> None:
    add, fail = task(app, "add"), task(app, "fail")
    errors: list[str] = []

    @app.task(name="canvas.on_error")
    def on_error(task_id: str) -> None:
        errors.append(task_id)

    with start_worker(app, concurrency=2):
        result = chain(add.s(1, 2), fail.s(), add.s(4), add.s(5), link_error=on_error.s()).delay()
        with pytest.raises(KeyError, match=r"failed with \[3\]"):
            result.get(timeout=10)
        assert result.state == states.FAILURE
        assert result.parent is not None and result.parent.state == states.FAILURE
        failed_step = result.parent.parent
        assert failed_step is not None and failed_step.state == states.FAILURE
        assert failed_step.parent is not None and failed_step.parent.get(timeout=5) == 3
        assert "KeyError" in (result.traceback or "")
    assert errors == [failed_step.id]


def test_a_result_the_next_step_cannot_take_fails_the_rest(memory_app: Celery) -> None:
    add, unencodable = task(memory_app, "add"), task(memory_app, "unencodable")
    with start_worker(memory_app, concurrency=2):
        result = (unencodable.s() | add.s(1) | add.s(2)).apply_async()
        with pytest.raises(EncodeError):
            result.get(timeout=10)
        assert result.parent is not None and result.parent.state == states.FAILURE


def test_a_step_that_cannot_be_sent_fails_the_rest_not_the_task(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    with start_worker(memory_app, concurrency=2):
        result = (add.s(1, 1) | add.s(2).set(countdown=-5) | add.s(3)).apply_async()
        with pytest.raises(ImproperlyConfigured, match="countdown must not be negative"):
            result.get(timeout=10)
        assert result.parent is not None and result.parent.state == states.FAILURE
        first = result.parent.parent
        assert first is not None and first.get(timeout=5) == 2
        assert first.state == states.SUCCESS


def test_a_chain_can_end_with_a_group(app: Celery) -> None:
    add = task(app, "add")
    with start_worker(app, concurrency=2):
        result = (add.s(1, 2) | add.s(3) | group(add.s(10), add.s(20), add.si(0, 0))).delay()
        assert isinstance(result, GroupResult)
        assert result.get(timeout=10) == [16, 26, 0]
        assert result.parent is not None and result.parent.get(timeout=5) == 6


def test_a_group_of_chains(memory_app: Celery) -> None:
    add, mul = task(memory_app, "add"), task(memory_app, "mul")
    with start_worker(memory_app, concurrency=4):
        result = group((add.s(i, i) | mul.s(10)) for i in range(5)).apply_async()
        assert result.get(timeout=10) == [i * 20 for i in range(5)]


def test_a_chain_step_that_is_itself_a_chain_is_spliced_in(memory_app: Celery) -> None:
    add = task(memory_app, "add")
    inner = add.s(10) | add.s(100)
    last = inner.freeze()
    message = TaskMessage(id=str(uuid.uuid4()), task="canvas.add", args=[1, 1])
    message.chain = [inner.as_wire()]

    async def publish() -> None:
        broker = await memory_app.abroker()
        await broker.publish(wire.encode(message), exchange="", routing_key="celery")

    with start_worker(memory_app, concurrency=2):
        memory_app.run_sync(publish())
        assert memory_app.AsyncResult(last.id).get(timeout=10) == 112


# -- waiting for many results --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_wait_many_yields_documents_as_tasks_finish(kind: str, tmp_path: Path) -> None:
    from celeriac.backends.base import BackendOptions
    from celeriac.backends.memory import MemoryBackend
    from celeriac.backends.meta import build_meta
    from celeriac.backends.sqlite import SQLiteBackend

    async def scenario() -> None:
        if kind == "memory":
            store: Any = MemoryBackend(f"memory://{uuid.uuid4().hex}", BackendOptions())
        else:
            store = SQLiteBackend(f"sqlite:///{tmp_path}/r.sqlite3", BackendOptions())
        await store.connect()
        try:
            await store.store(build_meta("a", states.SUCCESS, 1))
            await store.store(build_meta("c", states.STARTED, None))
            seen: list[str] = []

            async def finish_later() -> None:
                await asyncio.sleep(0.05)
                await store.store(build_meta("c", states.SUCCESS, 3))
                await asyncio.sleep(0.05)
                await store.store(build_meta("b", states.FAILURE, ValueError("b")))

            writer = asyncio.create_task(finish_later())
            async for task_id, meta in store.wait_many(["a", "b", "c", "a"], timeout=5):
                seen.append(task_id)
                assert meta["task_id"] == task_id
            await writer
            assert seen == ["a", "c", "b"]
            with pytest.raises(TimeoutError, match="1 task"):
                async for _ in store.wait_many(["a", "never"], timeout=0.1):
                    pass
            with pytest.raises(TimeoutError):
                async for _ in store.wait_many(["never"], timeout=0):
                    pass
            assert [m["status"] for m in await store.get_many(["a", "never", "b"])] == [
                states.SUCCESS,
                states.PENDING,
                states.FAILURE,
            ]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_group_to_an_unreachable_broker_is_retried_then_raises() -> None:
    app = make_app(f"redis://127.0.0.1:{free_port()}/0", "memory://")
    app.conf.task_publish_retry_policy = {"max_retries": 2, "interval_start": 0.01}
    add = task(app, "add")
    with pytest.raises(PublishError, match=r"and 9 more to 'celery' after 3 attempts"):
        group(add.s(i, i) for i in range(10)).apply_async()
    app.close()
