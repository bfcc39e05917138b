"""Time limits: which apply to a run, and how they reach a body on the event loop or a thread.

**Which limits apply** (:func:`resolve`), per limit (hard and soft each on its own), as Celery's
worker combines them: the message's ``timelimit`` header ``[hard, soft]`` (written by the caller
from ``apply_async(time_limit=, soft_time_limit=)``, else from the task's own limits), else the
task's ``time_limit`` / ``soft_time_limit``, else the worker's ``--time-limit`` /
``--soft-time-limit``, else the settings ``task_time_limit`` / ``task_soft_time_limit``. As in
Celery, a header value of 0 or null means "not given". One difference: Celery lets the settings win
over its worker's command-line options for tasks; here the command line wins, as everywhere else.
A soft limit that is not below the hard one never fires (the hard one comes first) and is dropped.

**How they are enforced** depends on where the body runs:

* ``prefork`` (:mod:`celeriac.worker.prefork`): soft is a ``SIGUSR1`` that raises
  :class:`~celeriac.exceptions.SoftTimeLimitExceeded` in the pool process; hard kills the process.
* ``threads`` / ``solo``: soft is :class:`~celeriac.exceptions.SoftTimeLimitExceeded` raised in the
  task's thread as an asynchronous exception (:class:`ThreadInterrupter`). That reaches Python code
  only: a thread blocked in a C call (``time.sleep``, a socket read) sees it when the call returns.
  At the hard limit the caller gets :class:`~celeriac.exceptions.TimeLimitExceeded` at once and
  ``TimeLimitExceeded`` is raised in the thread the same way; a thread cannot be killed, so one that
  does not stop keeps its pool thread until it returns, and the worker says so loudly.
* ``async def`` tasks: the task is cancelled. At the soft limit the body sees
  ``SoftTimeLimitExceeded`` where it is suspended (:func:`soft_limited`), so it can catch it and
  return; at the hard limit it is cancelled outright and the outcome is ``TimeLimitExceeded``.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import types
from collections.abc import Awaitable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.utils.time_limits import check_limit, check_pair

if TYPE_CHECKING:
    from celeriac.app.task import Task

__all__ = [
    "HARD_LIMIT_MESSAGE",
    "NO_LIMITS",
    "SOFT_LIMIT_MESSAGE",
    "ThreadInterrupter",
    "TimeLimits",
    "check_limit",
    "check_pair",
    "resolve",
    "soft_limited",
]

#: The cancel message of an ``async def`` task at its soft limit (converted for the body).
SOFT_LIMIT_MESSAGE = "celeriac: soft time limit exceeded"
#: The cancel message of an ``async def`` task at its hard limit.
HARD_LIMIT_MESSAGE = "celeriac: hard time limit exceeded"


@dataclass(frozen=True, slots=True)
class TimeLimits:
    """Seconds after which a run is stopped (``hard``) or warned (``soft``); None: no limit."""

    hard: float | None = None
    soft: float | None = None

    @property
    def any(self) -> bool:
        """Whether either limit is set."""
        return self.hard is not None or self.soft is not None


NO_LIMITS = TimeLimits()


def resolve(
    header: tuple[float | None, float | None], task: Task[Any, Any], worker: TimeLimits
) -> TimeLimits:
    """The limits of one run: header, else task, else the worker's (see the module docstring)."""
    hard = header[0] or task.time_limit or worker.hard
    soft = header[1] or task.soft_time_limit or worker.soft
    if hard is not None and soft is not None and soft >= hard:
        soft = None
    if hard is None and soft is None:
        return NO_LIMITS
    return TimeLimits(float(hard) if hard else None, float(soft) if soft else None)


# -- async def tasks ------------------------------------------------------------------------------


