"""Where a task message goes: queue, exchange and routing key, decided as Celery decides.

Order of precedence: options given to ``apply_async`` > ``task_routes`` > the task's own
``queue``/``exchange``/``routing_key`` options > ``task_default_queue``. Like Celery, a message for
a queue on the default (direct) exchange is published to the anonymous exchange ``""`` with the
queue's name as routing key (celery-wire.md §2.6).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from celeriac.exceptions import ImproperlyConfigured

Router = Callable[..., Mapping[str, Any] | str | None]


@dataclass(slots=True, frozen=True)
class Route:
    """The destination of one message."""

    queue: str
    exchange: str
    routing_key: str


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _lookup_mapping(routes: Mapping[Any, Any], name: str) -> Mapping[str, Any] | str | None:
    if name in routes:
        found: Mapping[str, Any] | str | None = routes[name]
        return found
    for pattern, route in routes.items():
        if isinstance(pattern, re.Pattern):
            if pattern.match(name):
                return route  # type: ignore[no-any-return]
        elif (
            isinstance(pattern, str)
            and any(c in pattern for c in "*?[")
            and _glob(pattern).match(name)
        ):
            return route  # type: ignore[no-any-return]
    return None


def lookup_route(
    routes: Any,
    name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The first route in ``task_routes`` that matches ``name``, as a dict (empty: no route)."""
    if routes is None:
        return {}
    candidates = routes if isinstance(routes, list | tuple) else [routes]
    for entry in candidates:
        if isinstance(entry, Mapping):
            found = _lookup_mapping(entry, name)
        elif callable(entry):
            found = entry(name, args, kwargs, options, task=None)
        else:
            raise ImproperlyConfigured(f"task_routes entry {entry!r} is not a dict or a callable")
        if found is None:
            continue
        if isinstance(found, str):
            return {"queue": found}
        if isinstance(found, Mapping):
            return dict(found)
        raise ImproperlyConfigured(f"route for {name!r} must be a dict or a queue name: {found!r}")
    return {}


def resolve(
    *,
    queue: str | None,
    exchange: str | None,
    routing_key: str | None,
    default_queue: str,
) -> Route:
    """Turn the chosen options into a concrete destination."""
    if exchange:
        # A named exchange: the routing key decides (Celery publishes to the exchange itself).
        key = routing_key or queue or default_queue
        return Route(queue=queue or key, exchange=exchange, routing_key=key)
    name = queue or routing_key or default_queue
    return Route(queue=name, exchange="", routing_key=name)
