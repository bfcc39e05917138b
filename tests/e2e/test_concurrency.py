"""Concurrency limits through whole workers: async tasks beside a small pool, per-queue limits.

Real ``celeriac worker`` processes on the embedded SQLite broker. Each task returns when it started
and ended, so the results alone show how many ran at once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import slottasks

from celeriac import group

pytestmark = pytest.mark.e2e

#: The I/O-bound scenario of the benchmarks, scaled down: N tasks sleeping SLEEP s, LIMIT at once.
N, SLEEP, LIMIT = 1000, 0.1, 500
CEILING = LIMIT / SLEEP


@pytest.fixture
def client(workdir: Path) -> Iterator[Path]:
    yield workdir
    slottasks.app.close()


def _status(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_async_tasks_run_at_their_own_limit_beside_a_two_thread_pool(
    start_worker: Any, client: Path
) -> None:
    # Queued before the worker starts, as the benchmark's drain: start-up is not measured.
    results = group(slottasks.nap.s(SLEEP) for _ in range(N)).apply_async()
    worker = start_worker("-c", "2", "--async-concurrency", str(LIMIT), app="slottasks")
    spans = results.get(timeout=60)
    ready = float((client / "ready.time").read_text())
    elapsed = max(end for _, end in spans) - ready
    rate = N / elapsed
    peak_rss_mb = int(_status(worker.proc.pid, "VmHWM").split()[0]) / 1024
    print(  # the figures, for whoever runs this with -s
        f"\n{N} x {SLEEP * 1000:.0f} ms async at {LIMIT}: {elapsed:.3f} s, {rate:,.0f} tasks/s "
        f"= {rate / CEILING:.0%} of the {CEILING:,.0f}/s ceiling; worker peak RSS "
        f"{peak_rss_mb:.1f} MB"
    )
    # Two rounds of 500 need 0.2 s; the pool's 2 slots would need 50 s, the default limit
    # (100) 1 s. The margin is for fetching, decoding and storing on a loaded machine.
    assert elapsed < 0.5 + 0.4
    worker.wait_for(
        "Concurrency of celery: 2 sync task(s) at once (threads pool), 500 async def task(s) "
        "at once (event loop); prefetch 8 while only sync tasks run, 2000 while only async def "
        "tasks run, 2008 while both do."
    )
    # The sync pool is still two threads: async tasks took none.
    assert len(slottasks.pool_threads.delay().get(timeout=10)) == 1
    doze = group(slottasks.doze.s(0.2) for _ in range(4)).apply_async().get(timeout=10)
    assert max(_most_at_once(doze), 0) == 2
    assert len(slottasks.pool_threads.delay().get(timeout=10)) == 2
    threads = int(_status(worker.proc.pid, "Threads"))
    print(f"worker threads after the run: {threads}")
    assert threads < 20


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_a_slow_queue_at_its_limit_does_not_delay_a_fast_one(
    start_worker: Any, client: Path
) -> None:
    worker = start_worker("-c", "4", "-Q", "slow:1,fast:10", app="slottasks")
    worker.wait_for("Concurrency of queue slow: 1 task(s) at once, sync or async")
    worker.wait_for("Concurrency of queue fast: 10 task(s) at once, sync or async")
    slow = [slottasks.doze.apply_async((0.3,), queue="slow") for _ in range(10)]
    fast = [slottasks.doze.apply_async((0.01,), queue="fast") for _ in range(20)]
    slow_spans = [result.get(timeout=30) for result in slow]
    fast_spans = [result.get(timeout=30) for result in fast]
    # One slow task at a time, though -c 4 would allow four.
    assert _most_at_once(slow_spans) == 1
    # The fast ones, sent after all ten slow ones, were all done before the third slow one ended:
    # they did not wait behind the slow queue (3 s of work).
    third_slow_end = sorted(end for _, end in slow_spans)[2]
    assert max(end for _, end in fast_spans) < third_slow_end
    assert _most_at_once(fast_spans) <= 10


def test_a_bad_queue_limit_stops_the_worker_with_one_line(client: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celeriac", "-A", "slottasks", "worker", "-Q", "io:x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=client,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: Invalid value for '-Q' / '--queues': io:x: 'x' is not a whole number of tasks; "
        "write io:N with N >= 1 (a queue name cannot contain ':' here)"
    )
