"""The interop cases, run by every broker + result store pairing and in both directions.

A test module subclasses :class:`InteropCases` and provides two fixtures: ``direction`` (a
:class:`tests.interop.conftest.Direction`, parametrised over who sends and who runs) and
``to_celeriac`` (the Celery-client-to-celeriac-worker direction only). Every result is read back
through the sending app's own ``AsyncResult``: a real Celery ``AsyncResult`` when Celery sent the
task, a celeriac one when celeriac did.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import celery
import pytest

import celeriac
from tests.interop.conftest import Direction

#: Seconds a result may take. Generous for a loaded 2-core machine; a passing test takes far less.
TIMEOUT = 15.0

#: (serializer, arguments, the type names the worker sees). What survives the trip tells which
#: codec decoded the body: JSON turns a tuple into a list, msgpack keeps bytes, pickle keeps all.
SERIALIZER_CASES = [
    pytest.param(
        "json",
        ("s", 1, 1.5, [1], {"k": 1}, None, True, (1, 2)),
        ["str", "int", "float", "list", "dict", "NoneType", "bool", "list"],
        id="json",
    ),
    pytest.param(
        "msgpack",
        ("s", 1, 1.5, b"raw", {"k": 1}, (1, 2)),
        ["str", "int", "float", "bytes", "dict", "list"],
        id="msgpack",
    ),
    pytest.param(
        "pickle",
        ((1, 2), {1, 2}, b"raw", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), Decimal("1.5")),
        ["tuple", "set", "bytes", "datetime", "Decimal"],
        id="pickle",
    ),
]


class InteropCases:
    """Test cases shared by the Redis and RabbitMQ interop modules."""

    def test_plain_task(self, direction: Direction) -> None:
        result = direction.task("add").delay(30, 42)
        assert result.get(timeout=TIMEOUT) == 72
        assert result.state == "SUCCESS"
        # The worker on the other side ran it, under the id the sender chose.
        direction.worker.wait_for(f"interop.add[{result.id}]")
        info = direction.task("delivery").delay().get(timeout=TIMEOUT)
        assert info["side"] == direction.receiver

    def test_kwargs(self, direction: Direction) -> None:
        assert direction.task("add").apply_async(kwargs={"x": 3, "y": 4}).get(timeout=TIMEOUT) == 7
        echoed = direction.task("echo").apply_async(
            (1, "two"), {"three": [3], "four": {"f": 4.5}, "none": None}
        )
        assert echoed.get(timeout=TIMEOUT) == {
            "args": [1, "two"],
            "kwargs": {"three": [3], "four": {"f": 4.5}, "none": None},
        }

    def test_failure_reraises_real_type_and_message(self, direction: Direction) -> None:
        result = direction.task("fail").delay()
        with pytest.raises(ValueError) as raised:
            result.get(timeout=TIMEOUT)
        assert type(raised.value) is ValueError
        assert raised.value.args == ("bad thing",)
        assert result.state == "FAILURE"
        assert "ValueError" in (result.traceback or "")

    def test_countdown_runs_after_it_not_before(self, direction: Direction) -> None:
        countdown = 1.0
        sent_at = time.time()
        result = direction.task("clock").apply_async(countdown=countdown)
        ran_at = result.get(timeout=countdown + TIMEOUT)
        # Both processes read the same clock; 10 ms covers the rounding of the ISO-8601 eta.
        assert ran_at >= sent_at + countdown - 0.01, ran_at - sent_at
        assert ran_at <= sent_at + countdown + 5.0, ran_at - sent_at

    def test_already_expired_is_revoked_never_run(self, direction: Direction) -> None:
        # On RabbitMQ, Celery also gives an expired task a message TTL of 0: the broker drops it
        # unless a consumer can take it at once, which the idle worker here always can.
        expired = datetime.now(UTC) - timedelta(seconds=30)
        result = direction.task("echo").apply_async(("never run",), expires=expired)
        # Waited for with get(): Celery's rpc:// client reads replies through the consumer that
        # get() starts, so polling .state alone can miss a reply that consumer already took.
        outcome = result.get(timeout=TIMEOUT, propagate=False)
        assert type(outcome).__name__ == "TaskRevokedError", outcome
        assert result.state == "REVOKED"
        with pytest.raises(Exception) as raised:
            result.get(timeout=TIMEOUT)
        assert type(raised.value).__name__ == "TaskRevokedError"
        assert f"[{result.id}] succeeded" not in direction.worker.log()

    def test_ignore_result_stores_nothing(self, direction: Direction) -> None:
        ignored = direction.task("add").apply_async((1, 2), ignore_result=True)
        direction.worker.wait_for(f"[{ignored.id}] succeeded", timeout=TIMEOUT)
        # A result stored after the ignored task ran: the worker has been writing results since.
        assert direction.task("add").delay(2, 2).get(timeout=TIMEOUT) == 4
        assert ignored.state == "PENDING"

    def test_priority_is_carried(self, direction: Direction) -> None:
        info = direction.task("delivery").apply_async(priority=7).get(timeout=TIMEOUT)
        assert info["side"] == direction.receiver
        assert info["priority"] == 7

    def test_named_queue(self, direction: Direction) -> None:
        result = direction.task("delivery").apply_async(queue=direction.named_queue)
        info = result.get(timeout=TIMEOUT)
        assert info["side"] == direction.receiver
        assert info["routing_key"] == direction.named_queue

    @pytest.mark.parametrize(("serializer", "args", "expected"), SERIALIZER_CASES)
    def test_serializer(
        self, direction: Direction, serializer: str, args: tuple[Any, ...], expected: list[str]
    ) -> None:
        result = direction.task("types").apply_async(args, serializer=serializer)
        assert result.get(timeout=TIMEOUT) == expected

    def test_200_tasks_in_flight(self, direction: Direction) -> None:
        sleepy = direction.task("sleepy")
        results = [sleepy.delay(0.005, i) for i in range(200)]
        assert len({r.id for r in results}) == 200
        assert [r.get(timeout=TIMEOUT) for r in results] == list(range(200))

    def test_chain_runs_to_the_end(self, direction: Direction) -> None:
        # The first message carries the rest of the chain; the worker on the other side sends
        # each next step with the result, as the sender's own worker would.
        add = direction.task("add")
        result = (add.s(1, 2) | add.s(3) | add.s(4)).apply_async()
        assert result.get(timeout=TIMEOUT) == 10
        assert result.parent.get(timeout=TIMEOUT) == 6
        direction.worker.wait_for(f"interop.add[{result.id}]")

    def test_failed_chain_step_fails_the_chain(self, direction: Direction) -> None:
        add, fail = direction.task("add"), direction.task("fail")
        result = (add.s(1, 2) | fail.si() | add.s(4)).apply_async()
        with pytest.raises(ValueError, match="bad thing"):
            result.get(timeout=TIMEOUT)

    def test_group(self, direction: Direction) -> None:
        add = direction.task("add")
        group = celery.group if direction.sender == "celery" else celeriac.group
        result = group(add.s(i, i) for i in range(20)).apply_async()
        assert result.get(timeout=TIMEOUT) == [i + i for i in range(20)]
        assert result.completed_count() == 20

    def test_time_limit_of_a_celery_client(self, to_celeriac: Direction) -> None:
        # Celery writes the header timelimit [1, None]; the celeriac worker stops the task at 1 s
        # and stores TimeLimitExceeded, which Celery's own AsyncResult raises as its class.
        result = to_celeriac.task("sleepy").apply_async((3, "late"), time_limit=1)
        with pytest.raises(Exception) as raised:
            result.get(timeout=TIMEOUT)
        assert type(raised.value).__name__ == "TimeLimitExceeded"
        assert type(raised.value).__module__ == "billiard.exceptions"  # Celery's class
        assert result.state == "FAILURE"
        to_celeriac.worker.wait_for(
            f"Hard time limit (1.0s) exceeded for interop.sleepy[{result.id}]"
        )

    def test_async_def_task_on_celeriac_worker(self, to_celeriac: Direction) -> None:
        # Celery has no async def tasks: the Celery client sends by name.
        results = [to_celeriac.client.send_task("interop.async_add", (i, 1)) for i in range(20)]
        assert [r.get(timeout=TIMEOUT) for r in results] == [i + 1 for i in range(20)]
