"""Scenario 1, drain: N tasks wait in the queue, then ONE worker process starts and runs them all.

The rate is counted from the first completion to the last (``date_done`` of the first and last
stored results), so the worker's start-up is excluded. Celery runs with each of its pools (solo,
prefork -c 2, threads) and the best is reported; celeriac with its defaults.
"""

from __future__ import annotations

import functools

from benchmarks.apps import config
from benchmarks.report import Row
from benchmarks.results import wait_for
from benchmarks.scenarios.common import (
    Context,
    Trials,
    arguments,
    attempt,
    measurement,
    notes,
    rate,
)
from benchmarks.sides import Pool, Side


def drain_once(context: Context, side: Side, pool: Pool, count: int) -> float:
    with measurement(context, side, "drain") as m:
        ids = m.publish(config.ADD, arguments(count))
        with m.worker(pool) as worker:
            wait_for(
                m.endpoint.reader,
                ids,
                stall_timeout=context.options.stall_timeout,
                alive=worker.check_alive,
                what="drain",
            )
        return rate(m.endpoint.reader.done_times(ids))


def run(context: Context) -> list[Row]:
    options = context.options
    trials = Trials(higher_is_better=True)
    for _ in range(options.repeat):
        for side in context.sides():
            for pool in side.drain_pools(options.quick):
                attempt(
                    context,
                    trials,
                    side,
                    pool,
                    "drain",
                    functools.partial(drain_once, context, side, pool, options.tasks),
                    "tasks/s",
                )
    mine_pool, mine = trials.best("celeriac")
    theirs_pool, theirs = trials.best("celery")
    row_notes = notes(context, trials)
    return [
        Row(
            metric="drain",
            title=f"drain {options.tasks:,} pre-queued",
            broker=context.broker,
            unit="tasks/s",
            higher_is_better=True,
            celeriac=mine,
            celery=theirs,
            celeriac_config=mine_pool,
            celery_config=theirs_pool,
            notes=row_notes,
            details={"tasks": options.tasks, **trials.details()},
        )
    ]