def soft_limited(coro: Coroutine[Any, Any, Any]) -> Awaitable[Any]:
    """``coro``, with the soft-limit cancellation of its task turned into SoftTimeLimitExceeded.

    The worker cancels the task at the soft limit with :data:`SOFT_LIMIT_MESSAGE`. Cancelling
    (rather than throwing into the coroutine from outside) is what stops the future the task awaits,
    so a sleep, a read or a ``gather`` ends at once. This proxy then throws
    :class:`SoftTimeLimitExceeded` into the body in place of the ``CancelledError``, so a body can
    catch it and return a value as in Celery, and the task's cancellation is withdrawn.

    Where the body is suspended inside asyncio's own cancellation-aware code (a lock, a
    ``TaskGroup`` waiting for its tasks, ``wait_for``), that code relies on seeing a
    ``CancelledError`` to clean up (cancel the group's tasks, hand the lock on). There the
    cancellation goes through unchanged, and the body's escaping ``CancelledError`` is turned
    into ``SoftTimeLimitExceeded`` on its way out: the outcome is the same, only a body that
    wanted to catch it there cannot.
    """
    return _SoftLimited(coro)


class _SoftLimited:
    __slots__ = ("_converting", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        #: The soft-limit CancelledError went into the body unchanged; convert it when it leaves.
        self._converting = False

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        to_send: Any = None
        to_throw: BaseException | None = None
        while True:
            try:
                yielded = coro.throw(to_throw) if to_throw is not None else coro.send(to_send)
            except StopIteration as stop:
                if self._converting:
                    _uncancel()  # the body swallowed the cancellation: it is no longer wanted
                return stop.value
            except asyncio.CancelledError as exc:
                if self._converting and _is_soft(exc):
                    _uncancel()
                    raise SoftTimeLimitExceeded() from None
                raise
            to_send = to_throw = None
            try:
                to_send = yield yielded
            except asyncio.CancelledError as exc:
                if _is_soft(exc) and not self._converting:
                    if _safe_to_throw(coro):
                        _uncancel()
                        to_throw = SoftTimeLimitExceeded()
                    else:
                        self._converting = True
                        to_throw = exc
                else:
                    to_throw = exc
            except BaseException as exc:
                to_throw = exc


def _is_soft(exc: asyncio.CancelledError) -> bool:
    return exc.args == (SOFT_LIMIT_MESSAGE,)


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()


#: asyncio functions that only need the awaited future to end, whatever the exception.
_ASYNCIO_SAFE = frozenset({"sleep"})


def _safe_to_throw(coro: Coroutine[Any, Any, Any]) -> bool:
    """Whether no frame of asyncio's own (but ``sleep``) is on the body's await chain."""
    awaited: Any = coro
    depth = 0
    while awaited is not None and depth < 256:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if isinstance(frame, types.FrameType):
            module = frame.f_globals.get("__name__", "")
            if (module == "asyncio" or module.startswith("asyncio.")) and (
                frame.f_code.co_name not in _ASYNCIO_SAFE
            ):
                return False
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        depth += 1
    return True


# -- threads --------------------------------------------------------------------------------------


def _set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise ``exc_type`` in the thread at its next bytecode boundary (None: withdraw it)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type is not None else None
    )


class ThreadInterrupter:
    """Raises exceptions in the thread running one body, only while that body runs.

    The thread calls :meth:`enter` before the body and :meth:`leave` after it; :meth:`interrupt`
    (from any thread) does nothing outside that span. An exception requested just as the body
    ended is withdrawn in :meth:`leave`, so it can never hit the pool thread's own loop or the next
    task's body.
    """

    __slots__ = ("_lock", "_pending", "_running", "_thread_id")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread_id = 0
        self._running = False
        self._pending = False

    def enter(self) -> None:
        """Called by the thread that is about to run the body."""
        with self._lock:
            self._thread_id = threading.get_ident()
            self._running = True

    def leave(self) -> None:
        """Called by that thread once the body ended; withdraws an undelivered interrupt."""
        while True:
            try:
                with self._lock:
                    self._running = False
                    if self._pending:
                        self._pending = False
                        _set_async_exc(self._thread_id, None)
                return
            except BaseException:
                continue  # an interrupt delivered just here: the body is over, go round again

    def interrupt(self, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in the body's thread; False when the body is not running."""
        with self._lock:
            if not self._running:
                return False
            self._pending = True
            _set_async_exc(self._thread_id, exc_type)
            return True
