"""What every scenario shares: the run's context, one measurement's lifetime, and medians of
repeated trials per worker pool."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.apps import config
from benchmarks.options import Options
from benchmarks.results import BenchmarkError
from benchmarks.services import Endpoint, Service
from benchmarks.sides import SIDES, GroupUnavailable, Pool, Side, worker_env
from benchmarks.workers import Supervisor, WorkerProcess


@dataclass(slots=True)
class Context:
    """One broker's share of a run."""

    options: Options
    service: Service
    supervisor: Supervisor
    workdir: Path
    #: Errors met so far (the run keeps going; the table shows N/A and a note).
    errors: list[str] = field(default_factory=list)

    @property
    def broker(self) -> str:
        return self.service.name

    def sides(self) -> list[Side]:
        """celeriac, and Celery where it has this broker."""
        return [s for s in SIDES if s.name == "celeriac" or self.service.celery_supported]

    def progress(self, text: str) -> None:
        print(f"  [{self.broker}] {text}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Measurement:
    """A fresh queue, a client app, and the ids of every task sent (to delete their results)."""

    context: Context
    side: Side
    endpoint: Endpoint
    client: Any
    ids: list[str] = field(default_factory=list)

    def worker(self, pool: Pool) -> contextlib.AbstractContextManager[WorkerProcess]:
        """A ready worker of this side consuming this measurement's queue."""
        endpoint = self.endpoint
        return self.context.supervisor.running(
            f"{self.side.name}-{pool.label}",
            self.side.worker_argv(endpoint.queue, pool),
            worker_env(endpoint.broker_url, endpoint.result_backend, endpoint.queue),
        )

    def publish(self, task: str, arguments: list[tuple[Any, ...]]) -> list[str]:
        """Pre-queue (untimed, the side's fastest path); the ids are remembered for cleanup."""
        ids = self.side.prequeue(self.client, task, arguments)
        self.ids.extend(ids)
        return ids


@contextlib.contextmanager
def measurement(context: Context, side: Side, label: str) -> Iterator[Measurement]:
    """Everything one measurement needs; afterwards its workers are stopped (by the ``worker``
    blocks), its client closed, its queue and results deleted — also when it failed."""
    endpoint = context.service.endpoint(context.workdir, label)
    client = side.client(
        config.settings(endpoint.broker_url, endpoint.result_backend, endpoint.queue)
    )
    current = Measurement(context, side, endpoint, client)
    try:
        yield current
    finally:
        try:
            side.close(client)
        finally:
            context.service.cleanup(endpoint, current.ids)


@dataclass(slots=True)
class Trials:
    """Repeated figures per (side, pool); the median of each, and the best pool of a side."""

    higher_is_better: bool
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, side: Side, pool: Pool, value: float) -> None:
        self.values.setdefault(side.name, {}).setdefault(pool.label, []).append(value)

    def fail(self, side: Side, pool: Pool, error: str) -> None:
        self.errors.setdefault(side.name, {})[pool.label] = error

    def medians(self, side: str) -> dict[str, float]:
        return {pool: statistics.median(v) for pool, v in self.values.get(side, {}).items() if v}

    def best(self, side: str) -> tuple[str, float] | tuple[str, None]:
        """The best pool's label and median, or ``("", None)`` when every pool failed."""
        medians = self.medians(side)
        if not medians:
            return "", None
        pick = max if self.higher_is_better else min
        label = pick(medians, key=lambda pool: medians[pool])
        return label, medians[label]

    def details(self) -> dict[str, Any]:
        return {"values": self.values, "medians": {s: self.medians(s) for s in self.values}}


def attempt(
    context: Context,
    trials: Trials,
    side: Side,
    pool: Pool,
    what: str,
    measure: Callable[[], float],
    unit: str,
) -> float | None:
    """Run one measurement; record its figure, or its error (the run goes on)."""
    started = time.monotonic()
    try:
        value = measure()
    except GroupUnavailable as exc:  # not built yet: N/A with its reason, not an error
        trials.fail(side, pool, str(exc))
        return None
    except Exception as exc:
        message = f"{what} on {context.broker}, {side.name} {pool.label}: {exc}"
        context.errors.append(message)
        trials.fail(side, pool, _summary(exc))
        print(f"  [{context.broker}] ERROR {message}", file=sys.stderr, flush=True)
        if not isinstance(exc, BenchmarkError):
            traceback.print_exc(file=sys.stderr)
        return None
    elapsed = time.monotonic() - started
    context.progress(f"{what}: {side.name} {pool.label}: {value:,.2f} {unit} ({elapsed:.1f} s)")
    trials.add(side, pool, value)
    return value


def _summary(exc: BaseException) -> str:
    """One line for the table: the error's first line and, for a worker that died, the last
    line of its log (usually the exception that killed it)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def notes(context: Context, trials: Trials) -> list[str]:
    """The notes of a row: why a figure is missing (errors, no Celery on this broker)."""
    found = [
        f"{side} {pool}: {error}"
        for side, pools in trials.errors.items()
        for pool, error in pools.items()
    ]
    if not context.service.celery_supported:
        found.append(f"Celery has no {context.broker} broker to compare with")
    return found


def arguments(count: int, start: int = 0) -> list[tuple[Any, ...]]:
    """``add(i, i)`` arguments for ``count`` tasks."""
    return [(i, i) for i in range(start, start + count)]


def rate(times: list[float]) -> float:
    """Tasks per second from the first completion to the last."""
    span = max(times) - min(times)
    if span <= 0:
        raise BenchmarkError(f"{len(times)} completions share one timestamp: too few to time")
    return (len(times) - 1) / span
