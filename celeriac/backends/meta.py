"""Result documents and exceptions, in Celery's exact shape (celery-wire.md §6.1, §6.2).

A *result document* ("meta") is what a worker stores for a task and what ``AsyncResult`` reads
back. :func:`build_meta` writes it with Celery's keys in Celery's order, so that a real Celery
client reads celeriac's results and the bytes look the same in a store.

A task exception travels as ``{"exc_type", "exc_message", "exc_module"}``. Reading one back is where
Celery had CVE-2021-23727: it imported ``exc_module`` and called ``exc_type`` with attacker-chosen
arguments. :func:`exception_from_meta` never imports anything. It rebuilds only classes that are
already loaded and are exception classes, and returns
:class:`~celeriac.exceptions.RemoteTaskError` for everything else, carrying the remote type, module
and arguments so the user still sees what went wrong.
"""

from __future__ import annotations

import builtins
import sys
import time
import types
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from celeriac import exceptions, states

#: Extended fields (``result_extended``), in the order Celery writes them.
EXTENDED_FIELDS = ("name", "args", "kwargs", "worker", "retries", "queue")

#: Module name under which Celery-compatible celeriac exceptions are written.
CELERY_EXCEPTIONS_MODULE = "celery.exceptions"
_CELERIAC_EXCEPTIONS_MODULE = exceptions.__name__

#: A real Celery worker writes the time-limit and worker-lost errors under the module that defines
#: them (``billiard.exceptions``; ``celery.exceptions`` only re-exports them). Reading those names
#: as celeriac's classes keeps ``except TimeLimitExceeded`` working on results of a Celery worker.
_BILLIARD_ALIASES: dict[str, type[BaseException]] = {
    name: exceptions.CELERY_COMPATIBLE[name]
    for name in ("TimeLimitExceeded", "SoftTimeLimitExceeded", "WorkerLostError")
}

#: Nesting depth past which :func:`ensure_serializable` gives up and uses ``repr``; keeps a
#: self-referencing list in an exception's args from recursing forever.
_MAX_DEPTH = 32

_JSON_SCALARS = (str, int, float, bool, type(None))

_READY_STATES = states.READY_STATES


# -- documents -----------------------------------------------------------------------------------


