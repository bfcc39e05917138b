"""The targets celeriac must reach, as set when the benchmark was specified, and their checks.

Broker-specific targets name their broker. The enqueue and round-trip targets were set against
Celery's figures measured on local Redis with results stored, so they are checked on Redis only;
the I/O-bound and memory targets are properties of the worker and are checked on every broker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Target:
    """What a row must show: ``check(celeriac, celery)`` over the row's two figures."""

    text: str
    check: Callable[[float, float | None], bool | None]


def _at_least(value: float) -> Callable[[float, float | None], bool]:
    return lambda mine, _: mine >= value


def _at_most(value: float) -> Callable[[float, float | None], bool]:
    return lambda mine, _: mine <= value


def _times_celery(
    factor: float, floor: float = 0.0
) -> Callable[[float, float | None], bool | None]:
    def check(mine: float, celery: float | None) -> bool | None:
        if celery is None or celery <= 0:
            return None  # nothing to compare with
        return mine >= factor * celery and mine >= floor

    return check


ANY = "*"

#: (metric key, broker or ANY) → target.
TARGETS: dict[tuple[str, str], Target] = {
    ("drain", "redis"): Target("≥ 5,000/s and ≥ 10x Celery", _times_celery(10, 5_000)),
    ("drain", "rabbitmq"): Target("≥ 5x Celery", _times_celery(5)),
    ("drain", "sqlite"): Target("≥ 2,000/s", _at_least(2_000)),
    ("delay", "redis"): Target("≥ 2.5x Celery", _times_celery(2.5)),
    ("group", "redis"): Target("≥ 20,000/s", _at_least(20_000)),
    ("roundtrip_p50", "redis"): Target("≤ 1 ms", _at_most(1.0)),
    ("roundtrip_p99", "redis"): Target("≤ 3 ms", _at_most(3.0)),
    ("io_share", ANY): Target("≥ 90 %", _at_least(90.0)),
    ("io_rss", ANY): Target("≤ 100 MB", _at_most(100.0)),
    ("idle_rss", ANY): Target("≤ 50 MB", _at_most(50.0)),
    ("rss_growth", ANY): Target("≤ 10 %", _at_most(10.0)),
}


def target_for(metric: str, broker: str) -> Target | None:
    return TARGETS.get((metric, broker)) or TARGETS.get((metric, ANY))
