"""Scenario 4, I/O-bound: tasks that each sleep ``io_sleep`` (100 ms), ``io_concurrency`` (500)
at once in ONE worker process.

celeriac's task is ``async def`` with ``asyncio.sleep`` (``-c 500``: 500 coroutines on one event
loop); Celery's is ``time.sleep`` in its threads pool (``-c 500``) and in its prefork pool (at most
``io_prefork_limit`` children: one process per concurrent task does not fit 500 on a small
machine); the better is reported.

The ceiling is ``concurrency / sleep`` tasks per second (5,000/s: 5,000 tasks need at least 1 s).
The achieved rate is ``tasks / (last completion - first completion + sleep)`` — the first task
started one sleep before it completed — reported as a share of the ceiling. Peak RSS is sampled
every 50 ms while the tasks run, the pool's child processes included: for prefork it is the sum over
its processes, as ``ps`` adds it up, so pages the children share are counted in each.
"""

from __future__ import annotations

import functools

from benchmarks.apps import config
from benchmarks.report import Row
from benchmarks.results import wait_for
from benchmarks.scenarios.common import Context, Trials, attempt, measurement, notes
from benchmarks.sides import Pool, Side
from benchmarks.workers import PeakRSS, rss_mb


def io_once(context: Context, side: Side, pool: Pool, peaks: Trials) -> float:
    """One run; the share of the ceiling in percent (the peak RSS goes to ``peaks``)."""
    options = context.options
    ceiling = options.io_concurrency / options.io_sleep
    with measurement(context, side, "io") as m:
        ids = m.publish(config.SLEEP, [(options.io_sleep,)] * options.io_tasks)
        with m.worker(pool) as worker, PeakRSS(worker) as sampler:
            wait_for(
                m.endpoint.reader,
                ids,
                stall_timeout=options.stall_timeout,
                alive=worker.check_alive,
                what="I/O-bound",
            )
        times = m.endpoint.reader.done_times(ids)
        achieved = len(times) / (max(times) - min(times) + options.io_sleep)
        peaks.add(side, pool, rss_mb(sampler.peak))
        return 100 * achieved / ceiling


def run(context: Context) -> list[Row]:
    options = context.options
    shares = Trials(higher_is_better=True)
    peaks = Trials(higher_is_better=False)
    for _ in range(options.repeat):
        for side in context.sides():
            pools = side.io_pools(options.io_concurrency, options.io_prefork_limit, options.quick)
            for pool in pools:
                attempt(
                    context,
                    shares,
                    side,
                    pool,
                    "I/O-bound",
                    functools.partial(io_once, context, side, pool, peaks),
                    "% of ceiling",
                )
    mine_pool, mine = shares.best("celeriac")
    theirs_pool, theirs = shares.best("celery")
    row_notes = notes(context, shares)
    ceiling = options.io_concurrency / options.io_sleep
    title = (
        f"I/O {options.io_tasks:,} x {options.io_sleep * 1000:.0f} ms @ {options.io_concurrency}"
    )
    details = {
        "tasks": options.io_tasks,
        "sleep": options.io_sleep,
        "concurrency": options.io_concurrency,
        "ceiling_tasks_per_s": ceiling,
    }
    return [
        Row(
            metric="io_share",
            title=f"{title}: % of {ceiling:,.0f}/s",
            broker=context.broker,
            unit="%",
            higher_is_better=True,
            celeriac=mine,
            celery=theirs,
            celeriac_config=mine_pool,
            celery_config=theirs_pool,
            notes=row_notes,
            details={**details, **shares.details()},
        ),
        Row(
            metric="io_rss",
            title=f"{title}: peak RSS",
            broker=context.broker,
            unit="MB",
            higher_is_better=False,
            celeriac=peaks.medians("celeriac").get(mine_pool),
            celery=peaks.medians("celery").get(theirs_pool),
            celeriac_config=mine_pool,
            celery_config=theirs_pool,
            details={**details, **peaks.details()},
        ),
    ]
