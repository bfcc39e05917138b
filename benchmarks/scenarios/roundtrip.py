"""Scenario 3, round trip: ``add.delay(1, 2).get()`` one after the other, a worker running.

``warmup`` untimed calls first (connections, pub/sub subscriptions, code paths warmed), then
``roundtrips`` timed ones; p50 and p99 in milliseconds. Celery tries the same pools as in the
drain, and the pool with the best p50 is reported (its p99 with it).
"""

from __future__ import annotations

import functools
import statistics
import time

from benchmarks.apps import config
from benchmarks.report import Row
from benchmarks.results import BenchmarkError
from benchmarks.scenarios.common import Context, Trials, attempt, measurement, notes
from benchmarks.sides import Pool, Side

#: Seconds one round trip may take before the measurement is abandoned.
GET_TIMEOUT = 10.0


def latencies(context: Context, side: Side, pool: Pool) -> list[float]:
    """The timed round trips, in milliseconds."""
    options = context.options
    with measurement(context, side, "roundtrip") as m, m.worker(pool) as worker:
        timings: list[float] = []
        for number in range(options.warmup + options.roundtrips):
            started = time.perf_counter()
            task_id, value = side.call(m.client, config.ADD, (number, 1), GET_TIMEOUT)
            elapsed = time.perf_counter() - started
            m.ids.append(task_id)
            if value != number + 1:
                raise BenchmarkError(f"add({number}, 1) returned {value!r}")
            if number >= options.warmup:
                timings.append(elapsed * 1000)
        worker.check_alive()
        return timings


def roundtrip_once(context: Context, side: Side, pool: Pool, out: list[float]) -> float:
    """The p50 in ms; every timing goes to ``out``."""
    out.extend(latencies(context, side, pool))
    return statistics.median(out)


def run(context: Context) -> list[Row]:
    options = context.options
    p50 = Trials(higher_is_better=False)
    p99 = Trials(higher_is_better=False)
    for _ in range(options.repeat):
        for side in context.sides():
            for pool in side.drain_pools(options.quick):
                timings: list[float] = []
                measure = functools.partial(roundtrip_once, context, side, pool, timings)
                if attempt(context, p50, side, pool, "round trip p50", measure, "ms") is not None:
                    p99.add(side, pool, statistics.quantiles(timings, n=100)[98])
    rows: list[Row] = []
    row_notes = notes(context, p50)
    mine_pool, _ = p50.best("celeriac")
    theirs_pool, _ = p50.best("celery")
    for metric, trials, name in (("roundtrip_p50", p50, "p50"), ("roundtrip_p99", p99, "p99")):
        mine = trials.medians("celeriac").get(mine_pool)
        theirs = trials.medians("celery").get(theirs_pool)
        rows.append(
            Row(
                metric=metric,
                title=f"round trip {name}",
                broker=context.broker,
                unit="ms",
                higher_is_better=False,
                celeriac=mine,
                celery=theirs,
                celeriac_config=mine_pool if mine is not None else "",
                celery_config=theirs_pool if theirs is not None else "",
                notes=row_notes if metric == "roundtrip_p50" else [],
                details={
                    "roundtrips": options.roundtrips,
                    "warmup": options.warmup,
                    **trials.details(),
                },
            )
        )
    return rows
