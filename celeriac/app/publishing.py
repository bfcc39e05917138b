"""Retrying a publish while the broker is unreachable, with Celery's retry policy.

Celery's settings and call options keep their names and meanings: ``task_publish_retry`` (on by
default) and ``task_publish_retry_policy`` — ``max_retries`` (3), ``interval_start`` (0 s),
``interval_step`` (0.2 s), ``interval_max`` (0.2 s) — and per call ``apply_async(retry=...,
retry_policy=...)``. A publish that still fails after the last retry raises
:class:`~celeriac.exceptions.PublishError`; it never reports success for a message the broker does
not hold. A :class:`~celeriac.exceptions.RoutingError` (no queue bound) is not retried: waiting does
not create a queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from celeriac.exceptions import ConnectionError, ImproperlyConfigured, PublishError, RoutingError

logger = logging.getLogger("celeriac.app")


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """How often and how patiently a publish is retried (Celery's ``retry_policy`` keys)."""

    #: Retries after the first attempt; None retries for ever.
    max_retries: int | None = 3
    interval_start: float = 0.0
    interval_step: float = 0.2
    interval_max: float = 0.2

    def pauses(self) -> Iterator[float]:
        """The pause before each retry, in order (endless when ``max_retries`` is None)."""
        pause = self.interval_start
        count = 0
        while self.max_retries is None or count < self.max_retries:
            yield min(pause, self.interval_max)
            pause += self.interval_step
            count += 1


#: No retries: one attempt.
NO_RETRY = RetryPolicy(max_retries=0)

_KEYS = ("max_retries", "interval_start", "interval_step", "interval_max")


def parse_retry_policy(value: Any, name: str) -> RetryPolicy:
    """A :class:`RetryPolicy` from Celery's dict form; an unknown or bad key is an error."""
    if isinstance(value, RetryPolicy):
        return value
    if not isinstance(value, Mapping):
        raise ImproperlyConfigured(f"{name} must be a dict of {list(_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        # Celery also takes retry_errors; celeriac decides what is transient itself.
        raise ImproperlyConfigured(f"{name} has unknown key(s) {unknown}; known: {list(_KEYS)}")
    fields: dict[str, Any] = {}
    for key in _KEYS:
        if key not in value:
            continue
        item = value[key]
        if key == "max_retries":
            if item is not None and (
                isinstance(item, bool) or not isinstance(item, int) or item < 0
            ):
                raise ImproperlyConfigured(
                    f"{name}['max_retries'] must be an integer >= 0 or None, got {item!r}"
                )
        elif (
            isinstance(item, bool)
            or not isinstance(item, int | float)
            or not math.isfinite(item)
            or item < 0
        ):
            raise ImproperlyConfigured(f"{name}[{key!r}] must be seconds >= 0, got {item!r}")
        fields[key] = item
    return RetryPolicy(**fields)


async def publish_with_retry(
    attempt: Callable[[], Awaitable[None]], policy: RetryPolicy, what: str
) -> None:
    """Run ``attempt`` until it succeeds, retrying transient broker errors per ``policy``."""
    pauses = policy.pauses()
    tries = 0
    while True:
        tries += 1
        try:
            await attempt()
            return
        except RoutingError:
            raise
        except (ConnectionError, PublishError) as exc:
            await asyncio.sleep(_pause_after(exc, pauses, tries, policy, what))


def publish_with_retry_sync(attempt: Callable[[], None], policy: RetryPolicy, what: str) -> None:
    """:func:`publish_with_retry` for an ``attempt`` that blocks (a synchronous caller's)."""
    pauses = policy.pauses()
    tries = 0
    while True:
        tries += 1
        try:
            attempt()
            return
        except RoutingError:
            raise
        except (ConnectionError, PublishError) as exc:
            time.sleep(_pause_after(exc, pauses, tries, policy, what))


def _pause_after(
    exc: ConnectionError | PublishError,
    pauses: Iterator[float],
    tries: int,
    policy: RetryPolicy,
    what: str,
) -> float:
    """The pause before the next try after ``exc`` (logged), or the error to raise when the
    policy allows no more tries."""
    pause = next(pauses, None)
    if pause is None:
        if tries == 1 and isinstance(exc, PublishError):
            raise exc
        after = f" after {tries} attempts" if tries > 1 else ""
        raise PublishError(f"could not publish {what}{after}; it was not sent: {exc}") from exc
    logger.warning(
        "Publishing %s failed (%s); retrying in %.2fs (%d/%s).",
        what,
        exc,
        pause,
        tries,
        policy.max_retries if policy.max_retries is not None else "∞",
    )
    return pause
