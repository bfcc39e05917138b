"""Task message protocol v1 (Celery 3 and ``task_protocol = 1``): read only.

In v1 everything lives in the body, a dict (celery-wire.md §3)::

    {"task": "tasks.add", "id": "…", "args": [2, 3], "kwargs": {}, "retries": 0,
     "eta": null, "expires": null, "utc": true, "callbacks": null, "errbacks": null,
     "timelimit": [null, null], "taskset": null, "chord": null, "group": null, "group_index": null}

It is converted the way a Celery 5 worker converts it (``hybrid_to_proto2`` in
``celery/worker/strategy.py``): v2 headers are synthesized from the body's keys, then overlaid with
the message's real headers (usually ``{}``); the embed gets callbacks, errbacks and chord (v1
cannot carry a chain). Two additions, both harmless for messages Celery itself writes: the legacy
``taskset`` key stands in for a missing ``group`` (Celery 3 wrote only ``taskset``), and
``group_index`` is read (Celery 5 writes it into v1 bodies too).

``utc: false`` means ``eta``/``expires`` without an offset are the sender's local time.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, tzinfo
from typing import Any

from celeriac.exceptions import InvalidTaskError
from celeriac.protocol.message import TaskMessage
from celeriac.protocol.saferepr import saferepr
from celeriac.protocol.validate import build_message

__all__ = ["from_v1"]

#: Body keys that become headers: Celery's hybrid_to_proto2 list (minus the never-sent ``meth``
#: and ``lang``, which the reader drops anyway), plus ``group_index``.
_HEADER_KEYS = (
    "task",
    "id",
    "root_id",
    "parent_id",
    "group",
    "group_index",
    "shadow",
    "eta",
    "expires",
    "retries",
    "timelimit",
    "argsrepr",
    "kwargsrepr",
    "origin",
)


def from_v1(
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    body: Any,
    *,
    local_tz: tzinfo | None = None,
) -> TaskMessage:
    """Read a v1 message whose body is already decoded; raise InvalidTaskError on a bad shape.

    ``local_tz`` is the zone of offset-less timestamps in a body sent with ``utc: false``
    (``None``: this system's local zone, which is what a Celery worker assumes).
    """
    if not isinstance(body, Mapping):
        raise InvalidTaskError(
            "message has no 'task' header (so it is not protocol v2) and its body is not a "
            f"protocol v1 object: got {type(body).__name__} {saferepr(body, maxlen=100)}"
        )
    if "task" not in body:
        raise InvalidTaskError(
            "message has no 'task' header (so it is not protocol v2) and its body has no 'task' "
            f"key (so it is not protocol v1 either); body keys: {sorted(map(str, body))}"
        )
    utc = body.get("utc", True)
    if not isinstance(utc, bool):
        raise InvalidTaskError(
            f"task message field 'utc' must be true or false, got {type(utc).__name__} "
            f"{saferepr(utc, maxlen=100)}"
        )
    synthesized = {key: body[key] for key in _HEADER_KEYS if key in body}
    if synthesized.get("group") is None and body.get("taskset") is not None:
        synthesized["group"] = body["taskset"]
    synthesized.update(headers)
    embed = {
        "callbacks": body.get("callbacks"),
        "errbacks": body.get("errbacks"),
        "chord": body.get("chord"),
        "chain": None,
    }
    return build_message(
        synthesized,
        properties,
        body.get("args", []),
        body.get("kwargs", {}),
        embed,
        protocol=1,
        naive_tz=UTC if utc else local_tz,
    )
