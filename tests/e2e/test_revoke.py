"""Revoke across real worker processes, on the embedded SQLite broker and on Redis: revocations
outlive the workers, every worker honours them, and terminate=True stops a running task."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import revoketasks

from celeriac import states
from tests import services
from tests.services import wait_until as _wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite", "redis"])
def where(
    request: pytest.FixtureRequest, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """Broker and result store of the test: the test's SQLite files, or Redis under a prefix."""
    if request.param == "redis":
        yield from _on_redis(monkeypatch)
    else:
        yield ""
        revoketasks.app.close()


@pytest.fixture
def redis_prefix(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Broker and result store on Redis, every key under the prefix this returns."""
    yield from _on_redis(monkeypatch)


def _on_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    services.require_redis()
    prefix = services.unique("rv") + ":"
    monkeypatch.setenv("CELERIAC_BROKER_URL", services.redis_url())
    monkeypatch.setenv("CELERIAC_RESULT_BACKEND", services.redis_url())
    monkeypatch.setenv("REVOKE_KEYPREFIX", prefix)
    revoketasks.use_prefix(prefix)
    yield prefix
    revoketasks.app.close()
    revoketasks.use_prefix(None)
    import redis

    client = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=services.REDIS_DB)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def lines(workdir: Path, name: str) -> list[str]:
    path = workdir / name
    return path.read_text().splitlines() if path.exists() else []


def waiting_messages() -> int:
    async def size() -> int:
        broker = await revoketasks.app.abroker()
        return await broker.size("celery")

    return revoketasks.app.run_sync(size())


def wait_until(condition: Callable[[], Any]) -> None:
    """Worker processes answer within 10 s even on a loaded machine."""
    _wait_until(condition, 10.0, interval=0.02)


def test_a_revoked_task_is_not_run_after_a_worker_restart(
    start_worker: Any, workdir: Path, where: str
) -> None:
    first = start_worker(app="revoketasks")
    assert revoketasks.record.delay("warm-up").get(timeout=10) == "warm-up"
    assert first.stop() == 0
    # No worker runs: one message is already waiting, the other is sent after its revoke.
    waiting = revoketasks.record.delay("waiting")
    waiting.revoke()
    revoketasks.app.control.revoke("sent-after-its-revoke")
    later = revoketasks.record.apply_async(("later",), task_id="sent-after-its-revoke")
    second = start_worker(app="revoketasks")
    assert revoketasks.record.delay("healthy").get(timeout=10) == "healthy"
    for result in (waiting, later):
        second.wait_for(f"Discarding revoked task: revoketasks.record[{result.id}]")
        assert result.state == states.REVOKED
    assert "Loaded 2 revoked task id(s)" in second.log()
    assert lines(workdir, "ran.log") == ["warm-up", "healthy"]
    wait_until(lambda: waiting_messages() == 0)


def test_two_worker_processes_share_revokes(start_worker: Any, workdir: Path, where: str) -> None:
    workers = [start_worker("-c", "2", app="revoketasks") for _ in range(2)]
    revoked = [f"shared-{i}" for i in range(3)]
    revoketasks.app.control.revoke(revoked)
    # Both heard of it while running (Redis at once, SQLite within half a second).
    for worker in workers:
        worker.wait_for("Tasks flagged as revoked: shared-0, shared-1, shared-2", timeout=5)
    results = [
        revoketasks.record.apply_async((f"t{i}",), task_id=revoked[i] if i < 3 else None)
        for i in range(24)
    ]
    assert [r.get(timeout=15) for r in results[3:]] == [f"t{i}" for i in range(3, 24)]
    discarded = "".join(w.log() for w in workers).count("Discarding revoked task")
    wait_until(lambda: "".join(w.log() for w in workers).count("Discarding revoked task") == 3)
    assert discarded <= 3
    assert sorted(lines(workdir, "ran.log")) == sorted(f"t{i}" for i in range(3, 24))
    assert all(r.state == states.REVOKED for r in results[:3])


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_terminate_stops_running_tasks_and_the_worker_carries_on(
    start_worker: Any, workdir: Path, where: str, pool: str
) -> None:
    worker = start_worker("-c", "2", "-P", pool, app="revoketasks")
    async_task = revoketasks.nap.delay("async", 30)
    sync_task = revoketasks.doze.delay("sync", 30)
    wait_until(lambda: sorted(lines(workdir, "started.log")) == ["async", "sync"])
    started = time.monotonic()
    revoketasks.app.control.revoke([async_task.id, sync_task.id], terminate=True)
    worker.wait_for(f"Terminating revoketasks.nap[{async_task.id}] (SIGTERM)", timeout=5)
    worker.wait_for(f"Terminating revoketasks.doze[{sync_task.id}] (SIGTERM)", timeout=5)
    for result in (async_task, sync_task):
        wait_until(lambda r=result: str(revoketasks.app.AsyncResult(r.id).result) == "terminated")
    assert time.monotonic() - started < 3
    # Both slots serve new tasks at once.
    assert [revoketasks.record.delay(f"next{i}").get(timeout=10) for i in range(4)] == [
        f"next{i}" for i in range(4)
    ]
    time.sleep(0.2)
    assert lines(workdir, "ran.log") == [f"next{i}" for i in range(4)]
    for result in (async_task, sync_task):
        assert revoketasks.app.AsyncResult(result.id).state == states.REVOKED
    wait_until(lambda: waiting_messages() == 0)
    assert worker.stop() == 0


def test_a_revoke_broadcast_by_celery_reaches_a_running_worker(
    start_worker: Any, workdir: Path, redis_prefix: str
) -> None:
    """celery_app.control.revoke() on a Redis broker: kombu's pub/sub mailbox, heard live."""
    import celery

    worker = start_worker("-c", "2", app="revoketasks")
    running = revoketasks.nap.delay("long", 30)
    wait_until(lambda: lines(workdir, "started.log") == ["long"])
    capp = celery.Celery(
        "celery-client",
        broker=services.redis_url(),
        broker_transport_options={"global_keyprefix": redis_prefix},
    )
    try:
        capp.control.revoke("celery-revoked")
        capp.control.revoke("for-another-worker", destination=["celery@elsewhere"])
        capp.control.revoke(running.id, terminate=True, signal="SIGKILL")
    finally:
        capp.close()
    worker.wait_for("Tasks flagged as revoked (broadcast by Celery): celery-revoked", timeout=5)
    worker.wait_for(f"Terminating revoketasks.nap[{running.id}] (SIGKILL)", timeout=5)
    wait_until(lambda: str(revoketasks.app.AsyncResult(running.id).result) == "terminated")
    dropped = revoketasks.record.apply_async(("dropped",), task_id="celery-revoked")
    other = revoketasks.record.apply_async(("other",), task_id="for-another-worker")
    assert other.get(timeout=10) == "other"
    worker.wait_for(f"Discarding revoked task: revoketasks.record[{dropped.id}]")
    assert lines(workdir, "ran.log") == ["other"]
