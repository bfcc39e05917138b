"""End to end: a client in this process, real worker processes, the embedded SQLite default."""

from __future__ import annotations

import base64
import json
import pickle
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import e2etasks
import pytest

from celeriac import states
from celeriac.brokers.base import BrokerOptions, TransportMessage
from celeriac.brokers.sqlite import SQLiteBroker
from celeriac.exceptions import NotRegistered, RemoteTaskError, TaskRevokedError

pytestmark = pytest.mark.e2e

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def _publish_raw(workdir: Path, message: TransportMessage, queue: str = "celery") -> None:
    import asyncio

    async def go() -> None:
        broker = SQLiteBroker(f"sqlite:///{workdir}/broker.sqlite3", BrokerOptions())
        await broker.connect()
        try:
            await broker.publish(message, exchange="", routing_key=queue)
        finally:
            await broker.close()

    asyncio.run(go())


def test_sync_and_async_tasks(start_worker: Any) -> None:
    start_worker("-c", "4")
    assert e2etasks.add.delay(30, 42).get(timeout=10) == 72
    assert e2etasks.async_add.delay(2, 3).get(timeout=10) == 5
    result = e2etasks.add.apply_async((1, 2), queue="celery", priority=5)
    assert result.get(timeout=10) == 3
    assert result.state == states.SUCCESS
    assert result.successful() and result.ready() and not result.failed()
    assert result.date_done is not None


def test_failure_reraises_real_type_and_keeps_traceback(start_worker: Any) -> None:
    start_worker()
    result = e2etasks.fail.delay("bad thing")
    with pytest.raises(ValueError, match="bad thing"):
        result.get(timeout=10)
    assert result.state == states.FAILURE
    assert "ValueError: bad thing" in (result.traceback or "")
    value = result.get(timeout=1, propagate=False)
    assert isinstance(value, ValueError)
    # A class the client cannot import safely comes back as RemoteTaskError with its name.
    custom = e2etasks.fail_custom.delay()
    with pytest.raises(RemoteTaskError, match="LocalError: only the worker knows this class"):
        custom.get(timeout=10)


def test_bound_task_sees_its_request(start_worker: Any) -> None:
    worker = start_worker("-n", "probe@%h")
    result = e2etasks.describe.apply_async(task_id="fixed-id-1")
    info = result.get(timeout=10)
    assert info["id"] == "fixed-id-1"
    assert info["task"] == "e2etasks.describe"
    assert info["retries"] == 0
    assert info["hostname"].startswith("probe@")
    assert info["root_id"] == "fixed-id-1"
    assert info["delivery_info"]["routing_key"] == "celery"
    # INFO lines reach the log in batches, up to 50 ms after the result.
    worker.wait_for("Task e2etasks.describe[fixed-id-1] succeeded in", timeout=5)
    assert "Task e2etasks.describe[fixed-id-1] received" in worker.log()


def test_countdown_waits_in_the_broker(start_worker: Any) -> None:
    start_worker()
    sent = time.monotonic()
    result = e2etasks.add.apply_async((1, 1), countdown=1.0)
    assert result.get(timeout=10) == 2
    assert time.monotonic() - sent >= 0.95


def test_expired_task_is_revoked_not_run(start_worker: Any, workdir: Path) -> None:
    result = e2etasks.record.apply_async(("expired",), expires=0.2)
    time.sleep(0.4)
    start_worker()
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)
    assert result.state == states.REVOKED
    assert not (workdir / "record.log").exists()


def test_unregistered_task_fails_with_not_registered(start_worker: Any) -> None:
    worker = start_worker()
    result = e2etasks.app.send_task("e2etasks.no_such_task", (1,))
    with pytest.raises(NotRegistered):
        result.get(timeout=10)
    # The worker keeps going.
    assert e2etasks.add.delay(1, 1).get(timeout=10) == 2
    assert "unregistered task 'e2etasks.no_such_task'" in worker.log()


