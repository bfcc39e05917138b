"""Rates as Celery writes them (``"10/m"``), and the arithmetic of a rate limit.

:func:`parse_rate` reads a ``rate_limit`` the way Celery's ``celery.utils.time.rate`` does: a number
is tasks per second, and a string is ``"<number>"`` or ``"<number>/<unit>"`` with the unit ``s``,
``m`` or ``h``. ``None``, ``""`` and zero mean *no limit*, as in Celery. Unlike Celery, which lets a
``KeyError`` or ``ValueError`` escape from deep inside the worker, anything else (an unknown unit,
a negative, infinite or non-numeric count) is refused with an error that names the setting and
shows the accepted forms.

:func:`gcra` is the one rule every limiter store applies: the *generic cell rate algorithm*, a
token bucket kept as a single timestamp. With ``burst=1`` it is exactly the bucket Celery's
consumer uses (kombu's ``TokenBucket`` with capacity 1, full at first): the first grant is
immediate, and after it grants are at least ``1 / rate`` seconds apart. A store keeps, per key,
the *theoretical arrival time* (TAT) of the next grant; one timestamp per key is what lets a
shared store (a Redis key, a SQLite row) decide a grant in one atomic step.
"""

from __future__ import annotations

import math
from typing import Any

from celeriac.exceptions import ImproperlyConfigured

#: Seconds per unit of a rate string (Celery's ``RATE_MODIFIER_MAP``).
UNITS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0}

#: Where a limit holds: ``"worker"`` (each worker on its own, Celery's meaning) or ``"cluster"``
#: (every worker together, through the store they share).
SCOPES = ("worker", "cluster")

_FORMS = "a number of tasks per second, or a string 'N/s', 'N/m' or 'N/h' (e.g. '10/m')"


def parse_rate(value: Any, what: str) -> float | None:
    """Tasks per second of a ``rate_limit`` value; None for no limit (None, ``""``, or zero).

    ``what`` names the setting in the error, e.g. ``"rate_limit of task tasks.add"``.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{what} must be {_FORMS}, not {value!r}")
    if isinstance(value, int | float):
        count, per = float(value), 1.0
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        number, slash, unit = text.partition("/")
        unit = unit.strip()
        if slash and unit not in UNITS:
            raise ImproperlyConfigured(
                f"{what}: unknown unit {unit!r} in {value!r}; the unit is s, m or h ({_FORMS})"
            )
        try:
            count = float(number)
        except ValueError:
            raise ImproperlyConfigured(f"{what} must be {_FORMS}, not {value!r}") from None
        per = UNITS[unit] if slash else 1.0
    else:
        raise ImproperlyConfigured(f"{what} must be {_FORMS}, not {value!r}")
    if not math.isfinite(count) or count < 0:
        raise ImproperlyConfigured(
            f"{what}: the number of tasks must be finite and not negative, got {value!r}"
        )
    if count == 0:
        return None  # Celery's reading: a zero rate is no limit
    return count / per


def check_scope(value: Any, what: str) -> str:
    """A ``rate_limit_scope``: ``"worker"`` or ``"cluster"``."""
    if value not in SCOPES:
        raise ImproperlyConfigured(
            f"{what} must be 'worker' (each worker on its own) or 'cluster' (every worker "
            f"together), not {value!r}"
        )
    return str(value)


def gcra(tat: float | None, now: float, interval: float, burst: int) -> tuple[float | None, float]:
    """One request for a grant: ``(new TAT to store, 0.0)`` if granted, else ``(None, wait)``.

    ``tat`` is the stored theoretical arrival time (None when nothing is stored, e.g. expired),
    ``now`` the store's clock, ``interval`` ``1 / rate`` seconds and ``burst`` how many grants may
    be taken at once after a pause (1: Celery's bucket). A refusal changes nothing, so a caller
    that gives up (defers the message, shuts down) wastes no capacity; ``wait`` is the time until
    the next grant is free.

    A TAT further ahead than a full burst cannot come from this rule on a steady clock; it means
    the clock went back, and is taken as a full burst, so a clock step cannot stall a task for the
    length of the step.
    """
    if tat is None or tat < now:
        tat = now
    tat = min(tat, now + burst * interval)
    allowed_at = tat - (burst - 1) * interval
    if now < allowed_at:
        return None, allowed_at - now
    return tat + interval, 0.0


def check_request(key: Any, rate: Any, burst: Any) -> None:
    """Refuse arguments of a limiter store's ``acquire`` that no limit can have."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a rate limit key must be a non-empty string, not {key!r}")
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise ValueError(f"a rate must be a positive number of grants per second, not {rate!r}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"a burst must be an integer >= 1, not {burst!r}")
