"""The request context a bound task sees as ``self.request`` (Celery's ``Context``).

It lives in a :class:`contextvars.ContextVar`, so ``async def`` tasks running side by side on one
event loop and sync tasks on worker threads each see their own request.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(slots=True)
class Context:
    """What is known about the task invocation being run."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    eta: datetime | None = None
    expires: datetime | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    origin: str | None = None
    hostname: str | None = None
    #: ``{"exchange", "routing_key", "priority", "redelivered"}`` as Celery gives it.
    delivery_info: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    callbacks: list[dict[str, Any]] | None = None
    errbacks: list[dict[str, Any]] | None = None
    chain: list[dict[str, Any]] | None = None
    chord: dict[str, Any] | None = None
    timelimit: tuple[float | None, float | None] = (None, None)
    ignore_result: bool = False
    is_eager: bool = False
    #: 1 on the first delivery of the message, counted up on redelivery.
    delivery_count: int = 1

    def get(self, name: str, default: Any = None) -> Any:
        """Dict-style read, as Celery's Context allows."""
        return getattr(self, name, default)


#: The request of the task running in the current thread / asyncio task; None outside tasks.
current_request: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "celeriac_current_request", default=None
)
