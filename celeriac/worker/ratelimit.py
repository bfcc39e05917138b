"""Rate limits in the worker: ``rate_limit`` per task, per worker (Celery's) or for the cluster.

``@app.task(rate_limit="10/s")`` lets each worker start at most ten of that task a second, as in
Celery: a token bucket of capacity 1 per task and worker, so the first start is immediate and the
next ones are ``1 / rate`` apart. With ``rate_limit_scope="cluster"`` (or the setting
``task_default_rate_limit_scope``) the limit holds for **all workers together**: every grant is
decided by the store they share, through :class:`~celeriac.brokers.ratelimit.RateLimiterStore` —
the broker (Redis, SQLite, memory), else the result store (Redis, SQLite) when the broker keeps no
counters (RabbitMQ). A worker with a cluster-wide limit and neither refuses to start, saying what
to configure. Limits are read when the worker starts, from the tasks registered then (as Celery's
consumer builds its buckets); ``worker_disable_rate_limits`` turns them all off.

Waiting. A message that must wait does so **before it asks for a concurrency slot**, so the
worker runs other tasks meanwhile. The messages of one task wait their turn first come, first
served (one lane per task); only the head of a lane asks the store, so a lane costs one store
call per grant. Where a message waits depends on how long:

* up to :data:`HOLD_SECONDS` (1 s) it waits in memory. Its message stays leased and the lease
  keeper renews it like any other held message, so it is never delivered twice.
* a longer wait is spent **in the broker**: the delivery is deferred (``broker.defer``) until
  about when its turn comes, as a message with an ETA is, and fetched again then. A flood of a
  limited task thus never sits in the worker's memory, and a worker that dies holds none of it.

Why one second: a deferral costs a broker round trip and comes back no sooner than the next fetch
(SQLite polls every 50 ms when idle; RabbitMQ's delays count whole seconds, rounding up), which
would disturb waits of a fraction of a second, while a second is short against any visibility
timeout, and bounds how long a held message can keep prefetch room from other tasks.

Prefetch. Waiting messages count against the prefetch (``concurrency * prefetch_multiplier``), so
at most half of it (at least one message) waits in memory at any time; beyond that, messages that
cannot start at once are deferred to the broker however short their wait. The other half stays
free: a burst of a limited task cannot keep the worker from fetching and running other tasks.

Deferred messages are spread ``1 / rate`` apart (per lane), so a flood comes back about when each
message can start instead of all at once; with a cluster-wide limit the other workers take grants
too, and a message that comes back too early is simply deferred again. A deferral is not a
delivery: it does not count towards ``delivery_count``.

A store that cannot be reached (a broker outage) is asked again every :data:`STORE_RETRY` seconds
while the message waits; rate-limited tasks do not start without a grant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celeriac.brokers.base import Broker
from celeriac.brokers.ratelimit import InProcessRateLimiter, RateLimiterStore
from celeriac.exceptions import CeleriacError, ImproperlyConfigured
from celeriac.utils.redact import redact_url
from celeriac.worker.logs import logger

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.task import Task
    from celeriac.backends.base import ResultBackend
    from celeriac.worker.request import Request

#: Longest wait spent in worker memory; a longer one is spent in the broker.
HOLD_SECONDS = 1.0
#: Seconds between two attempts to reach a limiter store that failed.
STORE_RETRY = 1.0
#: Grants that may be taken at once after a pause: 1, Celery's bucket capacity.
BURST = 1


@dataclass(frozen=True, slots=True)
class Limit:
    """The rate limit of one task, as the worker applies it."""

    task: str
    #: Starts per second.
    rate: float
    #: As configured (``"10/m"``), for logs.
    text: str
    #: True: for all workers together; False: per worker.
    cluster: bool

    def describe(self) -> str:
        """``10/m per worker (one start every 6s)``."""
        where = "for all workers together" if self.cluster else "per worker"
        return f"{self.text} {where} (one start every {1.0 / self.rate:.4g}s)"


def task_limit(task: Task[Any, Any]) -> Limit | None:
    """The limit of ``task`` (its options, else the app's defaults); None when it has none."""
    rate = task.resolved_rate_limit()
    if rate is None:
        return None
    value = (
        task.rate_limit if task.rate_limit is not None else task.app.conf.task_default_rate_limit
    )
    text = value.strip() if isinstance(value, str) else f"{value:g}/s"
    return Limit(task.name, rate, text, task.resolved_rate_limit_scope() == "cluster")


class _Lane:
    """The messages of one rate-limited task waiting in this worker, first come, first served."""

    __slots__ = ("failing", "held", "interval", "limit", "next_due", "store", "turn")

    def __init__(self, limit: Limit, store: RateLimiterStore) -> None:
        self.limit = limit
        self.store = store
        self.interval = 1.0 / limit.rate
        #: Held by the message whose turn it is to ask the store (asyncio's locks are FIFO).
        self.turn = asyncio.Lock()
        #: Messages of this lane waiting in memory, the one asking included.
        self.held = 0
        #: UNIX time before which no further deferred message of this lane is due.
        self.next_due = 0.0
        #: Whether the store failed at the last attempt (logged once per outage).
        self.failing = False

    def due(self, earliest: float) -> float:
        """When a message deferred now should come back: ``earliest``, and after the messages
        of this lane deferred before it, one interval apart."""
        due = max(earliest, self.next_due)
        self.next_due = due + self.interval
        return due


class RateLimits:
    """The rate limits of one worker and the messages waiting for them. See the module docstring.

    Made by :meth:`for_worker`; :meth:`admit` is called by each message handler before it takes
    a concurrency slot.
    """

    def __init__(self, broker: Broker, lanes: dict[str, _Lane], max_held: int) -> None:
        self._broker = broker
        self._lanes = lanes
        #: Most messages that wait in memory at once, over all lanes.
        self._max_held = max_held
        self._held = 0

    @classmethod
    def for_worker(
        cls, app: Celery, broker: Broker, backend: ResultBackend, prefetch: int
    ) -> RateLimits | None:
        """The limits of the tasks registered in ``app``, logged; None when no task has one.

        Raises ImproperlyConfigured when a limit is cluster-wide and neither the broker nor the
        result store can keep it. Nothing is connected here.
        """
        limits = [limit for task in app.tasks.values() if (limit := task_limit(task))]
        if not limits:
            return None
        limits.sort(key=lambda limit: limit.task)
        if app.conf.worker_disable_rate_limits:
            logger.warning(
                "worker_disable_rate_limits is set: not applying the rate limits of %s.",
                ", ".join(f"{limit.task} ({limit.text})" for limit in limits),
            )
            return None
        shared = _cluster_store(broker, backend, [lim.task for lim in limits if lim.cluster])
        local = InProcessRateLimiter("this worker")
        lanes: dict[str, _Lane] = {}
        for limit in limits:
            store = shared if limit.cluster and shared is not None else local
            lanes[limit.task] = _Lane(limit, store)
            kept = f", kept in {store.description}" if limit.cluster else ""
            logger.info("Rate limit of %s: %s%s.", limit.task, limit.describe(), kept)
        return cls(broker, lanes, max(1, prefetch // 2))

    async def admit(self, request: Request) -> bool:
        """Wait, without a concurrency slot, until ``request`` may start: True. False: it was
        deferred to the broker, which delivers it again about when its turn comes."""
        lane = self._lanes.get(request.task.name)
        if lane is None:
            return True
        ahead = lane.held
        if ahead and (ahead * lane.interval > HOLD_SECONDS or self._held >= self._max_held):
            await self._defer(request, lane, ahead * lane.interval)
            return False
        lane.held += 1
        self._held += 1
        try:
            async with lane.turn:
                while True:
                    wait = await self._acquire(lane)
                    if wait <= 0:
                        return True
                    if wait > HOLD_SECONDS or self._held > self._max_held:
                        # The messages behind this one in the lane take the next grants.
                        await self._defer(request, lane, wait + (lane.held - 1) * lane.interval)
                        return False
                    await asyncio.sleep(wait)
        finally:
            lane.held -= 1
            self._held -= 1

    async def _acquire(self, lane: _Lane) -> float:
        """A grant from the lane's store (0.0), or the seconds to wait before asking again."""
        limit = lane.limit
        try:
            wait = await lane.store.acquire(limit.task, limit.rate, BURST)
        except CeleriacError as exc:
            if not lane.failing:
                logger.warning(
                    "Rate limit of %s: cannot reach %s (%s); its tasks wait, asking again "
                    "every %gs.",
                    limit.task,
                    lane.store.description,
                    exc,
                    STORE_RETRY,
                )
                lane.failing = True
            return STORE_RETRY
        if lane.failing:
            logger.info("Rate limit of %s: %s answers again.", limit.task, lane.store.description)
            lane.failing = False
        return wait

    async def _defer(self, request: Request, lane: _Lane, wait: float) -> None:
        now = time.time()
        due = lane.due(now + wait)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Task %s rate limited (%s): waits %.2fs in the broker",
                request,
                lane.limit.text,
                due - now,
            )
        await self._broker.defer(request.delivery, due)


def _cluster_store(
    broker: Broker, backend: ResultBackend, tasks: list[str]
) -> RateLimiterStore | None:
    """The store cluster-wide limits are kept in: the broker's, else the result store's."""
    if not tasks:
        return None
    store = broker.rate_limiter() or backend.rate_limiter()
    if store is None:
        raise ImproperlyConfigured(
            f"cluster-wide rate limits ({', '.join(tasks)}) need a store that every worker "
            f"shares: the broker {redact_url(broker.url)} keeps no counters, and neither does the "
            f"result store {redact_url(backend.url)}. Use a Redis or SQLite result_backend (or "
            "broker_url), or give those tasks rate_limit_scope='worker'."
        )
    return store
