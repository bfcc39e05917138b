"""Turning a task call into a :class:`TaskMessage` and its destination.

``apply_async`` options are checked against one table (:data:`CALL_OPTIONS`): an option celeriac
does not know is an error at the call, never silently dropped. Times are normalized here, once:
``countdown`` and ``eta`` become one tz-aware UTC ``eta``; ``expires`` in seconds becomes a time.

What is refused here, before anything is sent: an unknown option; a ``countdown`` or ``expires``
that is not a finite number of seconds; a negative ``countdown`` (Celery runs it at once, without
documenting it; it is almost always a bug in the caller, so celeriac says so — pass 0 to run now);
``countdown`` together with ``eta``; an ``expires`` that is not after the ``eta`` (the task could
never run); an unknown time zone; a ``time_limit`` or ``soft_time_limit`` that is not a positive
number of seconds, or a soft limit above the hard one. An ``expires`` already past without an
``eta`` is sent with a warning, as Celery does, and the worker records the task REVOKED unrun.

Naive datetimes are read as UTC when ``enable_utc`` is on (the default), else in ``timezone``, or
in the system's local time when no ``timezone`` is set (Celery's ``app.timezone``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celeriac.app import routing
from celeriac.app.canvas import as_signature_list
from celeriac.app.context import current_request
from celeriac.app.publishing import NO_RETRY, RetryPolicy, parse_retry_policy
from celeriac.app.queues import defined_queue
from celeriac.exceptions import ImproperlyConfigured, UnknownOptionError
from celeriac.protocol.message import TaskMessage, uuid4_text
from celeriac.protocol.v2 import default_origin
from celeriac.protocol.validate import DROPPED_HEADERS, MODEL_HEADERS
from celeriac.utils.suggest import did_you_mean
from celeriac.utils.time_limits import check_limit, check_pair

if TYPE_CHECKING:
    from celeriac.app.config import Settings
    from celeriac.app.task import Task

logger = logging.getLogger("celeriac.app")

#: Every option ``apply_async`` / ``send_task`` accepts, with what it means.
CALL_OPTIONS: dict[str, str] = {
    "countdown": "seconds from now before the task may run",
    "eta": "datetime before which the task may not run",
    "expires": "seconds from now, or a datetime, after which the task is revoked unrun",
    "queue": "queue to send to",
    "routing_key": "routing key",
    "exchange": "exchange",
    "priority": "0-9, higher runs first",
    "serializer": "serializer of the arguments",
    "compression": "compression of the body",
    "task_id": "the id to give the task",
    "headers": "extra message headers",
    "ignore_result": "store no result",
    "link": "signature(s) to run with the result on success",
    "link_error": "signature(s) to run with the task id on failure",
    "shadow": "another name to show in logs",
    "retries": "retry count carried by the message",
    "parent_id": "id of the task that sent this one",
    "root_id": "id of the first task of the workflow",
    "group_id": "id of the group this task belongs to",
    "group_index": "position in its group",
    "reply_to": "reply queue name carried in the message",
    "retry": "retry the publish while the broker is unreachable (default task_publish_retry)",
    "retry_policy": "how to retry the publish (default task_publish_retry_policy)",
    "time_limit": "hard time limit in seconds (message header timelimit[0]; default: the task's)",
    "soft_time_limit": "soft time limit in seconds (timelimit[1]; default: the task's)",
}


@dataclass(slots=True)
class Outgoing:
    """A message ready to encode and publish."""

    message: TaskMessage
    route: routing.Route
    serializer: str
    compression: str | None
    #: UNIX time before which the broker keeps the message invisible.
    not_before: float | None
    #: How the publish is retried while the broker is unreachable.
    retry_policy: RetryPolicy = NO_RETRY


def check_options(options: Mapping[str, Any], task_name: str) -> None:
    """Raise for any option celeriac does not know."""
    for name in options:
        if name not in CALL_OPTIONS:
            hint = did_you_mean(name, CALL_OPTIONS)
            raise UnknownOptionError(
                f"apply_async() of {task_name!r} got an unknown option {name!r}.{hint}"
            )


def to_utc(value: datetime, conf: Settings, what: str) -> datetime:
    """A tz-aware UTC datetime; naive values are UTC (enable_utc), else in ``conf.timezone``,
    else in the system's local time."""
    if value.tzinfo is None:
        if conf.enable_utc:
            return value.replace(tzinfo=UTC)
        if not conf.timezone:
            return value.astimezone(UTC)  # a naive datetime is local time to astimezone()
        try:
            zone = ZoneInfo(conf.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ImproperlyConfigured(f"timezone {conf.timezone!r} is not known") from exc
        return value.replace(tzinfo=zone).astimezone(UTC)
    del what
    return value.astimezone(UTC)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ImproperlyConfigured(f"{name} must be a finite number of seconds, not {value!r}")
    return float(value)


def _later(now: datetime, seconds: float, name: str) -> datetime:
    try:
        return now + timedelta(seconds=seconds)
    except OverflowError:
        raise ImproperlyConfigured(f"{name} of {seconds} seconds is beyond any date") from None


def build(
    conf: Settings,
    name: str,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    task: Task[Any, Any] | None = None,
) -> Outgoing:
    """The message and destination for calling task ``name`` with these arguments and options."""
    check_options(options, name)
    if args is not None and (isinstance(args, str | bytes) or not isinstance(args, Sequence)):
        raise ImproperlyConfigured(f"args of {name!r} must be a list or tuple, not {args!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ImproperlyConfigured(f"kwargs of {name!r} must be a mapping, not {kwargs!r}")
    now = datetime.now(UTC)

    eta: datetime | None = None
    if options.get("countdown") is not None:
        if options.get("eta") is not None:
            raise ImproperlyConfigured("give countdown or eta, not both")
        countdown = _number(options["countdown"], "countdown")
        if countdown < 0:
            raise ImproperlyConfigured(
                f"countdown must not be negative, got {countdown} (use 0 to run the task now)"
            )
        eta = _later(now, countdown, "countdown")
    elif options.get("eta") is not None:
        if not isinstance(options["eta"], datetime):
            raise ImproperlyConfigured(f"eta must be a datetime, not {options['eta']!r}")
        eta = to_utc(options["eta"], conf, "eta")

    expires: datetime | None = None
    raw_expires = options.get("expires")
    if raw_expires is not None:
        if isinstance(raw_expires, datetime):
            expires = to_utc(raw_expires, conf, "expires")
        else:
            expires = _later(now, _number(raw_expires, "expires"), "expires")
        if eta is not None and expires <= eta:
            raise ImproperlyConfigured("expires is not after eta: the task could never run")
        if expires <= now:
            # Sent all the same, as Celery does ("we assume this is intended"): the worker records
            # it REVOKED without running it. Said here so that a mistake is visible at its source.
            logger.warning(
                "Task %s expires %s, which is already past: it will be revoked, not run",
                name,
                expires.isoformat(),
            )

    priority = options.get("priority")
    if priority is None and task is not None:
        priority = task.priority
    if priority is None:
        priority = conf.task_default_priority
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9
    ):
        raise ImproperlyConfigured(f"priority must be an integer from 0 to 9, not {priority!r}")

    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ImproperlyConfigured(f"headers must be a mapping, not {headers!r}")
    for key in headers:
        if key in MODEL_HEADERS or key in DROPPED_HEADERS:
            raise ImproperlyConfigured(
                f"headers={{{key!r}: ...}} would replace the protocol header {key!r}; "
                "use the matching apply_async option (task_id=, eta=, expires=, shadow=, ...) instead"
            )

    route_options = routing.lookup_route(conf.task_routes, name, args or (), kwargs or {}, options)
    queue = options.get("queue") or route_options.get("queue") or (task.queue if task else None)
    exchange = (
        options.get("exchange")
        or route_options.get("exchange")
        or (task.exchange if task else None)
    )
    routing_key = (
        options.get("routing_key")
        or route_options.get("routing_key")
        or (task.routing_key if task else None)
    )
    if queue and not exchange and not routing_key:
        # A queue declared in task_queues with a topic or fanout exchange is reached through its
        # exchange; a direct one through the default exchange, by name (as Celery publishes).
        declared = defined_queue(conf, queue)
        if declared is not None and declared.exchange_obj.type != "direct":
            spec = declared.spec(conf)
            exchange, routing_key = spec.exchange, spec.routing_key
    route = routing.resolve(
        queue=queue,
        exchange=exchange,
        routing_key=routing_key,
        default_queue=conf.task_default_queue,
    )

    ignore_result = options.get("ignore_result")
    if ignore_result is None and task is not None:
        ignore_result = task.resolved_ignore_result()

    parent = current_request.get()
    task_id = options.get("task_id") or uuid4_text()
    parent_id = options.get("parent_id") or (parent.id if parent else None)
    root_id = options.get("root_id") or (parent.root_id if parent else None) or task_id

    message = TaskMessage(
        id=task_id,
        task=name,
        args=list(args or ()),
        kwargs=dict(kwargs or {}),
        eta=eta,
        expires=expires,
        retries=int(options.get("retries") or 0),
        root_id=root_id,
        parent_id=parent_id,
        group=options.get("group_id"),
        group_index=options.get("group_index"),
        shadow=options.get("shadow"),
        origin=default_origin(),
        ignore_result=bool(ignore_result) if ignore_result is not None else False,
        callbacks=as_signature_list(options.get("link"), "link"),
        errbacks=as_signature_list(options.get("link_error"), "link_error"),
        reply_to=options.get("reply_to"),
        correlation_id=task_id,
        priority=priority,
        timelimit=_time_limits(name, options, task),
        extra_headers=dict(headers),
    )
    serializer = (
        options.get("serializer") or (task.serializer if task else None) or conf.task_serializer
    )
    compression = (
        options.get("compression") or (task.compression if task else None) or conf.task_compression
    )
    return Outgoing(
        message=message,
        route=route,
        serializer=serializer,
        compression=compression,
        not_before=eta.timestamp() if eta is not None and eta > now else None,
        retry_policy=_retry_policy(conf, options),
    )


def _time_limits(
    name: str, options: Mapping[str, Any], task: Task[Any, Any] | None
) -> tuple[float | None, float | None]:
    """The ``timelimit`` header ``[hard, soft]``: the call's limits, else the task's (Celery's).

    As in Celery, a limit given to the call (even None) replaces the task's, and a task sent by
    name (``send_task``) carries only the call's.
    """
    defaults = task.resolved_time_limits() if task is not None else (None, None)
    hard = options["time_limit"] if "time_limit" in options else defaults[0]
    soft = options["soft_time_limit"] if "soft_time_limit" in options else defaults[1]
    hard = check_limit(hard, "time_limit")
    soft = check_limit(soft, "soft_time_limit")
    check_pair(hard, soft, f"apply_async() of {name!r}")
    return hard, soft


def _retry_policy(conf: Settings, options: Mapping[str, Any]) -> RetryPolicy:
    """The publish retry policy of one call: ``retry=``/``retry_policy=`` over the settings."""
    retry = options.get("retry")
    if retry is None:
        retry = conf.task_publish_retry
    if not isinstance(retry, bool):
        raise ImproperlyConfigured(f"retry must be True or False, got {retry!r}")
    if not retry:
        return NO_RETRY
    policy = dict(conf.task_publish_retry_policy)
    given = options.get("retry_policy")
    if given is not None:
        if not isinstance(given, Mapping):
            raise ImproperlyConfigured(f"retry_policy must be a dict, got {given!r}")
        policy.update(given)
    # Types are part of the key: True == 1 for a dict key, not for the policy's checks.
    key = tuple((name, type(value), value) for name, value in policy.items())
    try:
        hash(key)
    except TypeError:  # an unhashable value: checked (and refused) the long way
        return parse_retry_policy(policy, "retry_policy")
    return _parsed_policy(key)


@functools.lru_cache(maxsize=64)
def _parsed_policy(items: tuple[tuple[Any, type, Any], ...]) -> RetryPolicy:
    """Every call with the settings' policy parses the same dict: once is enough."""
    return parse_retry_policy({name: value for name, _, value in items}, "retry_policy")
