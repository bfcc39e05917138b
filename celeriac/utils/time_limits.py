"""Checking time limits where they are given: settings, ``@app.task``, ``apply_async``, the worker.

A time limit is a positive, finite number of seconds, or None for "no limit". Anything else is an
error where it is written, never a limit that silently does nothing (Celery lets a string or a
negative number through to the pool, where it fails obscurely or is ignored).
"""

from __future__ import annotations

import math
from typing import Any

from celeriac.exceptions import ImproperlyConfigured


def check_limit(value: Any, what: str) -> float | None:
    """``value`` in seconds (None stays None), or a clear error naming ``what``."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ImproperlyConfigured(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def check_pair(hard: float | None, soft: float | None, where: str) -> None:
    """Refuse a soft limit above the hard one given with it (Celery raises ValueError)."""
    if hard is not None and soft is not None and soft > hard:
        raise ImproperlyConfigured(
            f"{where}: soft_time_limit ({soft:g}s) must not be more than time_limit ({hard:g}s)"
        )