def test_malformed_messages_are_dead_lettered_and_worker_continues(
    start_worker: Any, workdir: Path
) -> None:
    worker = start_worker()
    bad = [
        TransportMessage(
            b"{not json", "application/json", "utf-8", {"task": "e2etasks.add", "id": "bad-json"}
        ),
        TransportMessage(
            b"[[1, 2], {}]",
            "application/json",
            "utf-8",
            {"task": "e2etasks.add", "id": "two-elements"},
        ),
        TransportMessage(b"[1, 2, 3]", "application/json", "utf-8", {}),
        TransportMessage(
            pickle.dumps(([1, 2], {}, {})),
            "application/x-python-serialize",
            "binary",
            {"task": "e2etasks.add", "id": "pickled"},
        ),
    ]
    for message in bad:
        _publish_raw(workdir, message)
    assert e2etasks.add.delay(2, 2).get(timeout=10) == 4
    deadline = time.monotonic() + 10
    rows: list[tuple[str]] = []
    while time.monotonic() < deadline:
        with sqlite3.connect(workdir / "broker.sqlite3") as db:
            rows = db.execute("SELECT reason FROM dead_letters").fetchall()
        if len(rows) == len(bad):
            break
        time.sleep(0.05)
    assert len(rows) == len(bad), rows
    reasons = " | ".join(r[0] for r in rows)
    assert "malformed" in reasons and "refused content type" in reasons
    # Callers waiting on a refused message learn why instead of waiting forever.
    with pytest.raises(Exception, match=r"pickle|python-serialize|accept"):
        e2etasks.app.AsyncResult("pickled").get(timeout=5)
    assert worker.proc.poll() is None


def test_design_notes_protocol_v1_pickle_message_runs_when_pickle_accepted(
    start_worker: Any, workdir: Path
) -> None:
    worker = start_worker(env={"E2E_ACCEPT": "json,pickle"})
    assert "accept_content includes application/x-python-serialize" in worker.log()
    # The design notes' message, byte for byte as kept with the protocol's golden captures.
    golden = json.loads((GOLDEN / "v1_legacy_pickle.json").read_text())
    raw = base64.b64decode(golden["body_base64"])
    assert pickle.loads(raw)["args"] == (9, 42)
    _publish_raw(
        workdir, TransportMessage(raw, golden["content_type"], golden["content_encoding"], {})
    )
    result = e2etasks.app.AsyncResult("66d5a86b-1d39-4c88-bc98-2c18b2c98a21")
    assert result.get(timeout=10) == 51


def test_link_and_link_error(start_worker: Any, workdir: Path) -> None:
    start_worker("-c", "2")
    ok = e2etasks.add.apply_async((2, 3), link=e2etasks.record.s())
    assert ok.get(timeout=10) == 5
    failed = e2etasks.fail.apply_async(("boom",), link_error=e2etasks.record.s())
    with pytest.raises(ValueError):
        failed.get(timeout=10)
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline:
        log = workdir / "record.log"
        lines = log.read_text().split() if log.exists() else []
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    assert sorted(lines) == sorted(["5", failed.id])


def test_retry_twice_then_success(start_worker: Any, workdir: Path) -> None:
    worker = start_worker()
    result = e2etasks.flaky.delay(2)
    assert result.get(timeout=15) == 2
    runs = (workdir / "flaky.log").read_text().split("\n")
    assert [line.split()[1] for line in runs if line] == ["0", "1", "2"]
    assert all(line.split()[0] == result.id for line in runs if line)
    assert worker.log().count(f"e2etasks.flaky[{result.id}] retry") == 2


def test_task_sent_from_a_task_gets_parent_and_root(start_worker: Any) -> None:
    start_worker()
    parent = e2etasks.spawn_child.delay(4)
    child_id = parent.get(timeout=10)
    info = e2etasks.app.AsyncResult(child_id).get(timeout=10)
    assert info["parent_id"] == parent.id
    assert info["root_id"] == parent.id


