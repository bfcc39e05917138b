"""Typed configuration with Celery's lower-case setting names.

Every setting is a field of :class:`Settings`, with its default and a one-line description in the
field metadata (the README's configuration table is generated from the same place, and a test checks
that every setting is documented). ``app.conf`` is a :class:`Settings`; it accepts attribute and item
access like Celery's ``app.conf``. A name that is not a setting raises
:class:`~celeriac.exceptions.ImproperlyConfigured` naming the closest known setting, so a typo never
silently does nothing.

Where Celery's default is unsafe ours is safe, and the description says so:

* ``task_acks_late`` is **on**: a task is acknowledged after it ran, so a worker that dies mid-task
  does not lose it (Celery acks before running by default).
* ``task_reject_on_worker_lost`` is **on** and ``task_max_deliveries`` caps it: a task whose process
  died is delivered again, and a message that keeps killing its worker is dead-lettered after 5
  deliveries (Celery fails the task, or with the setting on delivers it for ever).
* ``accept_content`` is ``["json"]`` (as in Celery 4+): pickle, yaml and msgpack need an explicit
  opt-in.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import timedelta
from typing import Any

from celeriac.app.queues import Queue, check_task_queues
from celeriac.exceptions import ImproperlyConfigured
from celeriac.utils.rates import check_scope, parse_rate
from celeriac.utils.suggest import did_you_mean
from celeriac.utils.time_limits import check_limit

BROKER_URL_ENV = "CELERIAC_BROKER_URL"
RESULT_BACKEND_ENV = "CELERIAC_RESULT_BACKEND"

#: Where the embedded default keeps its data, relative to the working directory.
DEFAULT_BROKER_URL = "sqlite:///celeriac-broker.sqlite3"
DEFAULT_RESULT_BACKEND = "sqlite:///celeriac-results.sqlite3"


def _doc(text: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _seconds(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImproperlyConfigured(
            f"{name} must be a number of seconds or a timedelta, not {value!r}"
        )
    if value < 0:
        raise ImproperlyConfigured(f"{name} must not be negative, got {value!r}")
    return float(value)


def _positive_seconds(value: Any, name: str) -> float:
    seconds = _seconds(value, name)
    if not seconds:
        raise ImproperlyConfigured(f"{name} must be more than 0 seconds, got {value!r}")
    return seconds


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ImproperlyConfigured(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


def _str_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, Iterable) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ImproperlyConfigured(f"{name} must be a list of strings, not {value!r}")


def _optional_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ImproperlyConfigured(f"{name} must be a string, not {value!r}")


def _str(value: Any, name: str) -> str:
    if isinstance(value, str) and value:
        return value
    raise ImproperlyConfigured(f"{name} must be a non-empty string, not {value!r}")


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ImproperlyConfigured(f"{name} must be True or False, not {value!r}")


def _optional_int(value: Any, name: str, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ImproperlyConfigured(f"{name} must be an integer >= {minimum}, not {value!r}")
    return value


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    raise ImproperlyConfigured(f"{name} must be a mapping, not {value!r}")


def _retry_policy(value: Any, name: str) -> dict[str, Any]:
    from celeriac.app.publishing import parse_retry_policy

    policy = parse_retry_policy(value, name)
    return {
        "max_retries": policy.max_retries,
        "interval_start": policy.interval_start,
        "interval_step": policy.interval_step,
        "interval_max": policy.interval_max,
    }


def _task_queues(value: Any, name: str) -> list[Queue]:
    return check_task_queues(value, name)


def _queue_type(value: Any, name: str) -> str:
    if value not in ("classic", "quorum"):
        raise ImproperlyConfigured(f"{name} must be 'classic' or 'quorum', got {value!r}")
    return str(value)


def _rate_limit(value: Any, name: str) -> Any:
    parse_rate(value, name)  # refused now rather than when a worker starts
    return value


def _routes(value: Any, name: str) -> Any:
    if value is None or isinstance(value, Mapping | list | tuple) or callable(value):
        return value
    raise ImproperlyConfigured(
        f"{name} must be a dict, a callable or a list of them, not {value!r}"
    )


@dataclass(slots=True)
class _SettingsFields:
    broker_url: str | None = _doc(
        f"Broker URL. Unset: ${BROKER_URL_ENV}, else the embedded SQLite broker "
        f"({DEFAULT_BROKER_URL}). Schemes: sqlite, redis, rediss, redis+socket, sentinel, "
        "amqp, amqps, pyamqp, memory.",
        None,
    )
    result_backend: str | None = _doc(
        f"Result store URL. Unset: ${RESULT_BACKEND_ENV}, else embedded SQLite "
        f"({DEFAULT_RESULT_BACKEND}). Schemes: sqlite, redis, rediss, redis+socket, "
        "sentinel, rpc, memory.",
        None,
    )
    broker_transport_options: dict[str, Any] = _doc(
        "Transport extras, e.g. {'visibility_timeout': 30} (seconds a fetched message stays "
        "leased; renewed while its task runs).",
        factory=dict,
    )
    result_backend_transport_options: dict[str, Any] = _doc("Result store extras.", factory=dict)
    task_serializer: str = _doc(
        "Serializer of task arguments: json, pickle, msgpack, yaml, xml.", "json"
    )
    result_serializer: str = _doc("Serializer of results.", "json")
    accept_content: list[str] = _doc(
        "Content types (or serializer names) a worker will decode. Anything else is rejected "
        "unread.",
        factory=lambda: ["json"],
    )
    result_accept_content: list[str] | None = _doc(
        "Content types a client will decode from the result store. None: same as accept_content.",
        None,
    )
    task_compression: str | None = _doc(
        "Compress task bodies: gzip/zlib, bzip2, lzma. None: no compression.", None
    )
    result_expires: float | None = _doc(
        "Seconds (or a timedelta) results are kept. None or 0 keeps them forever (as in Celery).",
        86400.0,
    )
    task_default_queue: str = _doc("Queue of tasks without a route.", "celery")
    task_default_exchange: str | None = _doc(
        "Exchange of the default queue. None: the queue's name.", None
    )
    task_default_exchange_type: str = _doc("Type of the default exchange.", "direct")
    task_default_routing_key: str | None = _doc(
        "Routing key of the default queue. None: the queue's name.", None
    )
    task_queues: list[Queue] = _doc(
        "Queue declarations: celeriac.Queue(name, Exchange(name, type=direct|topic|fanout), "
        "routing_key, max_priority=, queue_arguments={'x-queue-type': 'quorum'}). Queues not "
        "listed get a direct exchange of their own name.",
        factory=list,
    )
    task_queue_max_priority: int | None = _doc(
        "x-max-priority of queues that set none (RabbitMQ priority queues). None: no priorities.",
        None,
    )
    task_default_queue_type: str = _doc(
        "RabbitMQ queue type of declared queues: classic or quorum.", "classic"
    )
    task_default_priority: int | None = _doc("Priority of tasks that give none (0-9).", None)
    task_default_rate_limit: str | float | None = _doc(
        "rate_limit of tasks that set none: tasks per second, or 'N/s', 'N/m', 'N/h'. None: no "
        "limit.",
        None,
    )
    task_default_rate_limit_scope: str = _doc(
        "Where rate limits hold when a task sets no rate_limit_scope: 'worker' (each worker on "
        "its own, Celery's meaning) or 'cluster' (all workers together, counted in the broker, or "
        "in the result store on RabbitMQ).",
        "worker",
    )
    task_routes: Any = _doc(
        "Routes: {'name or glob': {'queue': ...}}, a router callable "
        "(name, args, kwargs, options, task) -> dict | None, or a list of those.",
        None,
    )
    task_acks_late: bool = _doc(
        "Acknowledge a task after it ran (at-least-once). celeriac default True; Celery's is "
        "False, which loses the task if its worker dies.",
        True,
    )
    task_reject_on_worker_lost: bool = _doc(
        "When the process running a task dies (acks_late), put its message back in the queue "
        "(counted, and capped by task_max_deliveries). celeriac default True; Celery's is False, "
        "which fails the task with WorkerLostError.",
        True,
    )
    task_max_deliveries: int | None = _doc(
        "Deliveries of a message before it is dead-lettered instead of run again: a message whose "
        "task keeps killing its worker ends FAILURE (WorkerLostError) with its count. None: no cap.",
        5,
    )
    task_publish_retry: bool = _doc(
        "Retry a publish while the broker is unreachable (per task_publish_retry_policy); "
        "it raises once the retries are spent, never reporting an unsent message as sent.",
        True,
    )
    task_publish_retry_policy: dict[str, Any] = _doc(
        "max_retries (3, None = for ever), interval_start (0 s), interval_step (0.2 s), "
        "interval_max (0.2 s) of publish retries.",
        factory=lambda: {
            "max_retries": 3,
            "interval_start": 0.0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
    )
    task_ignore_result: bool = _doc("Store no results unless a task says otherwise.", False)
    task_store_errors_even_if_ignored: bool = _doc(
        "Store failures even of tasks whose result is ignored.", False
    )
    task_track_started: bool = _doc("Store the STARTED state when a task begins.", False)
    task_time_limit: float | None = _doc(
        "Hard time limit in seconds of tasks that set none: the task is stopped (prefork: its "
        "process killed) and fails with TimeLimitExceeded. None: no limit.",
        None,
    )
    task_soft_time_limit: float | None = _doc(
        "Soft time limit in seconds of tasks that set none: SoftTimeLimitExceeded is raised in "
        "the task, which may catch it. None: no limit.",
        None,
    )
    result_persistent: bool = _doc(
        "Send rpc:// results as persistent messages (delivery_mode 2).", False
    )
    result_extended: bool = _doc(
        "Add name, args, kwargs, worker, retries and queue to result documents.", False
    )
    worker_prefetch_multiplier: int = _doc(
        "Messages leased per concurrency slot (Celery's meaning).", 4
    )
    worker_prefetch_ahead: bool = _doc(
        "While the queues have a backlog and tasks take well under a millisecond, fetch the next "
        "batch while the current one runs: at most one more prefetch, held a few milliseconds. "
        "False: never hold more than the prefetch (docs/worker.md, 'Prefetch').",
        True,
    )
    worker_concurrency: int | None = _doc(
        "Tasks run at once by one worker. None: the number of CPUs.", None
    )
    worker_async_concurrency: int | None = _doc(
        "async def tasks run at once by one worker, on its event loop, beside the pool's "
        "worker_concurrency sync tasks. None: max(worker_concurrency, 100); with -P solo, the "
        "pool's single slot (one task at a time).",
        None,
    )
    worker_max_tasks_per_child: int | None = _doc(
        "prefork: a pool process is replaced after this many tasks. None: never.", None
    )
    worker_max_memory_per_child: int | None = _doc(
        "prefork: a pool process is replaced after a task that leaves its resident memory above "
        "this many KiB. None: never.",
        None,
    )
    worker_disable_rate_limits: bool = _doc(
        "Apply no rate limits in this worker (per worker and cluster-wide alike).", False
    )
    worker_revokes_max: int = _doc(
        "Revoked task ids kept in the broker (or result store) and in each worker: the newest "
        "ones (Celery's REVOKES_MAX).",
        50_000,
    )
    worker_revoke_expires: float = _doc(
        "Seconds (or a timedelta) a revoke lasts; give clients and workers the same value "
        "(Celery's REVOKE_EXPIRES, 3 h).",
        10800.0,
    )
    timezone: str | None = _doc("Time zone for naive datetimes when enable_utc is False.", None)
    enable_utc: bool = _doc("Naive datetimes given as eta/expires are UTC.", True)
    imports: list[str] = _doc("Modules the worker imports to register tasks.", factory=list)
    include: list[str] = _doc("Like imports (Celery keeps both names).", factory=list)


#: Coercion and validation of each setting on assignment.
_VALIDATORS: dict[str, Callable[[Any, str], Any]] = {
    "broker_url": _optional_str,
    "result_backend": _optional_str,
    "broker_transport_options": _mapping,
    "result_backend_transport_options": _mapping,
    "task_serializer": _str,
    "result_serializer": _str,
    "accept_content": _str_list,
    "result_accept_content": lambda v, n: None if v is None else _str_list(v, n),
    "task_compression": _optional_str,
    "result_expires": _seconds,
    "task_default_queue": _str,
    "task_default_exchange": _optional_str,
    "task_default_exchange_type": _str,
    "task_default_routing_key": _optional_str,
    "task_queues": _task_queues,
    "task_queue_max_priority": _optional_int,
    "task_default_queue_type": _queue_type,
    "task_default_priority": _optional_int,
    "task_default_rate_limit": _rate_limit,
    "task_default_rate_limit_scope": check_scope,
    "task_routes": _routes,
    "task_acks_late": _bool,
    "task_reject_on_worker_lost": _bool,
    "task_max_deliveries": lambda v, n: _optional_int(v, n, minimum=1),
    "task_publish_retry": _bool,
    "task_publish_retry_policy": _retry_policy,
    "task_ignore_result": _bool,
    "task_store_errors_even_if_ignored": _bool,
    "task_track_started": _bool,
    "task_time_limit": check_limit,
    "task_soft_time_limit": check_limit,
    "result_persistent": _bool,
    "result_extended": _bool,
    "worker_prefetch_multiplier": lambda v, n: _optional_int(v, n, minimum=1),
    "worker_prefetch_ahead": _bool,
    "worker_concurrency": lambda v, n: _optional_int(v, n, minimum=1),
    "worker_async_concurrency": lambda v, n: _optional_int(v, n, minimum=1),
    "worker_max_tasks_per_child": lambda v, n: _optional_int(v, n, minimum=1),
    "worker_max_memory_per_child": lambda v, n: _optional_int(v, n, minimum=1),
    "worker_disable_rate_limits": _bool,
    "worker_revokes_max": lambda v, n: _int(v, n, minimum=1),
    "worker_revoke_expires": _positive_seconds,
    "timezone": _optional_str,
    "enable_utc": _bool,
    "imports": _str_list,
    "include": _str_list,
}

SETTING_NAMES: frozenset[str] = frozenset(f.name for f in fields(_SettingsFields))


def setting_docs() -> list[tuple[str, Any, str]]:
    """(name, default, description) of every setting, in declaration order."""
    rows = []
    for f in fields(_SettingsFields):
        factory: Any = f.default_factory
        default: Any = f.default if f.default is not MISSING else factory()
        rows.append((f.name, default, f.metadata["doc"]))
    return rows


def unknown_setting(name: str) -> ImproperlyConfigured:
    """The error for a name that is not a setting, with the closest known name."""
    hint = did_you_mean(name.lower(), SETTING_NAMES, cutoff=0.5)
    return ImproperlyConfigured(f"Unknown setting {name!r}.{hint}")


class Settings(_SettingsFields):
    """``app.conf``: every setting as a validated attribute, plus Celery's mapping methods."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in SETTING_NAMES:
            raise unknown_setting(name)
        object.__setattr__(self, name, _VALIDATORS[name](value, name))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not settings.
        raise unknown_setting(name)

    def __getitem__(self, name: str) -> Any:
        if name not in SETTING_NAMES:
            raise unknown_setting(name)
        return getattr(self, name)

    def __setitem__(self, name: str, value: Any) -> None:
        setattr(self, name, value)

    def __contains__(self, name: object) -> bool:
        return name in SETTING_NAMES

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(SETTING_NAMES))

    def get(self, name: str, default: Any = None) -> Any:
        """The setting's value; ``default`` only for names that are not settings."""
        return getattr(self, name) if name in SETTING_NAMES else default

    def update(self, mapping: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """Set many settings at once. Every name is checked before any is changed."""
        items = {**(mapping or {}), **kwargs}
        for name in items:
            if name not in SETTING_NAMES:
                raise unknown_setting(name)
        validated = {name: _VALIDATORS[name](value, name) for name, value in items.items()}
        for name, value in validated.items():
            object.__setattr__(self, name, value)

    def table(self) -> dict[str, Any]:
        """Every setting and its current value."""
        return {name: getattr(self, name) for name in sorted(SETTING_NAMES)}

    def from_object(self, obj: Any) -> None:
        """Load settings from a module, class, object or dotted path, as Celery does.

        Only lower-case public attributes are read; an attribute that looks like a setting but is
        not one (e.g. a typo) is an error rather than silently ignored. Upper-case attributes
        (``CELERY_*`` old-style names) are errors that name the new setting.
        """
        if isinstance(obj, str):
            obj = _import_object(obj)
        values: dict[str, Any] = {}
        for name in dir(obj):
            if name.startswith("_"):
                continue
            value = getattr(obj, name)
            if callable(value) and not isinstance(value, type) and name not in SETTING_NAMES:
                continue  # functions and classes defined beside the settings
            if isinstance(value, type(os)):
                continue  # modules imported by a config module
            if name.isupper():
                new = name.lower().removeprefix("celery_")
                raise unknown_setting(new if new in SETTING_NAMES else name)
            values[name] = value
        self.update(values)

    def resolved_broker_url(self) -> str:
        """The broker URL in force: setting, else environment, else the embedded default."""
        return self.broker_url or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL

    def resolved_result_backend(self) -> str:
        """The result store URL in force: setting, else environment, else the embedded default."""
        return self.result_backend or os.environ.get(RESULT_BACKEND_ENV) or DEFAULT_RESULT_BACKEND

    def resolved_result_accept(self) -> list[str]:
        """``result_accept_content``, defaulting to ``accept_content``."""
        if self.result_accept_content is not None:
            return self.result_accept_content
        return self.accept_content


def _import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if attr or "." not in module_name:
            raise ImproperlyConfigured(f"Cannot import configuration {path!r}: {exc}") from exc
        module_name, _, attr = module_name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc2:
            raise ImproperlyConfigured(f"Cannot import configuration {path!r}: {exc2}") from exc2
    if not attr:
        return module
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ImproperlyConfigured(f"{module_name!r} has no attribute {attr!r}") from exc
