"""A worker started before its broker is reachable waits for it instead of exiting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import APPS, WorkerProcess
from tests.services import free_port

pytestmark = pytest.mark.e2e


def test_worker_waits_for_an_unreachable_broker_and_stops_cleanly(workdir: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]),
        "CELERIAC_BROKER_URL": f"redis://:secret@127.0.0.1:{free_port()}/0",
    }
    worker = WorkerProcess(workdir, env, ["-A", "e2etasks", "worker", "-l", "info"], "waiting")
    try:
        worker.wait_for("Cannot connect to the broker at redis://:**@127.0.0.1:")
        worker.wait_for("retrying in 2s", timeout=10)
        assert worker.proc.poll() is None, "the worker gave up instead of waiting"
        assert "secret" not in worker.log()
    finally:
        started = time.monotonic()
        code = worker.stop()
    assert code == 0, worker.log()
    assert time.monotonic() - started < 5
