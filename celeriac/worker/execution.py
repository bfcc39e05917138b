"""Running a task body, describing how it ended, and building the message of a retry.

``async def`` bodies run on the worker's event loop; sync bodies on the pool (a thread, or a pool
process with ``-P prefork``: see :mod:`celeriac.worker.pools`). Either way the request context is
set for the body (``self.request``), and the outcome is one of SUCCESS, FAILURE or RETRY with the
value or exception, the traceback text and the run time.

The time limits of a run are resolved here (:func:`celeriac.worker.timelimits.resolve`); the pool
enforces them for sync bodies, and :func:`run` for ``async def`` ones (cancelled at their limit).

The task signals (``task_prerun``, then ``task_success``/``task_failure``/``task_retry``, then
``task_postrun``) are sent where the body runs — on its pool thread or in its pool process for a
sync task, on the loop for an async one — and in its context, as Celery sends them from the process
that runs the task: a receiver of ``task_prerun`` can set up what the body then sees (a tracing
span, a connection). Each is sent only when it has receivers, so a worker nobody listens to pays one
list test each. A body stopped by its hard time limit or by the death of its pool process sends no
outcome signal (it never got to one), as in Celery.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback as tb
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.app import calling, routing
from celeriac.app.context import Context, current_request
from celeriac.app.task import take_unraised_retries
from celeriac.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celeriac.signals import (
    ExceptionInfo,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_success,
)
from celeriac.worker import timelimits
from celeriac.worker.logs import logger
from celeriac.worker.request import Request
from celeriac.worker.timelimits import TimeLimits

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.task import Task
    from celeriac.worker.pools import Pool

#: Seconds an ``async def`` task cancelled at its hard limit gets to end before it is reported as
#: ignoring its cancellation (its outcome is TimeLimitExceeded either way).
ASYNC_CANCEL_GRACE = 1.0


@dataclass(slots=True)
class Outcome:
    """How one run of a task ended."""

    state: str
    value: Any
    runtime: float
    traceback: str | None = None
    #: Retries the body asked for with ``retry(throw=False)`` and did not raise; sent anyway.
    unraised: tuple[Retry, ...] = ()
    #: The process running the body died before it ended (``value`` is a WorkerLostError): the
    #: worker decides between delivering the message again and failing it (poison messages).
    worker_lost: bool = False

    @property
    def retry(self) -> Retry | None:
        """The Retry request, when the task asked to be retried."""
        return self.value if self.state == states.RETRY else None


@dataclass(slots=True)
class Job:
    """One run of a sync task body, as a pool receives it."""

    task: Task[Any, Any]
    context: Context
    args: list[Any]
    kwargs: dict[str, Any]
    limits: TimeLimits
    #: ``tasks.add[<id>]``, for the pool's log lines.
    label: str
    #: For a pool that queues jobs (:attr:`Pool.queues_jobs`): asked on the pool's thread right
    #: before the body would start; False gives the job back unstarted (revoked meanwhile, or
    #: taken back by the broker). A plain, non-blocking check.
    wanted: Callable[[], bool] | None = None
    #: For a pool that queues jobs: what must happen on the worker's event loop right before the
    #: body starts, and not earlier (the ack of a task that is not ``acks_late``, its STARTED
    #: state); the body starts once it is done, and not at all if it raises.
    before_start: Callable[[], Coroutine[Any, Any, None]] | None = None


async def run(
    request: Request,
    pool: Pool,
    *,
    wanted: Callable[[], bool] | None = None,
    before_start: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> Outcome:
    """Run the task of ``request`` once, within its time limits.

    ``wanted`` and ``before_start`` are for a sync task on a pool that queues jobs (see
    :class:`Job`); the caller runs them itself otherwise.
    """
    task = request.task
    context = request.context()
    args, kwargs = request.message.args, request.message.kwargs
    limits = timelimits.resolve(request.message.timelimit, task, pool.limits)
    if not task.is_async:
        job = Job(task, context, args, kwargs, limits, request.label(), wanted, before_start)
        return await pool.run(job)
    token = current_request.set(context)
    try:
        if limits.any:
            outcome = await _run_async_limited(task, context, args, kwargs, limits, request)
        else:
            outcome = await _run_async(task, context, args, kwargs)
    finally:
        current_request.reset(token)
        unraised = take_unraised_retries(context)
    return _with_unraised(outcome, unraised)


def run_sync(
    task: Task[Any, Any], context: Context, args: list[Any], kwargs: dict[str, Any]
) -> Outcome:
    """Run a sync body here — on a pool thread or in a pool process — with ``self.request`` set."""
    token = current_request.set(context)
    try:
        outcome = _run_sync(task, context, args, kwargs)
    finally:
        current_request.reset(token)
        unraised = take_unraised_retries(context)
    return _with_unraised(outcome, unraised)


def _with_unraised(outcome: Outcome, unraised: list[Retry]) -> Outcome:
    if unraised:
        raised = outcome.retry
        outcome.unraised = tuple(r for r in unraised if r is not raised)
    return outcome


def _run_sync(
    task: Task[Any, Any], context: Context, args: list[Any], kwargs: dict[str, Any]
) -> Outcome:
    if task_prerun.receivers:
        task_prerun.send(sender=task, task_id=context.id, task=task, args=args, kwargs=kwargs)
    started = time.perf_counter()
    try:
        value = task(*args, **kwargs)
        if inspect.iscoroutine(value):
            # A sync function that returned a coroutine: refuse rather than drop it.
            value.close()
            raise TypeError(f"{task.name} returned a coroutine; declare it async def")
    except Exception as exc:
        outcome = _raised(exc, started)
    else:
        outcome = Outcome(states.SUCCESS, value, time.perf_counter() - started)
    _send_outcome(task, context, args, kwargs, outcome)
    return outcome


async def _run_async(
    task: Task[Any, Any],
    context: Context,
    args: list[Any],
    kwargs: dict[str, Any],
    soft_limit: bool = False,
) -> Outcome:
    if task_prerun.receivers:
        task_prerun.send(sender=task, task_id=context.id, task=task, args=args, kwargs=kwargs)
    started = time.perf_counter()
    try:
        body = task(*args, **kwargs)
        value = await (timelimits.soft_limited(body) if soft_limit else body)
    except Exception as exc:
        outcome = _raised(exc, started)
    else:
        outcome = Outcome(states.SUCCESS, value, time.perf_counter() - started)
    _send_outcome(task, context, args, kwargs, outcome)
    return outcome


async def _run_async_limited(
    task: Task[Any, Any],
    context: Context,
    args: list[Any],
    kwargs: dict[str, Any],
    limits: TimeLimits,
    request: Request,
) -> Outcome:
    """Run an ``async def`` body as a task of its own, cancelled at its soft and hard limits."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    soft = limits.soft is not None
    body = asyncio.ensure_future(_run_async(task, context, args, kwargs, soft_limit=soft))
    soft_timer = None
    if limits.soft is not None:
        soft_timer = loop.call_later(limits.soft, _soft_limit_reached, body, limits.soft, request)
    try:
        done, _ = await asyncio.wait({body}, timeout=limits.hard)
    except asyncio.CancelledError:
        # Cancelled from outside (cold shutdown, revoke): the body is cancelled with it.
        body.cancel()
        body.add_done_callback(_consume)
        raise
    finally:
        if soft_timer is not None:
            soft_timer.cancel()
    if done:
        if body.cancelled():
            # The soft limit's cancellation left the body as a CancelledError it did not convert.
            return failure(SoftTimeLimitExceeded(), time.perf_counter() - started)
        return body.result()
    assert limits.hard is not None
    logger.error("Hard time limit (%ss) exceeded for %s", limits.hard, request)
    body.cancel(timelimits.HARD_LIMIT_MESSAGE)
    ended, _ = await asyncio.wait({body}, timeout=ASYNC_CANCEL_GRACE)
    if not ended:
        logger.error(
            "Task %s is still running %.1fs after its cancellation at its hard time limit: it "
            "catches CancelledError and goes on. Its outcome is TimeLimitExceeded; whatever it "
            "does from now on is not recorded.",
            request,
            ASYNC_CANCEL_GRACE,
        )
    body.add_done_callback(_consume)
    return time_limit_exceeded(limits.hard, time.perf_counter() - started)