def test_blocking_on_a_result_inside_a_task_is_refused(start_worker: Any) -> None:
    start_worker()
    with pytest.raises(RuntimeError, match=r"Never call result.get\(\) within a task"):
        e2etasks.wait_inside.delay(2).get(timeout=10)


def test_warm_shutdown_finishes_running_and_gives_back_the_rest(
    start_worker: Any, workdir: Path
) -> None:
    worker = start_worker("-c", "1", "--prefetch-multiplier", "4")
    first = e2etasks.slow_record.delay("first", 1.0)
    rest = [e2etasks.record.delay(f"later{i}") for i in range(3)]
    deadline = time.monotonic() + 10
    while not (workdir / "started.log").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.stop(signal.SIGTERM) == 0
    assert first.get(timeout=5) == "first"  # the running task finished
    assert "Warm shutdown" in worker.log()
    # The prefetched ones were given back: a new worker runs them, each once.
    start_worker()
    assert [r.get(timeout=10) for r in rest] == ["later0", "later1", "later2"]
    lines = (workdir / "record.log").read_text().split()
    assert sorted(lines) == sorted(["first", "later0", "later1", "later2"])


def test_sigkill_mid_task_is_redelivered_and_completes_once(
    start_worker: Any, workdir: Path
) -> None:
    env = {"E2E_VISIBILITY": "1"}
    victim = start_worker(env=env)
    result = e2etasks.slow_record.delay("survivor", 0.5)
    deadline = time.monotonic() + 10
    while not (workdir / "started.log").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.stop(signal.SIGKILL)
    assert not (workdir / "record.log").exists()
    start_worker(env=env)
    assert result.get(timeout=15) == "survivor"
    assert (workdir / "record.log").read_text().split() == ["survivor"]
    assert (workdir / "started.log").read_text().split() == ["survivor", "survivor"]


def test_long_task_is_not_redelivered_while_its_worker_lives(
    start_worker: Any, workdir: Path
) -> None:
    env = {"E2E_VISIBILITY": "0.5"}
    start_worker(env=env)
    start_worker(env=env)
    result = e2etasks.slow_record.delay("long", 2.0)  # four times the lease
    assert result.get(timeout=15) == "long"
    time.sleep(0.5)
    assert (workdir / "started.log").read_text().split() == ["long"]


def test_two_workers_drain_without_duplicates(start_worker: Any, workdir: Path) -> None:
    start_worker("-c", "4")
    start_worker("-c", "4")
    count = 600
    started = time.perf_counter()
    results = [e2etasks.record.delay(str(i)) for i in range(count)]
    assert [r.get(timeout=60) for r in results] == [str(i) for i in range(count)]
    elapsed = time.perf_counter() - started
    lines = (workdir / "record.log").read_text().split()
    assert len(lines) == count and len(set(lines)) == count
    print(
        f"\n{count} tasks through 2 SQLite workers, send to last result: {elapsed:.2f}s "
        f"({count / elapsed:.0f} tasks/s)"
    )


def test_requests_this_version_cannot_honour_are_logged_not_dropped_silently(
    start_worker: Any, workdir: Path
) -> None:
    from celeriac.protocol import TaskMessage, wire

    worker = start_worker()
    step = {
        "task": "e2etasks.add",
        "args": [1],
        "kwargs": {},
        "options": {"task_id": "with-extras-next"},
        "immutable": False,
    }
    message = TaskMessage(
        id="with-extras", task="e2etasks.add", args=[1, 2], timelimit=(10.0, 5.0), chain=[step]
    )
    _publish_raw(workdir, wire.encode(message))
    assert e2etasks.app.AsyncResult("with-extras").get(timeout=10) == 3
    # The chain is honoured now: its next step ran with the result.
    assert e2etasks.app.AsyncResult("with-extras-next").get(timeout=10) == 4
    log = worker.log()
    assert "not enforced" not in log  # time limits are enforced now
    assert "will not be sent" not in log