def build_meta(
    task_id: str,
    status: str,
    result: Any = None,
    *,
    traceback: str | None = None,
    children: list[Any] | None = None,
    group_id: str | None = None,
    parent_id: str | None = None,
    date_done: datetime | None = None,
    extended: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a result document exactly as Celery's ``Backend._get_result_meta`` does.

    Keys, in order: ``status``, ``result``, ``traceback``, ``children``, ``date_done``, then
    ``group_id`` / ``parent_id`` when known, then the extended fields when ``extended`` is given
    (``name``, ``args``, ``kwargs``, ``worker``, ``retries``, ``queue``, each None when missing,
    followed by any further keys such as ``stamped_headers``), and ``task_id`` last.

    ``date_done`` defaults to now (UTC) for READY states and None otherwise; a naive datetime is
    taken as UTC. An exception ``result`` is written as :func:`exception_to_meta` describes.
    """
    if (type(task_id) is not str and not isinstance(task_id, str)) or not task_id:
        raise exceptions.EncodeError(
            f"a result document needs a non-empty task_id string, got {task_id!r}"
        )
    if (type(status) is not str and not isinstance(status, str)) or not status:
        raise exceptions.EncodeError(
            f"a result document needs a non-empty status string, got {status!r}"
        )
    if isinstance(result, BaseException):
        result = exception_to_meta(result)
    if date_done is not None:
        done: str | None = format_date(date_done)
    elif status in _READY_STATES:
        done = now_text()
    else:
        done = None
    meta: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [] if children is None else children,
        "date_done": done,
    }
    if group_id is not None:
        meta["group_id"] = group_id
    if parent_id is not None:
        meta["parent_id"] = parent_id
    if extended is not None:
        for key in EXTENDED_FIELDS:
            meta[key] = extended.get(key)
        for key, value in extended.items():
            if key not in meta:
                meta[key] = value
    # Celery's KeyValueStoreBackend adds task_id after building the rest; its async result
    # consumer keys on it, so it is always present.
    meta["task_id"] = task_id
    return meta


#: The whole seconds last formatted by :func:`now_text` and their text up to the seconds;
#: replaced as one tuple, so threads formatting at once never mix two seconds.
_last_second: tuple[int, str] = (-1, "")


def now_text(now_ns: int | None = None) -> str:
    """``format_date(datetime.now(UTC))``, the ``date_done`` of every stored result, for less
    than half the cost: the date and time up to the seconds are formatted once a second.

    ``now_ns``: the time to format, in nanoseconds since the epoch (default: the clock). Same
    text as ``isoformat``, which writes the microseconds only when there are some;
    ``datetime.now`` truncates the clock to microseconds as ``now_ns // 1000`` does.
    """
    global _last_second  # noqa: PLW0603 - the per-process cache of one value
    if now_ns is None:
        now_ns = time.time_ns()
    seconds, micros = divmod(now_ns // 1000, 1_000_000)
    last = _last_second
    if last[0] != seconds:
        last = _last_second = (
            seconds,
            datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")[:19],
        )
    if micros:
        return f"{last[1]}.{micros:06d}+00:00"
    return f"{last[1]}+00:00"


def format_date(value: datetime) -> str:
    """``date_done`` as Celery ≥ 5.4 writes it: ISO-8601 in UTC with an explicit ``+00:00``."""
    if value.tzinfo is UTC:  # what build_meta passes: no conversion to do
        return value.isoformat()
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


# -- exceptions: writing -------------------------------------------------------------------------


def ensure_serializable(value: Any) -> Any:
    """``value`` if every serializer can carry it, else its ``repr()``.

    The portable subset is JSON's: str, int, float, bool, None, and lists / str-keyed dicts of
    them (a tuple becomes a list, as JSON would make it). This is Celery's ``ensure_serializable``
    made independent of the serializer, so an exception stored with msgpack reads the same as one
    stored with JSON.
    """
    return _portable(value, 0)


def _portable(value: Any, depth: int) -> Any:
    kind = type(value)
    # Exact types only: a bool/int/str subclass (an IntEnum, say) may not survive every serializer.
    if kind in _JSON_SCALARS:
        return value
    if depth < _MAX_DEPTH:
        if kind is list or kind is tuple:
            return [_portable(item, depth + 1) for item in value]
        if kind is dict and all(type(key) is str for key in value):
            return {key: _portable(item, depth + 1) for key, item in value.items()}
    return _safe_repr(value)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:  # a broken __repr__ must not hide the task's own error
        return f"<unrepresentable {type(value).__qualname__} object>"


def _short_repr(value: Any, limit: int = 200) -> str:
    text = _safe_repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def exception_to_meta(exc: BaseException) -> dict[str, Any]:
    """Describe ``exc`` as Celery does for non-pickle serializers.

    ``{"exc_type": qualname, "exc_message": [args...], "exc_module": module}``. celeriac classes
    that mirror one of Celery's (:data:`celeriac.exceptions.CELERY_COMPATIBLE`) are written under
    ``celery.exceptions`` so a Celery client re-raises its own class. A
    :class:`~celeriac.exceptions.RemoteTaskError` is written as the remote exception it stands for,
    so passing it on (e.g. down a failed chain) does not lose the original type.
    """
    if isinstance(exc, exceptions.RemoteTaskError):
        args = exc.exc_args
        return {
            "exc_type": exc.exc_type,
            "exc_message": ensure_serializable(list(args) if isinstance(args, tuple) else args),
            "exc_module": exc.exc_module,
        }
    cls = type(exc)
    module = cls.__module__
    if (
        module == _CELERIAC_EXCEPTIONS_MODULE
        and exceptions.CELERY_COMPATIBLE.get(cls.__name__) is cls
    ):
        module = CELERY_EXCEPTIONS_MODULE
    return {
        "exc_type": cls.__qualname__,
        "exc_message": [ensure_serializable(arg) for arg in exc.args],
        "exc_module": module,
    }


# -- exceptions: reading -------------------------------------------------------------------------


def exception_from_meta(value: Any) -> BaseException:
    """Rebuild the exception a result document describes, without importing anything.

    Resolution of ``exc_module`` / ``exc_type``:

    * ``builtins`` — the built-in class of that name;
    * ``celery.exceptions`` (or ``billiard.exceptions`` for the time-limit and worker-lost errors)
      with a name in :data:`~celeriac.exceptions.CELERY_COMPATIBLE` — the celeriac class;
    * ``celeriac.exceptions`` — the celeriac class of that name;
    * any other module **already in** ``sys.modules`` — the dotted ``exc_type`` looked up in the
      module's and classes' own namespaces (no ``__getattr__`` hooks, which could import);
    * anything else — :class:`~celeriac.exceptions.RemoteTaskError`.

    Only ``Exception`` subclasses are rebuilt: re-raising a ``SystemExit``, ``KeyboardInterrupt`` or
    ``asyncio.CancelledError`` named by a stored document would stop or cancel the reader instead of
    reporting the task's failure. The instance is ``cls(*exc_message)`` for a list or tuple, else
    ``cls(exc_message)``; if that raises, :class:`RemoteTaskError` again. An exception object
    (results stored with pickle) is returned as is. This function never raises.
    """
    if isinstance(value, BaseException):
        return value
    if not isinstance(value, Mapping):
        return exceptions.RemoteTaskError(
            "UnknownError",
            None,
            [f"stored failure is not an exception document: {_short_repr(value)}"],
        )
    exc_type = value.get("exc_type")
    exc_module = value.get("exc_module")
    # Arguments are passed on as decoded (a datetime stays a datetime, as in Celery); they only
    # reach a class that is already loaded and is an exception class.
    exc_message = value.get("exc_message", [])
    if not isinstance(exc_type, str) or not exc_type:
        return exceptions.RemoteTaskError(
            "UnknownError",
            exc_module if isinstance(exc_module, str) else None,
            [f"exception document without a valid exc_type: {_short_repr(dict(value))}"],
        )
    module = exc_module if isinstance(exc_module, str) else None
    cls = _resolve_class(module, exc_type)
    if cls is None:
        return exceptions.RemoteTaskError(exc_type, module, exc_message)
    try:
        if isinstance(exc_message, list | tuple):
            return cls(*exc_message)
        return cls(exc_message)
    except Exception:  # wrong arity or a picky __init__: still report what failed remotely
        return exceptions.RemoteTaskError(exc_type, module, exc_message)


def _resolve_class(module: str | None, qualname: str) -> type[Exception] | None:
    """The already-loaded exception class ``module.qualname``, or None. Never imports."""
    found: Any = None
    if module == "builtins":
        found = vars(builtins).get(qualname)
    elif module == CELERY_EXCEPTIONS_MODULE and qualname in exceptions.CELERY_COMPATIBLE:
        found = exceptions.CELERY_COMPATIBLE[qualname]
    elif module == "billiard.exceptions" and qualname in _BILLIARD_ALIASES:
        found = _BILLIARD_ALIASES[qualname]
    elif module == _CELERIAC_EXCEPTIONS_MODULE:
        found = vars(exceptions).get(qualname)
    elif module is not None and module in sys.modules:
        found = _lookup_loaded(sys.modules[module], qualname)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return None


def _lookup_loaded(root: types.ModuleType, qualname: str) -> Any:
    """Walk ``Outer.Inner`` through ``__dict__`` only.

    ``getattr`` could run a module-level ``__getattr__`` (PEP 562), which lazy-loading packages use
    to import submodules on first access; reading namespaces directly cannot import anything.
    """
    obj: Any = root
    for part in qualname.split("."):
        namespace = getattr(obj, "__dict__", None)
        if not isinstance(namespace, Mapping):  # also true of a class's mappingproxy
            return None
        obj = namespace.get(part)
        if obj is None:
            return None
    return obj