def _soft_limit_reached(body: asyncio.Future[Outcome], soft: float, request: Request) -> None:
    if not body.done():
        logger.warning("Soft time limit (%ss) exceeded for %s", soft, request)
        body.cancel(timelimits.SOFT_LIMIT_MESSAGE)


def _consume(body: asyncio.Future[Outcome]) -> None:
    """Retrieve the end of a body nobody waits for any more (no 'never retrieved' warnings)."""
    if not body.cancelled():
        body.exception()


def failure(error: BaseException, runtime: float, *, worker_lost: bool = False) -> Outcome:
    """A FAILURE with ``error``, raised where the body was not (a limit, a lost process)."""
    text = "".join(tb.format_exception_only(error))
    return Outcome(states.FAILURE, error, runtime, text, worker_lost=worker_lost)


def time_limit_exceeded(hard: float, runtime: float) -> Outcome:
    """The outcome of a body stopped at its hard limit: ``TimeLimitExceeded(<limit>)``, Celery's."""
    return failure(TimeLimitExceeded(hard), runtime)


def worker_lost(description: str, runtime: float) -> Outcome:
    """The outcome of a body whose pool process died: ``description`` is e.g. ``signal 9 (SIGKILL)``."""
    return failure(
        WorkerLostError(f"Worker exited prematurely: {description}"), runtime, worker_lost=True
    )


