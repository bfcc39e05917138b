"""The rate-limiter contract: grants of a rate limit, decided by a store the workers share.

A cluster-wide ``rate_limit`` holds for every worker together only if one place decides each grant.
That place is a :class:`RateLimiterStore`, offered by the brokers and result stores that can keep a
counter atomically (:meth:`celeriac.brokers.base.Broker.rate_limiter`,
:meth:`celeriac.backends.base.ResultBackend.rate_limiter`):

* Redis — one Lua script per grant, on the server's clock (``celeriac.brokers._ratelimit_redis``);
* SQLite — one ``BEGIN IMMEDIATE`` transaction per grant on a table in the same file
  (``celeriac.brokers._ratelimit_sqlite``);
* memory — :class:`InProcessRateLimiter`, shared by everything in the process that uses the same
  ``memory://`` broker.

RabbitMQ keeps no counters, so a worker on it takes the store of its result store (Redis or
SQLite); the worker refuses to start with a cluster-wide limit when neither offers one.

Every store applies the same rule, :func:`celeriac.utils.rates.gcra`, and its :meth:`acquire` takes
nothing when it refuses: a caller that gives up on a grant (it defers the message to the broker,
or shuts down) wastes none of the rate. The worker also uses an :class:`InProcessRateLimiter` of
its own for per-worker limits (Celery's), so both scopes behave alike.
"""

from __future__ import annotations

import abc
import os
import threading
import time

from celeriac.utils.rates import check_request, gcra

__all__ = ["InProcessRateLimiter", "RateLimiterStore", "shared_in_process"]


class RateLimiterStore(abc.ABC):
    """Decides grants of rate limits, by key, for everyone who uses the same store."""

    #: How logs name the store, e.g. ``"the SQLite broker /srv/broker.sqlite3"``.
    description: str = ""

    @abc.abstractmethod
    async def acquire(self, key: str, rate: float, burst: int = 1) -> float:
        """Take one grant of ``key``, or say how long until one is free.

        ``rate`` is grants per second and ``burst`` how many may be taken at once after a pause
        (1 is Celery's bucket: grants at least ``1 / rate`` apart). Returns ``0.0`` when a grant
        was taken; otherwise takes nothing and returns the seconds to wait before asking again.
        Raises ValueError for impossible arguments and a
        :class:`~celeriac.exceptions.ConnectionError` when the store cannot be reached.
        """


class InProcessRateLimiter(RateLimiterStore):
    """Grants kept in this process's memory, safe to use from any thread or event loop.

    A monotonic clock is used, so a change of the system time does not disturb the limits.
    Keys whose next grant is already free are dropped now and then: they hold nothing a fresh
    key would not.
    """

    def __init__(self, description: str = "this process") -> None:
        self.description = description
        self._lock = threading.Lock()
        #: Theoretical arrival time of the next grant, by key (monotonic clock).
        self._tat: dict[str, float] = {}

    async def acquire(self, key: str, rate: float, burst: int = 1) -> float:
        return self.acquire_now(key, rate, burst)

    def acquire_now(self, key: str, rate: float, burst: int = 1) -> float:
        """:meth:`acquire` without awaiting (nothing here blocks)."""
        check_request(key, rate, burst)
        with self._lock:
            now = time.monotonic()
            tat, wait = gcra(self._tat.get(key), now, 1.0 / rate, burst)
            if tat is not None:
                self._tat[key] = tat
                if len(self._tat) > 1024:
                    self._tat = {k: v for k, v in self._tat.items() if v > now}
            return wait


class _Registry:
    """The process-wide in-process limiters, by name (one per ``memory://`` broker name)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limiters: dict[str, InProcessRateLimiter] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    def named(self, name: str, description: str) -> InProcessRateLimiter:
        with self._lock:
            limiter = self._limiters.get(name)
            if limiter is None:
                limiter = self._limiters[name] = InProcessRateLimiter(description)
            return limiter

    def _after_fork(self) -> None:
        # A lock held by another thread of the parent at the fork would never be released here.
        self._lock = threading.Lock()
        for limiter in self._limiters.values():
            limiter._lock = threading.Lock()


_registry = _Registry()


def shared_in_process(name: str, description: str) -> InProcessRateLimiter:
    """The limiter every caller in this process gets for ``name`` (made by the first one)."""
    return _registry.named(name, description)
