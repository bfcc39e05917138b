"""``-P prefork``: sync task bodies run in ``-c N`` child processes; the worker keeps the rest.

The worker process does all the messaging (broker, result store, acks, retries, links); a child
only runs bodies, one at a time, and sends back how each ended. ``async def`` tasks still run on
the worker's event loop.

**How the children get the app.** The worker runs an event loop and threads, so forking *it* is
unsafe (a lock held by another thread at the fork stays locked in the child forever), and a fork
would also copy its broker connections. A child started by *spawn* is safe but must import the app
itself, which takes as long as the app's imports (seconds for a large project) every time a child
is replaced. So the worker spawns one clean **launcher** process
(:mod:`celeriac.worker._prefork_child`), which imports the app once — by ``module:attribute``,
found among the modules the worker has imported, whether it came from ``-A`` or was defined in a
test module — plus its task modules and the worker's settings, and then *forks* every child from
that single-threaded, loaded state. Children start with everything in place, in milliseconds;
nothing of the worker's loop, threads or connections is ever inherited. The app must therefore be
a module-level variable of an importable module, and anything set up only at run time in the
worker (a signal receiver connected in a function, a task registered later) is not in the
children; the worker warns about tasks the children lack.

**Lifecycle of a child.** It is replaced at once when it dies (the task it ran ends FAILURE with
``WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)")`` and ``worker_lost=True``;
what to do with the message is the worker's decision), when it reaches ``--max-tasks-per-child``,
when its resident memory after a task is above ``--max-memory-per-child`` KiB, when its task passes
its hard time limit (killed: FAILURE ``TimeLimitExceeded``), and when the coroutine waiting for its
job is cancelled (killed: see the cancellation contract in :mod:`celeriac.worker.pools`). A killed
child gets SIGTERM, then SIGKILL after :data:`KILL_GRACE`; its replacement is started at once, so
the next task does not wait for the old child to go.

The channel to the pool processes is described in :mod:`celeriac.worker._prefork_wire`. Linux and
macOS; not Windows (no fork).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import pickle
import secrets
import shutil
import signal
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from celeriac.exceptions import EncodeError, ImproperlyConfigured
from celeriac.utils.memory_url import SCHEME as MEMORY_SCHEME
from celeriac.worker import _prefork_wire as wire
from celeriac.worker import execution
from celeriac.worker._prefork_child import LauncherConfig, launcher_main
from celeriac.worker.logs import logger
from celeriac.worker.pools import Pool, PoolOptions

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from celeriac.app.base import Celery
    from celeriac.worker.execution import Job, Outcome

#: Seconds a killed child gets between SIGTERM and SIGKILL.
KILL_GRACE = 0.5
#: Seconds the launcher and the first children get to start (the app's imports included).
START_TIMEOUT = 60.0
#: Seconds to wait for the launcher's report of how a dead child ended.
EXIT_REPORT_WAIT = 2.0
#: Seconds before a child that died while starting is forked again.
RESTART_BACKOFF = 1.0
#: Seconds children get to exit at a warm stop before they are killed.
STOP_TIMEOUT = 5.0


class _Child:
    """The worker's side of one pool process."""

    __slots__ = ("index", "job", "pid", "reply", "rss", "state", "tasks", "writer")

    def __init__(self, pid: int, index: int, writer: asyncio.StreamWriter) -> None:
        self.pid = pid
        self.index = index
        self.writer = writer
        #: idle, busy, killed (being killed), retiring (told to exit), dead (connection closed).
        self.state = "idle"
        self.tasks = 0
        #: Peak resident memory in KiB, as of its last task.
        self.rss = 0
        self.reply: asyncio.Future[Outcome] | None = None
        self.job: Job | None = None