def _raised(exc: Exception, started: float) -> Outcome:
    """The outcome of a body that raised ``exc`` (inside its ``except``: the traceback is live)."""
    state = states.RETRY if isinstance(exc, Retry) else states.FAILURE
    return Outcome(state, exc, time.perf_counter() - started, tb.format_exc())


def _send_outcome(
    task: Task[Any, Any],
    context: Context,
    args: list[Any],
    kwargs: dict[str, Any],
    outcome: Outcome,
) -> None:
    """``task_success`` / ``task_retry`` / ``task_failure``, then ``task_postrun`` (Celery's order)."""
    state = outcome.state
    if state == states.SUCCESS:
        if task_success.receivers:
            task_success.send(sender=task, result=outcome.value, runtime=outcome.runtime)
    elif state == states.RETRY:
        if task_retry.receivers:
            task_retry.send(
                sender=task,
                request=context,
                reason=outcome.value,
                einfo=ExceptionInfo(outcome.value, outcome.traceback),
            )
    elif task_failure.receivers:
        exc = outcome.value
        task_failure.send(
            sender=task,
            task_id=context.id,
            exception=exc,
            args=args,
            kwargs=kwargs,
            traceback=exc.__traceback__,
            einfo=ExceptionInfo(exc, outcome.traceback),
        )
    if task_postrun.receivers:
        task_postrun.send(
            sender=task,
            task_id=context.id,
            task=task,
            args=args,
            kwargs=kwargs,
            retval=outcome.value,
            state=state,
        )


def failed(outcome: Outcome, error: BaseException) -> Outcome:
    """The outcome of a run whose retry could not be sent: a failure with that error."""
    text = "".join(tb.format_exception(error))
    return Outcome(states.FAILURE, error, outcome.runtime, text)


#: ``apply_async`` options a ``retry()`` may give, and the message field each one replaces;
#: a field whose option is not given keeps the original message's value.
_KEPT_UNLESS_GIVEN = {
    "root_id": "root_id",
    "parent_id": "parent_id",
    "group_id": "group",
    "group_index": "group_index",
    "shadow": "shadow",
    "link": "callbacks",
    "link_error": "errbacks",
    "priority": "priority",
    "ignore_result": "ignore_result",
    "expires": "expires",
    "reply_to": "reply_to",
}


def retry_outgoing(app: Celery, request: Request, retry: Retry, hostname: str) -> calling.Outgoing:
    """The message that retries ``request``, as Celery builds it from the request.

    It keeps the task id, root, parent, group, links, priority, expiry, custom headers, time
    limits and the rest of the workflow; counts ``retries`` up; takes the new arguments and the
    ``apply_async`` options given to ``retry()``; and goes back to the queue it came from unless
    those options route it elsewhere. Raises the caller-side errors of ``apply_async``
    (:class:`~celeriac.exceptions.ImproperlyConfigured`) when the options do not fit.

    The original expiry is kept even when the retry is due after it: the worker revokes the
    message when it arrives, as Celery's does (only a new ``expires`` is checked against the eta).
    """
    message = request.message
    given = retry.options
    args = retry.args_override if retry.args_override is not None else message.args
    kwargs = retry.kwargs_override if retry.kwargs_override is not None else message.kwargs
    options: dict[str, Any] = {"task_id": message.id, "retries": message.retries + 1, **given}
    when = retry.when
    if isinstance(when, datetime):
        options["eta"] = when
    else:
        options["countdown"] = float(when or 0)
    outgoing = calling.build(app.conf, message.task, args, kwargs, options, request.task)
    if not any(key in given for key in ("queue", "exchange", "routing_key")):
        queue = request.delivery.queue
        outgoing.route = routing.Route(queue=queue, exchange="", routing_key=queue)
    kept: dict[str, Any] = {
        field: getattr(message, field)
        for option, field in _KEPT_UNLESS_GIVEN.items()
        if option not in given
    }
    if "reply_to" in kept:
        # "" rather than None: a retry never picks up the worker's own reply queue (rpc://).
        kept["reply_to"] = message.reply_to or ""
    if "root_id" in kept:
        kept["root_id"] = message.root_id or message.id
    same_args = retry.args_override is None and retry.kwargs_override is None
    outgoing.message = replace(
        outgoing.message,
        **kept,
        extra_headers={**message.extra_headers, **outgoing.message.extra_headers},
        timelimit=message.timelimit,
        chain=message.chain,
        chord=message.chord,
        correlation_id=message.correlation_id or message.id,
        delivery_mode=message.delivery_mode,
        argsrepr=message.argsrepr if same_args else None,
        kwargsrepr=message.kwargsrepr if same_args else None,
        origin=hostname,
    )
    return outgoing
