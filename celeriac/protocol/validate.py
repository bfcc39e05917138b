"""Strict validation of a decoded task message, field by field, into a :class:`TaskMessage`.

Both protocol readers end here with v2-shaped parts (headers, properties, args, kwargs, embed), so
the rules are written once. Everything is checked before any user code runs, and every failure is an
:class:`~celeriac.exceptions.InvalidTaskError` that names the field and shows (a bounded repr of)
the offending value: a worker rejects such a message instead of crashing on it later.

Where a real Celery 5.7 worker accepts a value, so does this module (an empty ``eta`` means "none",
``group``/``parent_id`` may be null, ``embed`` may be null); where Celery would fail later, in the
pool or with an unhelpful error (args not a list, ``timelimit`` of the wrong shape, an eta that is
not a date), the message is refused here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any

from celeriac.exceptions import InvalidTaskError
from celeriac.protocol.message import SignatureDict, TaskMessage
from celeriac.protocol.saferepr import saferepr
from celeriac.protocol.times import as_utc, parse_iso8601

__all__ = ["build_message", "check_outgoing"]

#: Headers that map onto :class:`TaskMessage` fields.
MODEL_HEADERS = frozenset(
    {
        "task",
        "id",
        "shadow",
        "eta",
        "expires",
        "group",
        "group_index",
        "retries",
        "timelimit",
        "root_id",
        "parent_id",
        "argsrepr",
        "kwargsrepr",
        "origin",
        "ignore_result",
    }
)

#: Headers that never reach ``extra_headers``: ``lang`` is rewritten by every producer (a retry
#: published by celeriac is Python, whoever sent the original); ``redelivered`` and
#: ``compression`` belong to kombu's transport layer, not to the task.
DROPPED_HEADERS = frozenset({"lang", "redelivered", "compression"})

#: Celery 5.3+ headers that :func:`celeriac.protocol.v2.to_v2` writes with these defaults. They are
#: kept in ``extra_headers`` only when they carry something else (a stamped or replaced task), so
#: that the common message has empty ``extra_headers`` and still re-encodes to the same headers.
DEFAULTED_HEADERS: Mapping[str, Any] = {
    "replaced_task_nesting": 0,
    "stamped_headers": None,
    "stamps": {},
}


_NOT_EXTRA = MODEL_HEADERS | DROPPED_HEADERS


def _invalid(field: str, expected: str, value: Any) -> InvalidTaskError:
    shown = saferepr(value, maxlen=100)
    return InvalidTaskError(
        f"task message field {field!r} must be {expected}, got {type(value).__name__} {shown}"
    )


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True is never a sensible retry count or index.
    return isinstance(value, int) and not isinstance(value, bool)


def _required_str(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid(field, "a non-empty string", value)
    return value


def _optional_str(field: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _invalid(field, "a string or null", value)


def _optional_bool(field: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise _invalid(field, "true, false or null", value)


def _optional_index(field: str, value: Any) -> int | None:
    if value is None or (_is_int(value) and value >= 0):
        return value  # type: ignore[no-any-return]
    raise _invalid(field, "an integer >= 0 or null", value)


def _retries(value: Any) -> int:
    if _is_int(value) and value >= 0:
        return value  # type: ignore[no-any-return]
    raise _invalid("retries", "an integer >= 0", value)


def _timelimit(value: Any) -> tuple[float | None, float | None]:
    if value is None:
        return (None, None)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _invalid("timelimit", "[hard, soft] (a 2-element list) or null", value)
    hard, soft = value
    for name, limit in (("hard", hard), ("soft", soft)):
        if limit is None:
            continue
        if (
            not isinstance(limit, int | float)
            or isinstance(limit, bool)
            or not math.isfinite(limit)
            or limit < 0
        ):
            raise _invalid(f"timelimit ({name})", "a number of seconds >= 0 or null", limit)
    return (hard, soft)


def _when(field: str, value: Any, naive_tz: tzinfo | None) -> datetime | None:
    """eta/expires: ISO-8601 text (or a datetime, which pickle/yaml bodies can carry)."""
    # Celery's maybe_iso8601 treats any false value as "no time"; an empty string is common in
    # hand-written messages, so it means "none" here too.
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            parsed = parse_iso8601(value)
        except ValueError:
            raise _invalid(field, "an ISO-8601 timestamp or null", value) from None
    elif isinstance(value, datetime):
        parsed = value
    else:
        raise _invalid(field, "an ISO-8601 timestamp or null", value)
    try:
        return as_utc(parsed, naive_tz)
    except (OverflowError, ValueError):  # e.g. year 1 minus a positive offset
        raise _invalid(field, "a timestamp representable in UTC", value) from None


def _args(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    raise _invalid("args", "a list", value)


def _kwargs(value: Any) -> dict[str, Any]:
    if type(value) is not dict and not isinstance(value, Mapping):  # type() first: cheaper
        raise _invalid("kwargs", "an object (a mapping of names to values)", value)
    for key in value:
        if not isinstance(key, str):
            raise _invalid("kwargs", "a mapping with string keys", key)
    return value if type(value) is dict else dict(value)


def _signature(field: str, value: Any) -> SignatureDict:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _invalid(field, "a signature object (a mapping with string keys)", value)
    # Signature objects (dict subclasses) arrive from pickle bodies; keep the model plain.
    return value if type(value) is dict else dict(value)


def _optional_signature(field: str, value: Any) -> SignatureDict | None:
    return None if value is None else _signature(field, value)


def _optional_signatures(field: str, value: Any) -> list[SignatureDict] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise _invalid(field, "a list of signature objects or null", value)
    return [_signature(f"{field}[{i}]", item) for i, item in enumerate(value)]


def _optional_priority(value: Any) -> int | None:
    if value is None or (_is_int(value) and 0 <= value <= 255):
        return value  # type: ignore[no-any-return]
    raise _invalid("priority", "an integer 0-255 or null", value)


def _delivery_mode(value: Any) -> int:
    if value is None:
        return 2
    if _is_int(value) and value in (1, 2):
        return value  # type: ignore[no-any-return]
    raise _invalid("delivery_mode", "1 (transient), 2 (persistent) or null", value)


#: Every header that never reaches ``extra_headers`` when it has its usual value.
_USUAL_HEADERS = _NOT_EXTRA | frozenset(DEFAULTED_HEADERS)
_NO_STAMPS: dict[str, Any] = {}


def _extra_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    # The message every Celery and celeriac client writes: only the headers above, the stamping
    # ones at their defaults (compared as the loop below compares them). One set test instead of
    # a lookup per header.
    if (
        type(headers) is dict
        and headers.keys() <= _USUAL_HEADERS
        and headers.get("replaced_task_nesting", 0) == 0
        and headers.get("stamped_headers") is None
        and headers.get("stamps", _NO_STAMPS) == _NO_STAMPS
    ):
        return {}
    extra: dict[str, Any] = {}
    for key, value in headers.items():
        if key in _NOT_EXTRA:  # every header of the common message: one lookup each
            continue
        if not isinstance(key, str):
            raise _invalid("headers", "a mapping with string keys", key)
        if key in DEFAULTED_HEADERS and value == DEFAULTED_HEADERS[key]:
            continue
        extra[key] = value
    return extra


#: What a missing embed stands for (only read).
_NO_EMBED: Mapping[str, Any] = {}


def build_message(
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    args: Any,
    kwargs: Any,
    embed: Any,
    *,
    protocol: int,
    naive_tz: tzinfo | None = UTC,
) -> TaskMessage:
    """Validate v2-shaped parts and build the message; raise InvalidTaskError naming the field.

    ``naive_tz`` is the zone of timestamps that carry no offset: UTC for protocol v2; for a v1
    body sent with ``utc: false`` the sender's local zone (``None`` = this system's zone).
    """
    # This runs for every message a worker receives, so each field's usual value (decoded JSON:
    # exact types) is accepted inline, and anything else goes to the field's validator, which
    # accepts the rest of what is valid or raises. Fields are taken in one fixed order, so the
    # field a refusal names does not depend on which of them took the inline path.
    if embed is None:
        embed = _NO_EMBED
    elif type(embed) is not dict and not isinstance(embed, Mapping):
        raise _invalid("embed", "an object with callbacks/errbacks/chain/chord, or null", embed)
    # Unknown embed keys are tolerated, as Celery tolerates them (it merges them into the request
    # context); the model has nowhere to keep them and no worker behaviour depends on them.
    get = headers.get
    task_id = get("id")
    if type(task_id) is not str or not task_id:
        task_id = _required_str("id", task_id)
    task = get("task")
    if type(task) is not str or not task:
        task = _required_str("task", task)
    if type(args) is not list:
        args = _args(args)
    if type(kwargs) is not dict or kwargs:  # a non-empty dict: its keys are checked
        kwargs = _kwargs(kwargs)
    eta = get("eta")
    if eta is not None:
        eta = _when("eta", eta, naive_tz)
    expires = get("expires")
    if expires is not None:
        expires = _when("expires", expires, naive_tz)
    retries = get("retries", 0)
    if type(retries) is not int or retries < 0:
        retries = _retries(retries)
    limits = get("timelimit")
    if limits is None or (
        type(limits) is list and len(limits) == 2 and limits[0] is None and limits[1] is None
    ):
        timelimit: tuple[float | None, float | None] = (None, None)
    else:
        timelimit = _timelimit(limits)
    root_id = get("root_id")
    if root_id is not None and type(root_id) is not str:
        root_id = _optional_str("root_id", root_id)
    parent_id = get("parent_id")
    if parent_id is not None and type(parent_id) is not str:
        parent_id = _optional_str("parent_id", parent_id)
    group = get("group")
    if group is not None and type(group) is not str:
        group = _optional_str("group", group)
    group_index = get("group_index")
    if group_index is not None and (type(group_index) is not int or group_index < 0):
        group_index = _optional_index("group_index", group_index)
    shadow = get("shadow")
    if shadow is not None and type(shadow) is not str:
        shadow = _optional_str("shadow", shadow)
    origin = get("origin")
    if origin is not None and type(origin) is not str:
        origin = _optional_str("origin", origin)
    ignore_result = get("ignore_result")
    if ignore_result is not None and ignore_result is not True and ignore_result is not False:
        ignore_result = _optional_bool("ignore_result", ignore_result)
    argsrepr = get("argsrepr")
    if argsrepr is not None and type(argsrepr) is not str:
        argsrepr = _optional_str("argsrepr", argsrepr)
    kwargsrepr = get("kwargsrepr")
    if kwargsrepr is not None and type(kwargsrepr) is not str:
        kwargsrepr = _optional_str("kwargsrepr", kwargsrepr)
    callbacks = embed.get("callbacks")
    if callbacks is not None:
        callbacks = _optional_signatures("callbacks", callbacks)
    errbacks = embed.get("errbacks")
    if errbacks is not None:
        errbacks = _optional_signatures("errbacks", errbacks)
    chain = embed.get("chain")
    if chain is not None:
        chain = _optional_signatures("chain", chain)
    chord = embed.get("chord")
    if chord is not None:
        chord = _optional_signature("chord", chord)
    pget = properties.get
    reply_to = pget("reply_to")
    if reply_to is not None and type(reply_to) is not str:
        reply_to = _optional_str("reply_to", reply_to)
    correlation_id = pget("correlation_id")
    if correlation_id is not None and type(correlation_id) is not str:
        correlation_id = _optional_str("correlation_id", correlation_id)
    priority = pget("priority")
    if priority is not None and (type(priority) is not int or not 0 <= priority <= 255):
        priority = _optional_priority(priority)
    delivery_mode = pget("delivery_mode")
    if type(delivery_mode) is not int or delivery_mode not in (1, 2):
        delivery_mode = _delivery_mode(delivery_mode)
    extra_headers = _extra_headers(headers)
    # Positional, in the dataclass's field order: a call with 27 keywords costs more than all
    # the checks above (tests compare every field with the message that was encoded).
    return TaskMessage(
        task_id,
        task,
        args,
        kwargs,
        eta,
        expires,
        retries,
        timelimit,
        root_id,
        parent_id,
        group,
        group_index,
        shadow,
        origin,
        ignore_result,
        argsrepr,
        kwargsrepr,
        callbacks,
        errbacks,
        chain,
        chord,
        # reply_to "" is how Celery writes "no reply queue".
        reply_to or None,
        correlation_id,
        priority,
        delivery_mode,
        extra_headers,
        protocol,
    )


def check_outgoing(msg: TaskMessage) -> None:
    """Refuse, before publishing, a message that no worker could read back.

    The dataclass is typed, so only what typing cannot express is checked here: non-empty id and
    name, the container types (an untyped caller may pass anything), and custom headers that
    would silently overwrite a protocol header when merged at the top level.
    """
    _required_str("id", msg.id)
    _required_str("task", msg.task)
    if not isinstance(msg.args, list | tuple):
        raise _invalid("args", "a list", msg.args)
    _kwargs(msg.kwargs)
    _retries(msg.retries)
    _timelimit(msg.timelimit)
    for key in msg.extra_headers:
        if key in MODEL_HEADERS or key in DROPPED_HEADERS:
            raise InvalidTaskError(
                f"extra header {key!r} would overwrite the protocol header of the same name; "
                "set the TaskMessage field instead"
            )
