"""Where sync task bodies run. ``async def`` tasks always run on the worker's event loop.

* ``threads`` (default): ``concurrency`` threads, started as needed, in the worker process.
* ``solo``: one thread, one task at a time (the event loop itself stays free, so leases are still
  renewed while a long task runs).
* ``prefork`` (alias ``processes``): ``concurrency`` child processes
  (:mod:`celeriac.worker.prefork`). The worker process keeps all messaging (broker, result store,
  acks); a child only runs bodies. Use it for CPU-bound tasks (no GIL shared with the worker), for
  hard time limits that really stop a body, and to contain crashes: a child that dies is replaced
  and only its own task is affected.

Every pool enforces the time limits of :mod:`celeriac.worker.timelimits` for the bodies it runs;
its ``limits`` are the worker-wide defaults (``--time-limit``, ``--soft-time-limit``).

**Cancellation contract.** Cancelling the coroutine that awaits :meth:`Pool.run` must stop the
job it runs, not merely stop waiting for it; cold shutdown relies on this, and so does revoking
with ``terminate=True``.

* ``prefork``: the child running the job gets SIGTERM, then SIGKILL if it is still alive after a
  short grace (:data:`celeriac.worker.prefork.KILL_GRACE`); a new child replaces it at once.
* ``threads`` / ``solo``: a thread cannot be killed. ``asyncio.CancelledError`` is raised in the
  body's thread as an asynchronous exception (it is a ``BaseException``, so a body's
  ``except Exception`` does not swallow it); this stops Python code at once and a C call (a
  sleep, a socket read) when it returns. Whatever the body does after that is discarded.
* ``async def`` tasks run on the loop and are cancelled like any coroutine.

In every case the cancelled ``run`` raises ``CancelledError`` and produces no outcome.

**Queued jobs.** The threads pool (and solo) *queues* jobs (:attr:`Pool.queues_jobs`): the worker
may hand it more jobs than it has threads, and a thread that ends a job takes the next one at once,
without a round trip through the event loop; the outcomes of jobs that end together reach the loop
in one wake-up. Sync no-op tasks drain about twice as fast this way as when each job waits for a
slot on the loop first. What must happen at the real start of a body and not before is carried by
the job (:class:`celeriac.worker.execution.Job`): ``wanted`` is checked on the thread (a revoke that
came while the job was queued), ``before_start`` runs on the loop while the thread waits (the early
ack of a task that is not ``acks_late``, its STARTED state), and time limits count from the start.
:meth:`Pool.withdraw_queued` gives back the jobs no thread has taken yet (warm shutdown): their
``run`` raises :class:`JobWithdrawn`, and so does that of a job found no longer ``wanted``.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.exceptions import ImproperlyConfigured, SoftTimeLimitExceeded, TimeLimitExceeded
from celeriac.worker import execution
from celeriac.worker.logs import logger
from celeriac.worker.timelimits import (
    NO_LIMITS,
    ThreadInterrupter,
    TimeLimits,
    check_limit,
    check_pair,
)

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.worker.execution import Job, Outcome

POOLS = ("prefork", "threads", "solo")
#: Other names Celery accepts for a pool celeriac has.
ALIASES = {"processes": "prefork"}
_NOT_AVAILABLE = {"eventlet", "gevent"}


def check_pool(name: str) -> str:
    """The canonical pool name, or a clear error."""
    name = ALIASES.get(name, name)
    if name in POOLS:
        return name
    if name in _NOT_AVAILABLE:
        raise ImproperlyConfigured(
            f"pool {name!r} is not available in celeriac: async def tasks run on the worker's "
            "event loop instead. Choose one of prefork, threads (default) or solo."
        )
    raise ImproperlyConfigured(
        f"unknown pool {name!r}; choose one of {', '.join(POOLS)} (or processes, for prefork)"
    )


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """What a pool is built with (the worker's options, resolved against the settings)."""

    size: int
    #: Worker-wide default limits (``--time-limit``, ``--soft-time-limit``, the settings).
    limits: TimeLimits = NO_LIMITS
    #: prefork: a child is replaced after this many tasks.
    max_tasks_per_child: int | None = None
    #: prefork: a child is replaced after a task that left its resident memory above this, in KiB.
    max_memory_per_child: int | None = None


class JobWithdrawn(Exception):
    """A queued job was given back unstarted: withdrawn, or found no longer wanted."""


class Pool(abc.ABC):
    """Runs sync task bodies; see the module docstring for the cancellation contract."""

    #: Whether the pool takes more jobs than it runs at once, queued in order until it has room
    #: (see "Queued jobs" in the module docstring); if not, the worker's slots keep its jobs to
    #: its size, and a job's ``wanted`` and ``before_start`` are the caller's to handle.
    queues_jobs: bool = False

    #: The canonical pool name (``prefork``, ``threads``, ``solo``).
    name: str
    #: Whether bodies run in the worker process itself (then the worker sends
    #: ``worker_process_init``; a process pool sends it in each child).
    in_worker_process: bool

    def __init__(self, options: PoolOptions) -> None:
        self.options = options
        self.size = options.size
        self.limits = options.limits

    async def start(self) -> None:  # noqa: B027 - most pools have nothing to start
        """Make the pool ready to run jobs (raises ImproperlyConfigured when it cannot be)."""

    @abc.abstractmethod
    async def run(self, job: Job) -> Outcome:
        """Run one body within ``job.limits``; how it ended."""

    def withdraw_queued(self) -> int:
        """Give back every queued job no thread has taken yet (their ``run`` raises
        :class:`JobWithdrawn`); how many there were."""
        return 0

    @abc.abstractmethod
    async def stop(self, cold: bool) -> None:
        """Release the pool. Called once no job runs any more (cold: cancelled ones may)."""


def pool_options(
    app: Celery,
    name: str,
    size: int,
    *,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
) -> PoolOptions:
    """The options of pool ``name``: the worker's arguments, else the settings.

    ``--time-limit`` / ``--soft-time-limit`` win over ``task_time_limit`` /
    ``task_soft_time_limit``; ``--max-tasks-per-child`` / ``--max-memory-per-child`` over
    ``worker_max_tasks_per_child`` / ``worker_max_memory_per_child``. Those two only mean something
    to ``prefork``: given to another pool they are an error, and from the settings a warning.
    """
    conf = app.conf
    hard = check_limit(time_limit, "time_limit")
    soft = check_limit(soft_time_limit, "soft_time_limit")
    check_pair(hard, soft, "worker time limits")
    limits = TimeLimits(
        hard if hard is not None else conf.task_time_limit,
        soft if soft is not None else conf.task_soft_time_limit,
    )
    per_child: dict[str, int | None] = {}
    for option, given in (
        ("max_tasks_per_child", max_tasks_per_child),
        ("max_memory_per_child", max_memory_per_child),
    ):
        if given is not None:
            if isinstance(given, bool) or not isinstance(given, int) or given < 1:
                raise ImproperlyConfigured(f"{option} must be an integer >= 1, not {given!r}")
            if name != "prefork":
                raise ImproperlyConfigured(
                    f"{option} applies to the prefork pool's child processes; this worker uses "
                    f"the {name} pool (add -P prefork)"
                )
            per_child[option] = given
            continue
        setting = conf[f"worker_{option}"]
        if setting is not None and name != "prefork":
            logger.warning(
                "worker_%s is set but means nothing to the %s pool (only to prefork)", option, name
            )
        per_child[option] = setting
    return PoolOptions(
        size,
        limits,
        max_tasks_per_child=per_child["max_tasks_per_child"],
        max_memory_per_child=per_child["max_memory_per_child"],
    )


def queues_jobs(name: str) -> bool:
    """Whether the pool called ``name`` queues jobs (:attr:`Pool.queues_jobs`), known before it
    is built (the worker sizes its slots first)."""
    return name != "prefork"


def create_pool(name: str, app: Celery, hostname: str, options: PoolOptions) -> Pool:
    """The pool called ``name`` (canonical, see :func:`check_pool`)."""
    if name == "prefork":
        from celeriac.worker.prefork import ProcessPool

        return ProcessPool(app, hostname, options)
    return ThreadPool(options, name)


# -- threads --------------------------------------------------------------------------------------


class _Work:
    """One job handed to the pool threads, and how it reports back to the loop."""

    __slots__ = (
        "abandoned",
        "context",
        "ended",
        "future",
        "interrupter",
        "job",
        "loop",
        "started",
        "state",
    )

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.loop = loop
        #: The caller's context variables, carried into the thread.
        self.context = contextvars.copy_context()
        self.future: asyncio.Future[Outcome] = loop.create_future()
        #: Set when a thread takes the job, for a job with time limits (they count from there,
        #: not from queueing); None otherwise, which spares every other job a wake-up of the loop.
        self.started: asyncio.Future[None] | None = loop.create_future() if job.limits.any else None
        self.interrupter = ThreadInterrupter()
        #: Why nobody waits for the outcome any more ("", "hard", "cancelled").
        self.abandoned = ""
        #: QUEUED until a thread takes it (TAKEN) or it is withdrawn first (WITHDRAWN); changed
        #: under the pool's lock, so a job is either run or given back, never both.
        self.state = QUEUED
        #: Set on the loop once the thread's report of the job's end is taken.
        self.ended = False


QUEUED, TAKEN, WITHDRAWN = "queued", "taken", "withdrawn"

#: How often a thread waiting for a job's ``before_start`` looks whether the job was abandoned.
_BEFORE_START_POLL = 0.05


class ThreadPool(Pool):
    """Runs sync bodies on ``size`` daemon threads, with time limits as asynchronous exceptions.

    The threads are daemons so that a body that never returns (past its hard limit, or cancelled
    while blocked in C) cannot keep the process from exiting; a thread still busy with such a body
    takes no new job until it returns, so the pool runs one job fewer meanwhile.
    """

    in_worker_process = True
    queues_jobs = True

    def __init__(self, options: PoolOptions, name: str = "threads") -> None:
        super().__init__(options)
        self.name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        #: Jobs whose outcome nobody waits for and whose thread still runs them.
        self._abandoned: set[_Work] = set()
        #: Jobs queued and not taken by a thread yet (what :meth:`withdraw_queued` gives back).
        self._queued: set[_Work] = set()
        #: Ended jobs whose outcome the loop has not handed over yet, filled by the threads.
        self._ended: collections.deque[_Ended] = collections.deque()
        #: Whether a call of :meth:`_hand_over_ended` is already scheduled on the loop.
        self._hand_over_scheduled = False

    async def run(self, job: Job) -> Outcome:
        """Run ``job`` on a pool thread within a copy of the current context."""
        work = _Work(job, asyncio.get_running_loop())
        self._queued.add(work)
        self._queue.put(work)
        self._add_thread_if_needed()
        limits = job.limits
        if not limits.any:
            try:
                # Not shielded (a future and two callbacks less per job): cancelling this
                # cancels work.future too, which nothing else awaits; the thread's report of
                # the job's end then finds it done and only does the bookkeeping.
                return await work.future
            except asyncio.CancelledError:
                self._abandon(work, "cancelled")
                raise
        return await self._run_limited(work, limits)

    async def _run_limited(self, work: _Work, limits: TimeLimits) -> Outcome:
        loop = work.loop
        soft_timer = None
        assert work.started is not None
        try:
            await asyncio.shield(work.started)
            began = time.perf_counter()
            if limits.soft is not None:
                soft_timer = loop.call_later(limits.soft, self._soft_limit_reached, work)
            done, _ = await asyncio.wait({work.future}, timeout=limits.hard)
        except asyncio.CancelledError:
            self._abandon(work, "cancelled")
            raise
        finally:
            if soft_timer is not None:
                soft_timer.cancel()
        if done:
            return work.future.result()
        assert limits.hard is not None
        self._abandon(work, "hard")
        logger.error(
            "Hard time limit (%ss) exceeded for %s. A thread cannot be killed: TimeLimitExceeded "
            "was raised in it, which stops Python code but not a blocking call; until the body "
            "returns it keeps its pool thread (use -P prefork to have such tasks killed).",
            limits.hard,
            work.job.label,
        )
        return execution.time_limit_exceeded(limits.hard, time.perf_counter() - began)

    def _soft_limit_reached(self, work: _Work) -> None:
        if work.interrupter.interrupt(SoftTimeLimitExceeded):
            logger.warning(
                "Soft time limit (%ss) exceeded for %s", work.job.limits.soft, work.job.label
            )

    def _abandon(self, work: _Work, why: str) -> None:
        """Stop waiting for ``work``; raise in its thread what should stop the body."""
        work.abandoned = why
        if work.ended:
            return
        self._abandoned.add(work)
        if why == "hard":
            work.interrupter.interrupt(TimeLimitExceeded)
        else:
            work.interrupter.interrupt(asyncio.CancelledError)

    def _add_thread_if_needed(self) -> None:
        """Reserve an idle thread for the job just queued, or start one (ThreadPoolExecutor's way)."""
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                return
            if len(self._threads) >= self.size:
                return  # every thread is busy: the job waits for the first one to finish
            thread = threading.Thread(
                target=self._serve,
                name=f"celeriac-task-{len(self._threads) + 1}",
                daemon=True,
            )
            self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        """A pool thread: take jobs until told to stop (None)."""
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                self._run_one(work)
            finally:
                with self._lock:
                    self._idle += 1

    def withdraw_queued(self) -> int:
        """Give back the jobs no thread has taken yet: their ``run`` raises JobWithdrawn."""
        with self._lock:
            withdrawn = [work for work in self._queued if work.state == QUEUED]
            for work in withdrawn:
                work.state = WITHDRAWN
            self._queued.clear()
        for work in withdrawn:
            if not work.future.done():
                work.future.set_exception(JobWithdrawn("withdrawn before it started"))
                _consume(work.future)  # its handler may have gone already (cancelled)
        return len(withdrawn)

    def _take(self, work: _Work) -> bool:
        """On a pool thread: claim ``work`` to run it, unless it was withdrawn first."""
        with self._lock:
            self._queued.discard(work)
            if work.state != QUEUED:
                return False
            work.state = TAKEN
            return True

    def _run_one(self, work: _Work) -> None:
        job = work.job
        if not self._take(work):
            return  # withdrawn: its caller has been told
        if work.abandoned:  # cancelled before a thread took it
            self._report(work, None, None)
            return
        if job.wanted is not None and not job.wanted():
            self._report(work, None, JobWithdrawn("no longer wanted"))
            return
        outcome: Outcome | None = None
        error: BaseException | None = None
        try:
            if job.before_start is not None:
                _wait_before_start(work, job.before_start)
            if work.started is not None:
                work.loop.call_soon_threadsafe(_set_started, work)
            work.interrupter.enter()
            try:
                if work.abandoned:  # cancelled just before enter(), when nothing could be raised
                    raise asyncio.CancelledError
                outcome = work.context.run(
                    execution.run_sync, job.task, job.context, job.args, job.kwargs
                )
            finally:
                work.interrupter.leave()
        except BaseException as exc:  # CancelledError raised in it, or an internal error
            error = exc
        self._report(work, outcome, error)

    def _report(self, work: _Work, outcome: Outcome | None, error: BaseException | None) -> None:
        """On a pool thread: queue the end of ``work`` for the loop, waking the loop once for
        every outcome that ends before it looks (one wake-up per batch under load)."""
        self._ended.append((work, outcome, error))
        if self._hand_over_scheduled:
            return
        self._hand_over_scheduled = True
        # A closed loop (RuntimeError): the worker is gone and nobody waits for this job.
        with contextlib.suppress(RuntimeError):
            work.loop.call_soon_threadsafe(self._hand_over_ended)

    def _hand_over_ended(self) -> None:
        """On the loop: hand over every ended job's outcome. The flag is cleared first, so an
        outcome queued while this runs is either handed over here or schedules a new call."""
        self._hand_over_scheduled = False
        ended = self._ended
        while ended:
            self._finished(*ended.popleft())

    def _finished(self, work: _Work, outcome: Outcome | None, error: BaseException | None) -> None:
        """On the loop: hand the outcome to the waiting caller, or log the end of an abandoned job."""
        work.ended = True
        self._abandoned.discard(work)
        if work.abandoned == "hard":
            logger.warning(
                "Task %s returned after its hard time limit; its pool thread is free again "
                "(what it returned is discarded).",
                work.job.label,
            )
        if work.future.done():
            return
        if work.started is not None and not work.started.done():
            work.started.cancel()  # it ended before it started (not wanted, or an error)
        if outcome is not None:
            work.future.set_result(outcome)
        elif error is None or isinstance(error, asyncio.CancelledError):
            work.future.cancel()
        else:
            work.future.set_exception(error)
        if work.abandoned:
            _consume(work.future)

    async def stop(self, cold: bool) -> None:
        """Tell the threads to end. None is waited for: no job is running (or one is abandoned)."""
        if self._abandoned:
            logger.warning(
                "%d task thread(s) are still running bodies nobody waits for (past their hard "
                "time limit, or cancelled); they end with the process.",
                len(self._abandoned),
            )
        for _ in self._threads:
            self._queue.put(None)


#: A job's end as a pool thread reports it: the job, its outcome, or the error that stopped it.
_Ended = tuple[_Work, "Outcome | None", "BaseException | None"]


def _set_started(work: _Work) -> None:
    if work.started is not None and not work.started.done():
        work.started.set_result(None)


def _wait_before_start(work: _Work, before_start: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """On a pool thread: run ``before_start`` on the loop and wait for it, giving up when the
    job is abandoned meanwhile (the loop may be stopping: nothing would ever answer)."""
    done = asyncio.run_coroutine_threadsafe(before_start(), work.loop)
    while True:
        try:
            done.result(_BEFORE_START_POLL)
            return
        except concurrent.futures.TimeoutError:
            if work.abandoned:
                done.cancel()
                raise asyncio.CancelledError from None


def _consume(future: asyncio.Future[Outcome]) -> None:
    if future.done() and not future.cancelled():
        future.exception()
