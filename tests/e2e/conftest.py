"""Real worker processes on the embedded SQLite broker, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

APPS = Path(__file__).parent / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))


class WorkerProcess:
    """``celeriac -A <app> worker`` in a subprocess, its log in a file."""

    def __init__(self, workdir: Path, env: dict[str, str], args: list[str], name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "celeriac", *args]
        self.proc = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=self._log, stderr=self._log
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8")

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not in worker log after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory whose SQLite files serve as broker and result store for client and worker."""
    monkeypatch.setenv("CELERIAC_BROKER_URL", f"sqlite:///{tmp_path}/broker.sqlite3")
    monkeypatch.setenv("CELERIAC_RESULT_BACKEND", f"sqlite:///{tmp_path}/results.sqlite3")
    yield tmp_path
    import e2etasks

    e2etasks.app.close()  # drop the client's connections to this test's files


@pytest.fixture
def start_worker(workdir: Path) -> Iterator[object]:
    """Start worker processes: ``start_worker("-c", "4", env={...})``; all stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(
        *extra: str, env: dict[str, str] | None = None, app: str = "e2etasks"
    ) -> WorkerProcess:
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        }
        args = ["-A", app, "worker", "--loglevel=info", *extra]
        worker = WorkerProcess(workdir, full_env, args, f"worker{len(started)}")
        started.append(worker)
        worker.wait_for("ready.")
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGTERM, timeout=10)
