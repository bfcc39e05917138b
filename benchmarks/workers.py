"""Worker processes: started, watched, measured (RSS) and always stopped, by their own pid.

Every worker a benchmark starts goes through a :class:`Supervisor`, whose ``with`` block stops all
of them on the way out, whatever happened (an error, a timeout, Ctrl-C): SIGTERM (a warm shutdown
in both projects), SIGQUIT (a cold one), then SIGKILL for the process and for every child it had
(a prefork pool's).
Nothing is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import psutil

from benchmarks.apps import config
from benchmarks.results import BenchmarkError

#: The repository root: put on the workers' PYTHONPATH so ``-A benchmarks.apps...`` imports.
ROOT = Path(__file__).resolve().parents[1]
#: Seconds a worker gets to become ready (Celery imports a lot, and the machine may be busy).
READY_TIMEOUT = 60.0
#: Seconds a warm shutdown (SIGTERM) may take before a cold one (SIGQUIT) is asked for, and that
#: one before SIGKILL. Workers are stopped once their measurement is over, with nothing left to
#: finish; an idle Celery worker on RabbitMQ notices a signal only when its event loop next wakes
#: (8-10 s), which would only make the run longer.
WARM_TIMEOUT = 1.5
STOP_TIMEOUT = 1.5

MB = 1024 * 1024


class WorkerProcess:
    """One worker subprocess; its output goes to a log file, readiness to a marker file."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.ready_path = workdir / f"{name}.ready"
        self.ready_path.unlink(missing_ok=True)
        full_env = {
            **os.environ,
            **env,
            config.READY_VAR: str(self.ready_path),
            "PYTHONPATH": os.pathsep.join(
                p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p
            ),
        }
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=workdir,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._ps = psutil.Process(self.proc.pid)
        self._children: dict[int, psutil.Process] = {}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise :class:`BenchmarkError` (with the end of the log) if the worker has exited."""
        code = self.proc.poll()
        if code is not None:
            raise BenchmarkError(f"worker {self.name} exited with {code}:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the ``worker_ready`` marker (see :mod:`benchmarks.apps.config`)."""
        deadline = time.monotonic() + timeout
        while not self.ready_path.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"worker {self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def rss(self) -> int:
        """Resident memory in bytes of the worker and all its children (a prefork pool's)."""
        total = 0
        try:
            processes = [self._ps, *self._ps.children(recursive=True)]
        except psutil.Error:
            return 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
                self._children.setdefault(process.pid, process)
        return total

    def stop(self) -> None:
        """Warm shutdown, then cold, then SIGKILL for the worker and every child it had."""
        with contextlib.suppress(psutil.Error):
            for child in self._ps.children(recursive=True):
                self._children.setdefault(child.pid, child)
        for sig, timeout in ((signal.SIGTERM, WARM_TIMEOUT), (signal.SIGQUIT, STOP_TIMEOUT)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for child in self._children.values():
            if child.pid == self.proc.pid:
                continue
            with contextlib.suppress(psutil.Error):
                # psutil checks the process's creation time: a reused pid is never killed.
                if child.is_running():
                    child.kill()
        self._log.close()


class PeakRSS:
    """Samples a worker's RSS (children included) in a background thread; keeps the peak."""

    def __init__(self, worker: WorkerProcess, interval: float = 0.05) -> None:
        self.worker = worker
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.worker.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.worker.rss())


class Supervisor:
    """Starts workers and, on leaving its ``with`` block, stops every one still running."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._workers: list[WorkerProcess] = []
        self._count = 0

    def start(self, label: str, argv: Sequence[str], env: Mapping[str, str]) -> WorkerProcess:
        """Start a worker and wait until it is ready (stopped again if it never is)."""
        self._count += 1
        name = f"{self._count:03d}-{label}".replace(" ", "_").replace("/", "_")
        worker = WorkerProcess(name, argv, env, self.workdir)
        self._workers.append(worker)
        try:
            worker.wait_ready()
        except BaseException:
            self.stop(worker)
            raise
        return worker

    def stop(self, worker: WorkerProcess) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
            worker.stop()

    @contextlib.contextmanager
    def running(
        self, label: str, argv: Sequence[str], env: Mapping[str, str]
    ) -> Iterator[WorkerProcess]:
        """A started, ready worker for the length of the block."""
        worker = self.start(label, argv, env)
        try:
            yield worker
        finally:
            self.stop(worker)

    def stop_all(self) -> None:
        while self._workers:
            self.stop(self._workers[-1])

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def rss_mb(value: int) -> float:
    return value / MB
