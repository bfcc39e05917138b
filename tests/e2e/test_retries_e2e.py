"""Retries in a real worker process on the embedded SQLite broker: each retry is a real message
that waits in the database until due, keeps its task id and counts ``retries`` up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import retrytasks

from celeriac import states
from celeriac.brokers.base import BrokerOptions
from celeriac.brokers.sqlite import SQLiteBroker

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(workdir: Path) -> Iterator[Path]:
    """The test's directory; the client's connections to its files are closed afterwards."""
    yield workdir
    retrytasks.app.close()


def runs(workdir: Path, task: str, task_id: str) -> list[list[str]]:
    path = workdir / "runs.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split()[2:] for line in lines if line.split()[:2] == [task, task_id]]


def signal_lines(workdir: Path, name: str) -> list[list[str]]:
    path = workdir / "signals.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split()[1:] for line in lines if line.split()[0] == name]


def waiting(workdir: Path) -> int:
    async def size() -> int:
        broker = SQLiteBroker(f"sqlite:///{workdir}/broker.sqlite3", BrokerOptions())
        await broker.connect()
        try:
            return await broker.size("celery")
        finally:
            await broker.close()

    return asyncio.run(size())


def test_retry_twice_then_success(start_worker: Any, client: Path) -> None:
    worker = start_worker(app="retrytasks")
    result = retrytasks.flaky.delay(2)
    assert result.get(timeout=15) == 2
    assert result.state == states.SUCCESS
    assert [r[0] for r in runs(client, "flaky", result.id)] == ["0", "1", "2"]
    assert worker.log().count(f"retrytasks.flaky[{result.id}] retry: Retry in 0.05s") == 2
    retried = [line for line in signal_lines(client, "task_retry") if line[1] == result.id]
    assert [line[2] for line in retried] == ["0", "1"]
    assert signal_lines(client, "worker_ready") == [[]]


def test_past_max_retries_the_original_exception_is_the_result(
    start_worker: Any, client: Path
) -> None:
    start_worker(app="retrytasks")
    result = retrytasks.doomed.delay()
    with pytest.raises(ValueError, match="boom"):
        result.get(timeout=15)
    assert result.state == states.FAILURE
    assert "ValueError: boom" in (result.traceback or "")
    assert [r[0] for r in runs(client, "doomed", result.id)] == ["0", "1", "2"]
    failures = signal_lines(client, "task_failure")
    assert failures == [["retrytasks.doomed", result.id, "ValueError"]]


def test_a_retry_waits_in_the_broker_not_in_the_worker(start_worker: Any, client: Path) -> None:
    worker = start_worker(app="retrytasks")
    result = retrytasks.waits.delay()
    worker.wait_for(f"retrytasks.waits[{result.id}] retry: Retry in 1.5s", timeout=10)
    # The retried message is in the database, invisible until due; the worker holds nothing.
    assert waiting(client) == 1
    # The RETRY document is written just after that log line: wait for it briefly.
    deadline = time.monotonic() + 1.0
    while result.state != states.RETRY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert result.state == states.RETRY
    assert result.get(timeout=15) == 1
    done = runs(client, "waits", result.id)
    assert [r[0] for r in done] == ["0", "1"]
    times = [float(r[1]) for r in done]
    assert times[1] - times[0] >= 1.4
    assert waiting(client) == 0


def test_autoretry_with_backoff_and_jitter(start_worker: Any, client: Path) -> None:
    worker = start_worker(app="retrytasks")
    started = time.monotonic()
    result = retrytasks.call_api.delay()
    with pytest.raises(ConnectionError, match="api down"):
        result.get(timeout=15)
    assert time.monotonic() - started < 10
    assert [r[0] for r in runs(client, "call_api", result.id)] == ["0", "1", "2"]
    # Celery's delays: full jitter over min(1, 1 * 2**retries), so 0 or 1 second each time.
    delays = [line[3] for line in signal_lines(client, "task_retry") if line[1] == result.id]
    assert len(delays) == 2 and set(delays) <= {"0", "1"}
    log = worker.log()
    assert log.count(f"retrytasks.call_api[{result.id}] retry: Retry in ") == 2
    assert "ConnectionError('api down')" in log


def test_autoretry_of_an_async_task(start_worker: Any, client: Path) -> None:
    start_worker(app="retrytasks")
    result = retrytasks.afetch.delay("https://example.invalid/")
    assert result.get(timeout=15) == "fetched https://example.invalid/"
    assert [r[0] for r in runs(client, "afetch", result.id)] == ["0", "1", "2"]
