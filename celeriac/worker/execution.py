"""Running a task body, describing how it ended, and building the message of a retry.

``async def`` bodies run on the worker's event loop; sync bodies on the pool. Either way the
request context is set for the body (``self.request``), and the outcome is one of SUCCESS,
FAILURE or RETRY with the value or exception, the traceback text and the run time.

The task signals (``task_prerun``, then ``task_success``/``task_failure``/``task_retry``, then
``task_postrun``) are sent where the body runs — on its pool thread for a sync task, on the loop
for an async one — and in its context, as Celery sends them from the process that runs the task:
a receiver of ``task_prerun`` can set up what the body then sees (a tracing span, a connection).
Each is sent only when it has receivers, so a worker nobody listens to pays one list test each.
"""

from __future__ import annotations

import inspect
import time
import traceback as tb
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.app import calling, routing
from celeriac.app.context import Context, current_request
from celeriac.app.task import take_unraised_retries
from celeriac.exceptions import Retry
from celeriac.signals import (
    ExceptionInfo,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_success,
)
from celeriac.worker.pools import ThreadPool
from celeriac.worker.request import Request

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.task import Task


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


async def run(request: Request, pool: ThreadPool) -> Outcome:
    """Run the task of ``request`` once."""
    task = request.task
    context = request.context()
    args, kwargs = request.message.args, request.message.kwargs
    token = current_request.set(context)
    try:
        if task.is_async:
            outcome = await _run_async(task, context, args, kwargs)
        else:

            def call() -> Outcome:
                current_request.set(context)
                return _run_sync(task, context, args, kwargs)

            outcome = await pool.run(call)
    finally:
        current_request.reset(token)
        unraised = take_unraised_retries(context)
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
    task: Task[Any, Any], context: Context, args: list[Any], kwargs: dict[str, Any]
) -> Outcome:
    if task_prerun.receivers:
        task_prerun.send(sender=task, task_id=context.id, task=task, args=args, kwargs=kwargs)
    started = time.perf_counter()
    try:
        value = await task(*args, **kwargs)
    except Exception as exc:
        outcome = _raised(exc, started)
    else:
        outcome = Outcome(states.SUCCESS, value, time.perf_counter() - started)
    _send_outcome(task, context, args, kwargs, outcome)
    return outcome


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
