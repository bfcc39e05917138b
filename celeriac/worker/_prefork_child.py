"""The pool processes of ``-P prefork``: the launcher, and the children it forks.

The **launcher** is started by the worker with ``multiprocessing``'s *spawn* method: a fresh
interpreter, with the worker's ``sys.path``, working directory and main module. It imports the
app (``module:attribute``), the modules of its tasks and those of ``imports``/``include``, applies
the worker's settings, and then forks every child. It has no thread and no event loop, so a fork of
it is safe, and each child starts with the app and its tasks already loaded: a replacement after a
kill is ready in milliseconds, however long the app takes to import. The launcher reaps its
children and reports how each one ended; it exits, killing what is left, when the worker goes.

A **child** sends ``worker_process_init`` once, then connects to the worker (a child that dies
before that failed to start: the worker says so, and does not count it as lost work) and runs one
body at a time: the task signals are sent here, in the child, as Celery sends them. ``SIGUSR1`` is the soft
time limit (Celery's signal): it raises :class:`~celeriac.exceptions.SoftTimeLimitExceeded` in the
body, if the job's soft deadline has come (a late signal never reaches the next job). The hard
limit is the worker killing the child.

Both ignore SIGINT and SIGQUIT: Ctrl-C in a terminal signals the whole process group, and the
worker decides what its children do at shutdown.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from celeriac.exceptions import (
    DecodeError,
    EncodeError,
    ImproperlyConfigured,
    NotRegistered,
    SoftTimeLimitExceeded,
)
from celeriac.signals import worker_process_init
from celeriac.worker import _prefork_wire as wire
from celeriac.worker import execution

if TYPE_CHECKING:
    from celeriac.app.base import Celery

#: A soft-limit signal that arrives this little before the deadline still counts (the worker's
#: timer and the child's clock may round differently).
_CLOCK_SLACK = 0.01


@dataclass(slots=True)
class LauncherConfig:
    """What the worker tells its launcher."""

    socket_path: str
    token: str
    #: ``module:attribute`` of the app.
    app_ref: str
    #: Modules defining the worker's tasks.
    modules: list[str]
    #: The worker's settings (those that can be pickled), applied after the app is imported.
    settings: dict[str, Any]
    hostname: str
    #: The worker's root log level, when it logs (children log to stderr in Celery's format).
    log_level: int | None


def launcher_main(config: LauncherConfig) -> None:
    """The launcher process (a ``multiprocessing`` spawn target)."""
    _ignore_terminal_signals()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(config.socket_path)
    sock.sendall(wire.hello(config.token, "launcher", os.getpid(), 0))
    try:
        _configure_logging(config.log_level)
        app = load_app(config)
    except BaseException:
        wire.send(sock, ("error", traceback.format_exc()))
        return
    wire.send(sock, ("ready", sorted(app.tasks)))
    _Launcher(config, app, sock).serve()


def load_app(config: LauncherConfig) -> Celery:
    """Import the app and its tasks as the worker has them."""
    from celeriac.app.base import Celery

    module_name, _, attribute = config.app_ref.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attribute)
    if not isinstance(app, Celery):
        raise ImproperlyConfigured(f"{config.app_ref} is a {type(app).__name__}, not the app")
    app.conf.update(config.settings)
    app.import_default_modules()
    for name in config.modules:
        importlib.import_module(name)
    return app


def _ignore_terminal_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


def _configure_logging(level: int | None) -> None:
    if level is None:
        return
    from celeriac.worker.logs import LOG_FORMAT

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _Launcher:
    """Forks children on request, reaps them, reports their ends."""

    def __init__(self, config: LauncherConfig, app: Celery, sock: socket.socket) -> None:
        self.config = config
        self.app = app
        self.sock = sock
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()

    def serve(self) -> None:
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # SIGCHLD wakes the select below through the wakeup fd; the handler itself does nothing.
        signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.set_wakeup_fd(self.wake_w)
        try:
            while True:
                ready, _, _ = select.select([self.sock.fileno(), self.wake_r], [], [])
                if self.wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 4096)
                    self._reap()
                if self.sock.fileno() in ready:
                    payload = wire.recv(self.sock)
                    if payload is None:
                        break  # the worker is gone, or stopping
                    message = pickle.loads(payload)
                    if message[0] == "fork":
                        self._fork(message[1])
        finally:
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _fork(self, index: int) -> None:
        for stream in (sys.stdout, sys.stderr):  # nothing buffered may be written twice
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            self._become_child(index)
        self.children.add(pid)
        wire.send(self.sock, ("forked", index, pid))

    def _become_child(self, index: int) -> NoReturn:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.sock.close()
            code = _Child(self.config, self.app, index).serve()
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            # Never return into the launcher's code, nor run its exit handlers.
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            wire.send(self.sock, ("exited", pid, os.waitstatus_to_exitcode(status)))


class _Current:
    """The job this child runs, as its signal handler needs to know it."""

    #: The soft deadline of the job being run (``time.monotonic()``); None between jobs.
    soft_deadline: float | None = None


def _on_soft_limit(signum: int, frame: FrameType | None) -> None:
    """SIGUSR1: raise SoftTimeLimitExceeded in the body, if its soft limit has come."""
    deadline = _Current.soft_deadline
    if deadline is None or time.monotonic() < deadline - _CLOCK_SLACK:
        return  # between jobs, or late for a job that already ended
    _Current.soft_deadline = None
    raise SoftTimeLimitExceeded()


class _Child:
    """One pool process: runs the bodies the worker sends, one at a time."""

    def __init__(self, config: LauncherConfig, app: Celery, index: int) -> None:
        self.config = config
        self.app = app
        self.index = index

    def serve(self) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, _on_soft_limit)
        # Celery's name for a prefork child, as log lines show it (%(processName)s).
        multiprocessing.current_process().name = f"ForkPoolWorker-{self.index}"
        if worker_process_init.receivers:
            worker_process_init.send(sender=self.config.hostname)
        # Connected once initialized: a child that dies in its initialization never counts as
        # started, and the worker forks the next one after a pause instead of in a tight loop.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.config.socket_path)
        sock.sendall(wire.hello(self.config.token, "child", os.getpid(), self.index))
        while True:
            payload = wire.recv(sock)
            if payload is None:
                return 0  # the worker retired this child, or is stopping
            sock.sendall(self._run(payload))

    def _run(self, payload: bytes) -> bytes:
        started = time.perf_counter()
        try:
            job: wire.JobMessage = pickle.loads(payload)
        except Exception as exc:
            error = DecodeError(f"the task could not be loaded in its pool process: {exc!r}")
            return self._reply(execution.failure(error, 0.0), "?")
        task = self.app.tasks.get(job.task)
        if task is None:
            outcome = execution.failure(NotRegistered(job.task), 0.0)
            return self._reply(outcome, job.task)
        _Current.soft_deadline = job.soft_deadline
        try:
            outcome = execution.run_sync(task, job.context, job.args, job.kwargs)
        except SoftTimeLimitExceeded as exc:
            # Raised outside the body's own handling (in a signal receiver, say): still a failure
            # of this task, never of the child.
            outcome = execution.failure(exc, time.perf_counter() - started)
            outcome.traceback = traceback.format_exc()
        finally:
            _Current.soft_deadline = None
        return self._reply(outcome, job.task)

    def _reply(self, outcome: execution.Outcome, name: str) -> bytes:
        rss = _maxrss_kib()
        try:
            return wire.dumps(("done", wire.portable_outcome(outcome), rss))
        except Exception as exc:
            error = EncodeError(
                f"the outcome of {name} cannot be sent from its pool process "
                f"(it does not pickle): {exc!r}"
            )
            return wire.dumps(("done", execution.failure(error, outcome.runtime), rss))


def _maxrss_kib() -> int:
    """Peak resident memory of this process in KiB (what Celery's max-memory-per-child reads)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler that lets the signal reach the wakeup fd."""
