"""Scenario 2, enqueue: N ``add.delay(i, i)`` calls in a loop from sync code, and the same N sent
as one ``group(add.s(i, i) for i in range(N)).apply_async()``. No worker runs; the messages are
deleted with the queue afterwards.

One ``.delay()`` is made before the clock starts, so connecting is not timed (both projects
connect lazily on first use).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.apps import config
from benchmarks.report import Row
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

#: Enqueueing involves no worker: the "pool" of these figures is the client's call.
DELAY = Pool(".delay() loop")
GROUP = Pool("group().apply_async()")


def enqueue_once(
    context: Context,
    side: Side,
    send: Callable[[Measurement, Sequence[tuple[Any, ...]]], list[str]],
) -> float:
    count = context.options.tasks
    with measurement(context, side, "enqueue") as m:
        m.ids.extend(side.delay_loop(m.client, config.ADD, [(0, 0)]))  # connect, untimed
        work = arguments(count)
        started = time.perf_counter()
        ids = send(m, work)
        elapsed = time.perf_counter() - started
        m.ids.extend(ids)
        return count / elapsed


def _delay(m: Measurement, work: Sequence[tuple[Any, ...]]) -> list[str]:
    return m.side.delay_loop(m.client, config.ADD, work)


def _group(m: Measurement, work: Sequence[tuple[Any, ...]]) -> list[str]:
    return m.side.group(m.client, config.ADD, work)


def run(context: Context) -> list[Row]:
    options = context.options
    rows: list[Row] = []
    for metric, pool, send, title in (
        ("delay", DELAY, _delay, f"enqueue {options.tasks:,}: .delay() loop"),
        ("group", GROUP, _group, f"enqueue {options.tasks:,}: group()"),
    ):
        trials = Trials(higher_is_better=True)
        for _ in range(options.repeat):
            for side in context.sides():
                attempt(
                    context,
                    trials,
                    side,
                    pool,
                    metric,
                    functools.partial(enqueue_once, context, side, send),
                    "tasks/s",
                )
        row_notes = notes(context, trials)
        if metric == "delay" and context.service.publish_note:
            row_notes.append(context.service.publish_note)
        rows.append(
            Row(
                metric=metric,
                title=title,
                broker=context.broker,
                unit="tasks/s",
                higher_is_better=True,
                celeriac=trials.best("celeriac")[1],
                celery=trials.best("celery")[1],
                notes=row_notes,
                details={"tasks": options.tasks, **trials.details()},
            )
        )
    return rows
