"""Protocol detection: one decoded message (headers, properties, body) to a :class:`TaskMessage`.

The rule is Celery 5's (``on_task_received`` in ``celery/worker/consumer/consumer.py``): a ``task``
header means protocol v2; without it the body is read as a protocol v1 dict. Anything else is an
:class:`~celeriac.exceptions.InvalidTaskError`, so the worker rejects the message instead of
running it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import tzinfo
from typing import Any

from celeriac.exceptions import InvalidTaskError
from celeriac.protocol.message import TaskMessage
from celeriac.protocol.v1 import from_v1
from celeriac.protocol.v2 import from_v2

__all__ = ["from_wire_parts"]


def from_wire_parts(
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    body: Any,
    *,
    local_tz: tzinfo | None = None,
) -> TaskMessage:
    """Build the message from its decoded parts, detecting v1/v2 exactly as Celery does.

    ``body`` is the *deserialized* body. ``local_tz`` only matters for v1 bodies sent with
    ``utc: false`` (``None``: this system's zone). Raises InvalidTaskError with the reason.
    """
    # type() first: decoded JSON is plain dicts, and the ABC check costs more than the rest.
    if type(headers) is not dict and not isinstance(headers, Mapping):
        raise InvalidTaskError(f"message headers must be a mapping, got {type(headers).__name__}")
    if type(properties) is not dict and not isinstance(properties, Mapping):
        raise InvalidTaskError(
            f"message properties must be a mapping, got {type(properties).__name__}"
        )
    if "task" in headers:
        return from_v2(headers, properties, body)
    return from_v1(headers, properties, body, local_tz=local_tz)
