"""End to end: an idle worker process and a client's ``get()`` woken across processes on SQLite.

The worker polls the broker every 5 s at most and the client reads the result every 5 s at most,
so a round trip within a few milliseconds after the worker has idled is the work of wake-ups: the
publish wakes the worker's fetch, the stored result wakes the client's wait.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wakeuptasks

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(workdir: Path) -> Iterator[None]:
    yield
    wakeuptasks.app.close()


def test_idle_worker_and_waiting_client_are_woken_at_once(start_worker: Any, client: None) -> None:
    start_worker(app="wakeuptasks")
    assert wakeuptasks.add.delay(1, 1).get(timeout=10) == 2  # the client's connections are open
    took = []
    for number in range(5):
        time.sleep(0.3)  # the worker idles: its fetch polls less and less often
        started = time.perf_counter()
        assert wakeuptasks.add.delay(number, 1).get(timeout=10, interval=5.0) == number + 1
        took.append(time.perf_counter() - started)
    assert statistics.median(took) < 0.02, took
    assert max(took) < 0.2, took