class ProcessPool(Pool):
    """``prefork``: a launcher process and ``size`` children forked from it."""

    name = "prefork"
    in_worker_process = False

    def __init__(self, app: Celery, hostname: str, options: PoolOptions) -> None:
        super().__init__(options)
        if not hasattr(os, "fork"):
            raise ImproperlyConfigured("-P prefork needs fork(), which this platform lacks")
        self.app = app
        self.hostname = hostname
        self._token = secrets.token_hex(16)
        self._dir: str | None = None
        self._server: asyncio.Server | None = None
        self._process: BaseProcess | None = None
        self._launcher: asyncio.StreamWriter | None = None
        self._launcher_ready: asyncio.Future[list[str]] | None = None
        self._config: LauncherConfig | None = None
        #: Connected children by pid (until their connection closes).
        self._children: dict[int, _Child] = {}
        self._idle: collections.deque[_Child] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[_Child]] = collections.deque()
        #: Forks asked for and not connected yet: child number -> pid (None until "forked").
        self._starting: dict[int, int | None] = {}
        self._exit_codes: dict[int, int] = {}
        self._exit_waiters: dict[int, asyncio.Future[int]] = {}
        self._next_index = 1
        self._stopping = False
        self._connected = asyncio.Event()
        #: Set while :meth:`start` waits for the first children: why one of them died starting.
        self._start_failure: str | None = None
        self._starting_up = True
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- starting ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the launcher and every child; ImproperlyConfigured if the app cannot be loaded."""
        self._config = self._launcher_config()
        try:
            # mkdtemp makes the directory private (0700): only this user reaches the socket.
            self._dir = tempfile.mkdtemp(prefix="celeriac-pool-")
            path = os.path.join(self._dir, "pool.sock")
            self._server = await asyncio.start_unix_server(self._on_connection, path)
            self._config.socket_path = path
            names = await self._start_launcher()
            self._check_tasks(names)
            for _ in range(self.size):
                self._fork()
            await self._wait_for_children()
        except BaseException:
            await self.stop(cold=True)
            raise
        finally:
            self._starting_up = False
        conf = self.app.conf
        for url in sorted({conf.resolved_broker_url(), conf.resolved_result_backend()}):
            if url.lower().startswith(MEMORY_SCHEME):
                logger.warning(
                    "%s is private to each process: tasks run in prefork pool processes cannot "
                    "send tasks or read results through it.",
                    url,
                )

    def _launcher_config(self) -> LauncherConfig:
        settings: dict[str, Any] = {}
        for name, value in self.app.conf.table().items():
            try:
                pickle.dumps(value)
            except Exception as exc:
                logger.warning(
                    "Setting %s cannot be passed to the pool processes (%s); they keep the value "
                    "their own import of the app gives it.",
                    name,
                    exc,
                )
            else:
                settings[name] = value
        root = logging.getLogger()
        return LauncherConfig(
            socket_path="",
            token=self._token,
            app_ref=locate_app(self.app),
            modules=sorted({type(task).__module__ for task in self.app.tasks.values()}),
            settings=settings,
            hostname=self.hostname,
            log_level=root.level if root.handlers else None,
        )

    async def _start_launcher(self) -> list[str]:
        """Spawn the launcher; the task names it loaded."""
        assert self._config is not None
        loop = asyncio.get_running_loop()
        self._launcher_ready = ready = loop.create_future()
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=launcher_main,
            args=(self._config,),
            name="celeriac-pool-launcher",
            daemon=True,
        )
        process.start()
        self._process = process
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.done():
            await asyncio.wait({ready}, timeout=0.1)
            if ready.done():
                break
            if not process.is_alive():
                raise ImproperlyConfigured(
                    f"the prefork pool's launcher exited ({process.exitcode}) before it loaded "
                    f"the app {self._config.app_ref} (its error is in the output above)"
                )
            if time.monotonic() > deadline:
                raise ImproperlyConfigured(
                    f"the prefork pool's launcher did not load the app {self._config.app_ref} "
                    f"within {START_TIMEOUT:.0f}s"
                )
        names: list[str] = ready.result()
        return names

    def _check_tasks(self, names: list[str]) -> None:
        loaded = set(names)
        missing = sorted(
            name
            for name, task in self.app.tasks.items()
            if not task.is_async and name not in loaded
        )
        if missing:
            logger.warning(
                "The prefork pool processes do not have these tasks, which will fail with "
                "NotRegistered there: %s. Register tasks at module level in a module the worker "
                "imports (the app's, or one listed in imports/include).",
                ", ".join(missing),
            )

    async def _wait_for_children(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while len(self._children) < self.size:
            self._connected.clear()
            if self._start_failure is not None:
                raise ImproperlyConfigured(
                    f"a prefork pool process exited while starting ({self._start_failure}): "
                    "worker_process_init or the app's import in a child failed (see the output "
                    "above)"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImproperlyConfigured(
                    f"only {len(self._children)} of {self.size} prefork pool processes started "
                    f"within {START_TIMEOUT:.0f}s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), remaining)

    # -- connections -----------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                hello = await asyncio.wait_for(wire.read_hello(reader, self._token), 10.0)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                hello = None
            if hello is None:
                writer.close()
                return
            if hello["role"] == "launcher":
                await self._serve_launcher(reader, writer)
            else:
                await self._serve_child(hello["pid"], hello["index"], reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve_launcher(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._launcher = writer
        ready = self._launcher_ready
        try:
            while True:
                message = pickle.loads(await wire.read(reader))
                kind = message[0]
                if kind == "ready" and ready is not None and not ready.done():
                    ready.set_result(message[1])
                    for index, pid in self._starting.items():
                        if pid is None:  # asked for while the launcher was being replaced
                            writer.write(wire.dumps(("fork", index)))
                elif kind == "error" and ready is not None and not ready.done():
                    ready.set_exception(
                        ImproperlyConfigured(
                            f"the prefork pool processes cannot load the app "
                            f"{self._config.app_ref if self._config else ''}:\n{message[1]}"
                        )
                    )
                elif kind == "forked":
                    if message[1] in self._starting:
                        self._starting[message[1]] = message[2]
                elif kind == "exited":
                    self._on_exit_report(message[1], message[2])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if self._launcher is writer:
                self._launcher = None
            if ready is not None and not ready.done():
                ready.set_exception(
                    ImproperlyConfigured("the prefork pool's launcher exited while loading the app")
                )
            elif not self._stopping:
                self._replace_launcher()

    def _replace_launcher(self) -> None:
        logger.error(
            "The prefork pool's launcher process exited; starting a new one (running children "
            "go on, but how they end can no longer be reported)."
        )
        # Forks that were asked for and had not connected will not: ask the new launcher.
        for index in list(self._starting):
            self._starting[index] = None
        self._spawn(self._restart_launcher())

    async def _restart_launcher(self) -> None:
        try:
            await self._start_launcher()
        except ImproperlyConfigured as exc:
            logger.error("Could not restart the prefork pool's launcher: %s", exc)

    async def _serve_child(
        self, pid: int, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._starting.pop(index, False) is False or self._stopping:
            writer.close()  # not a child this pool is waiting for
            return
        child = _Child(pid, index, writer)
        self._children[pid] = child
        self._connected.set()
        self._release(child)
        try:
            while True:
                self._on_reply(child, await wire.read(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            await self._child_gone(child)

    # -- running ---------------------------------------------------------------------------------

    async def run(self, job: Job) -> Outcome:
        """Run ``job`` in an idle child, within its time limits."""
        loop = asyncio.get_running_loop()
        child = await self._acquire()
        limits = job.limits
        started = time.perf_counter()
        soft_deadline = time.monotonic() + limits.soft if limits.soft is not None else None
        message = wire.JobMessage(job.task.name, job.context, job.args, job.kwargs, soft_deadline)
        try:
            frame = wire.dumps(message)
        except Exception as exc:
            self._release(child)
            error = EncodeError(
                f"the arguments of {job.label} cannot be passed to a pool process "
                f"(they do not pickle): {exc!r}"
            )
            return execution.failure(error, 0.0)
        reply: asyncio.Future[Outcome] = loop.create_future()
        child.reply, child.job = reply, job
        timers: list[asyncio.TimerHandle] = []
        try:
            child.writer.write(frame)
            if limits.soft is not None:
                timers.append(loop.call_later(limits.soft, self._soft_limit_reached, child, job))
            if limits.hard is not None:
                timers.append(
                    loop.call_later(limits.hard, self._hard_limit_reached, child, job, started)
                )
            with contextlib.suppress(ConnectionError):
                await child.writer.drain()  # a dead child is noticed by its reader
            outcome = await reply
        except asyncio.CancelledError:
            # (Awaiting ``reply`` and being cancelled cancels ``reply`` too.)
            if reply.done() and not reply.cancelled():
                self._job_done(child)  # it ended just as the caller was cancelled
            else:
                self._kill(child, f"its task {job.label} was cancelled")
            raise
        finally:
            for timer in timers:
                timer.cancel()
            child.reply = child.job = None
        self._job_done(child)
        return outcome

    def _job_done(self, child: _Child) -> None:
        """``child`` answered: free it for the next job, or replace it if it is due."""
        if child.state == "busy":
            child.tasks += 1
            if not self._retire_if_due(child):
                self._release(child)

    def _on_reply(self, child: _Child, payload: bytes) -> None:
        reply = child.reply
        if reply is None or reply.done():
            return  # a reply that lost the race with the hard limit
        try:
            _, outcome, rss = pickle.loads(payload)
        except Exception as exc:
            label = child.job.label if child.job else "a task"
            error = EncodeError(f"the outcome of {label} could not be read: {exc!r}")
            outcome, rss = execution.failure(error, 0.0), child.rss
        child.rss = rss
        reply.set_result(outcome)

    def _soft_limit_reached(self, child: _Child, job: Job) -> None:
        if child.state == "busy" and child.job is job:
            logger.warning("Soft time limit (%ss) exceeded for %s", job.limits.soft, job.label)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGUSR1)

    def _hard_limit_reached(self, child: _Child, job: Job, started: float) -> None:
        reply = child.reply
        if child.job is not job or reply is None or reply.done():
            return
        logger.error("Hard time limit (%ss) exceeded for %s", job.limits.hard, job.label)
        assert job.limits.hard is not None
        reply.set_result(
            execution.time_limit_exceeded(job.limits.hard, time.perf_counter() - started)
        )
        self._kill(child, f"{job.label} passed its hard time limit")

    # -- idle children ---------------------------------------------------------------------------

    async def _acquire(self) -> _Child:
        while self._idle:
            child = self._idle.popleft()
            if child.state == "idle":
                child.state = "busy"
                return child
        waiter: asyncio.Future[_Child] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed over just as the caller was cancelled
            raise

    def _release(self, child: _Child) -> None:
        """``child`` is free: give it to the first caller waiting, else keep it idle."""
        if child.state not in ("idle", "busy"):
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                child.state = "busy"
                waiter.set_result(child)
                return
        child.state = "idle"
        self._idle.append(child)

    # -- replacing children ----------------------------------------------------------------------

    def _fork(self, delay: float = 0.0) -> None:
        """Ask the launcher for a new child (after ``delay`` seconds)."""
        if self._stopping:
            return
        if delay:
            asyncio.get_running_loop().call_later(delay, self._fork)
            return
        index = self._next_index
        self._next_index += 1
        self._starting[index] = None
        ready = self._launcher_ready
        if self._launcher is not None and ready is not None and ready.done():
            self._launcher.write(wire.dumps(("fork", index)))
        # Otherwise the launcher is being (re)started: it is asked when it is ready.

    def _retire_if_due(self, child: _Child) -> bool:
        options = self.options
        if options.max_tasks_per_child is not None and child.tasks >= options.max_tasks_per_child:
            logger.info(
                "Pool process %d ran %d tasks (max tasks per child): replacing it",
                child.pid,
                child.tasks,
            )
        elif options.max_memory_per_child is not None and child.rss > options.max_memory_per_child:
            logger.warning(
                "Pool process %d uses %d KiB, more than the max memory per child (%d KiB): "
                "replacing it",
                child.pid,
                child.rss,
                options.max_memory_per_child,
            )
        else:
            return False
        self._take_out(child, "retiring")
        child.writer.close()  # it exits when it reads the end of its connection
        self._fork()
        return True

    def _kill(self, child: _Child, why: str) -> None:
        """SIGTERM ``child`` now, SIGKILL after :data:`KILL_GRACE`; a replacement starts at once."""
        if child.state in ("killed", "dead"):
            return
        logger.info("Killing pool process %d: %s", child.pid, why)
        self._take_out(child, "killed")
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)
        asyncio.get_running_loop().call_later(KILL_GRACE, self._kill_hard, child)
        self._fork()

    def _kill_hard(self, child: _Child) -> None:
        if child.state != "dead":  # its connection is still open: the process still runs
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)

    def _take_out(self, child: _Child, state: str) -> None:
        child.state = state
        with contextlib.suppress(ValueError):
            self._idle.remove(child)

    async def _child_gone(self, child: _Child) -> None:
        """The connection of ``child`` closed: the process has exited (or is about to)."""
        previous = child.state
        child.state = "dead"
        self._children.pop(child.pid, None)
        with contextlib.suppress(ValueError):
            self._idle.remove(child)
        reply = child.reply
        running = reply is not None and not reply.done()
        if previous in ("killed", "retiring") or (self._stopping and not running):
            self._exit_codes.pop(child.pid, None)
            return
        self._fork()  # replaced at once; how the old one ended is only needed for the report
        started = time.perf_counter()
        description = describe_exit(await self._exit_code(child.pid))
        if reply is not None and not reply.done():
            label = child.job.label if child.job else "a task"
            logger.error(
                "Pool process %d exited prematurely while running %s: %s",
                child.pid,
                label,
                description,
            )
            reply.set_result(execution.worker_lost(description, time.perf_counter() - started))
        else:
            logger.error("Pool process %d exited unexpectedly: %s", child.pid, description)

    def _on_exit_report(self, pid: int, code: int) -> None:
        waiter = self._exit_waiters.pop(pid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(code)
        elif pid in self._children:
            self._exit_codes[pid] = code  # its connection's end is still on its way
        for index, starting_pid in list(self._starting.items()):
            if starting_pid == pid:
                # Died before it connected (worker_process_init failed hard, say).
                del self._starting[index]
                if self._starting_up:
                    self._start_failure = describe_exit(code)
                    self._connected.set()  # wake start(), which fails with it
                    return
                logger.error(
                    "Pool process %d exited while starting: %s; starting another in %.0fs",
                    pid,
                    describe_exit(code),
                    RESTART_BACKOFF,
                )
                self._fork(RESTART_BACKOFF)

    async def _exit_code(self, pid: int) -> int | None:
        if pid in self._exit_codes:
            return self._exit_codes.pop(pid)
        waiter = self._exit_waiters.setdefault(pid, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), EXIT_REPORT_WAIT)
        except TimeoutError:
            return None
        finally:
            self._exit_waiters.pop(pid, None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- stopping --------------------------------------------------------------------------------

    async def stop(self, cold: bool) -> None:
        """Let idle children exit (kill busy ones), then the launcher; remove the socket."""
        self._stopping = True
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        children = list(self._children.values())
        for child in children:
            if child.state == "busy" or cold:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL if cold else signal.SIGTERM)
            else:
                self._take_out(child, "retiring")
                child.writer.close()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._children and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for child in list(self._children.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        if self._launcher is not None:
            self._launcher.close()  # the launcher exits, killing any child left
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.join, STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, STOP_TIMEOUT)
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def describe_exit(code: int | None) -> str:
    """``signal 9 (SIGKILL)`` or ``exitcode 3``, as Celery describes how a child ended."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exitcode {code}"


def locate_app(app: Celery) -> str:
    """``module:attribute`` under which an imported module holds ``app``.

    The pool processes import the app this way. The module named like the app (``app.main``) is
    preferred, then any other, then ``__main__`` (which the launcher re-imports from its file, as
    ``multiprocessing`` does for spawned processes).
    """
    found: list[tuple[str, str]] = []
    for name, module in list(sys.modules.items()):
        if module is None or name == "__mp_main__" or name.split(".")[0] == "celeriac":
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            if value is app and not attribute.startswith("_"):
                found.append((name, attribute))
    usable = [
        (name, attribute)
        for name, attribute in found
        if name != "__main__" or getattr(sys.modules["__main__"], "__file__", None)
    ]
    if not usable:
        raise ImproperlyConfigured(
            f"-P prefork: the pool processes import the app, but {app!r} is not a module-level "
            "variable of any importable module. Define it at module level (app = Celery(...)) in "
            "a module of its own and start the worker with -A <module>."
        )
    usable.sort(key=lambda item: (item[0] == "__main__", item[0] != app.main, len(item[0])))
    name, attribute = usable[0]
    return f"{name}:{attribute}"
