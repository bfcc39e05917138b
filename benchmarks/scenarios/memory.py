"""Scenario 5, memory: a worker's RSS when idle, and after it ran many tasks.

Idle: the worker is started, declares itself ready (``worker_ready``), is left alone for
``settle`` seconds, and its RSS is read — children included, for prefork. Celery's idle RSS is read
for its threads, solo and prefork -c 2 pools and the smallest is reported.

Growth: the same worker (celeriac's default pool; Celery's threads pool, as small as solo) then
runs ``memory_tasks`` ``add`` tasks, fed in windows (a quarter of the count, at most 10,000) so that
no more than two windows wait in the broker at once and publishing overlaps running; after the
last result is stored and ``settle`` seconds, RSS is read again.
Celery runs ``celery_memory_tasks`` (fewer by default: its drain is several times slower, and the
whole run must stay short); both counts are printed.
"""

from __future__ import annotations

import collections
import functools
import time

from benchmarks.apps import config
from benchmarks.report import Row
from benchmarks.results import BenchmarkError, wait_for
from benchmarks.scenarios.common import (
    Context,
    Measurement,
    Trials,
    arguments,
    attempt,
    measurement,
    notes,
)
from benchmarks.sides import Pool, Side
from benchmarks.workers import WorkerProcess, rss_mb

#: Most tasks per feeding window.
WINDOW = 10_000


def feed(m: Measurement, worker: WorkerProcess, total: int) -> None:
    """Publish ``total`` tasks in windows while the worker runs them; return when all are done."""
    options = m.context.options
    window = max(1, min(WINDOW, total // 4))
    waiting: collections.deque[list[str]] = collections.deque()
    sent = 0
    while sent < total or waiting:
        while sent < total and len(waiting) < 2:
            size = min(window, total - sent)
            waiting.append(m.publish(config.ADD, arguments(size, sent)))
            sent += size
        wait_for(
            m.endpoint.reader,
            waiting.popleft(),
            stall_timeout=options.stall_timeout,
            alive=worker.check_alive,
            what="memory",
        )


def memory_once(
    context: Context, side: Side, pool: Pool, tasks: int, out: dict[str, float]
) -> float:
    """Idle RSS in MB; with ``tasks``, the growth after them (``out["growth"]``, percent)."""
    options = context.options
    with measurement(context, side, "memory") as m, m.worker(pool) as worker:
        time.sleep(options.settle)
        before = worker.rss()
        if not before:
            raise BenchmarkError("the worker's RSS could not be read")
        if tasks:
            feed(m, worker, tasks)
            time.sleep(options.settle)
            after = worker.rss()
            out["growth"] = 100 * (after - before) / before
            out["after"] = rss_mb(after)
        return rss_mb(before)


def run(context: Context) -> list[Row]:
    options = context.options
    idle = Trials(higher_is_better=False)
    growth = Trials(higher_is_better=False)
    counts = {"celeriac": options.memory_tasks, "celery": options.celery_memory_tasks}
    for _ in range(options.repeat):
        for side in context.sides():
            for index, pool in enumerate(side.memory_pools(options.quick)):
                # The first pool also runs the tasks; the others are only measured idle.
                tasks = counts[side.name] if index == 0 else 0
                result: dict[str, float] = {}
                measure = functools.partial(memory_once, context, side, pool, tasks, result)
                figure = attempt(context, idle, side, pool, "idle RSS", measure, "MB")
                if figure is not None and "growth" in result:
                    growth.add(side, pool, result["growth"])
                    context.progress(
                        f"RSS after {tasks:,} tasks: {side.name} {pool.label}: "
                        f"{result['after']:.1f} MB (+{result['growth']:.1f} %)"
                    )
    row_notes = notes(context, idle)
    mine_pool, mine = idle.best("celeriac")
    theirs_pool, theirs = idle.best("celery")
    grown_mine = growth.medians("celeriac")
    grown_theirs = growth.medians("celery")
    mine_growth_pool = next(iter(grown_mine), "")
    theirs_growth_pool = next(iter(grown_theirs), "")
    return [
        Row(
            metric="idle_rss",
            title="RSS idle",
            broker=context.broker,
            unit="MB",
            higher_is_better=False,
            celeriac=mine,
            celery=theirs,
            celeriac_config=mine_pool,
            celery_config=theirs_pool,
            notes=row_notes,
            details=idle.details(),
        ),
        Row(
            metric="rss_growth",
            title=f"RSS growth after {counts['celeriac']:,} (Celery {counts['celery']:,})",
            broker=context.broker,
            unit="%",
            higher_is_better=False,
            celeriac=grown_mine.get(mine_growth_pool),
            celery=grown_theirs.get(theirs_growth_pool),
            celeriac_config=mine_growth_pool,
            celery_config=theirs_growth_pool,
            comparable=False,
            details={"tasks": counts, **growth.details()},
        ),
    ]
