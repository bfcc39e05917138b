"""The two contenders, behind one interface: client apps, publishing, and worker command lines.

Each side publishes with its own code: celeriac's ``.delay()`` and ``group``, Celery's ``.delay()``
and ``group``. Only the untimed pre-queueing of the drain, I/O and memory scenarios takes each
side's fastest path — celeriac's broker-level ``publish_many`` in batches (the path its ``group``
is built on), Celery's ``apply_async`` on one held producer — since what it costs is not what is
being measured.
"""

from __future__ import annotations

import abc
import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import celery
import kombu.pools
from celery.backends.redis import RedisBackend

from benchmarks.apps import celeriac_app, celery_app, config
from celeriac.app import calling
from celeriac.app.queues import queue_spec
from celeriac.brokers.base import PublishRequest
from celeriac.protocol import wire

#: kombu's (untyped) reset of its process-global connection and producer pools.
_reset_kombu_pools: Callable[[], None] = kombu.pools.reset

#: Messages per ``publish_many`` call when celeriac pre-queues.
BATCH = 1_000

CPUS = os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Pool:
    """How a worker runs its tasks: a label for the table and the command-line arguments."""

    label: str
    args: tuple[str, ...] = ()


class GroupUnavailable(Exception):
    """This side has no ``group`` to measure (yet)."""


class Side(abc.ABC):
    """One of the two projects: how to build its client, publish, and start its worker."""

    name: str
    #: The ``-A`` module of the worker.
    app_module: str

    @abc.abstractmethod
    def client(self, settings: dict[str, Any]) -> Any:
        """A client app with the benchmark tasks."""

    @abc.abstractmethod
    def close(self, app: Any) -> None:
        """Close every connection of a client app."""

    @abc.abstractmethod
    def prequeue(self, app: Any, task: str, arguments: Sequence[tuple[Any, ...]]) -> list[str]:
        """Publish one task per argument tuple, the fastest way this side has; the ids."""

    def delay_loop(self, app: Any, task: str, arguments: Sequence[tuple[Any, ...]]) -> list[str]:
        """``task.delay(*args)`` for each argument tuple, one after the other, from sync code."""
        delay = app.tasks[task].delay
        return [delay(*args).id for args in arguments]

    @abc.abstractmethod
    def group(self, app: Any, task: str, arguments: Sequence[tuple[Any, ...]]) -> list[str]:
        """``group(task.s(*args) for args in arguments).apply_async()``; the ids."""

    def call(self, app: Any, task: str, args: tuple[Any, ...], timeout: float) -> tuple[str, Any]:
        """``task.delay(*args).get(timeout=...)``: one round trip; the task's id and result."""
        result = app.tasks[task].delay(*args)
        return result.id, result.get(timeout=timeout)

    @abc.abstractmethod
    def worker_argv(self, queue: str, pool: Pool) -> list[str]:
        """The worker's command line after the interpreter: ``-m <project> -A ... worker ...``."""

    @abc.abstractmethod
    def default_pool(self) -> Pool:
        """The pool of the drain, round-trip and memory scenarios (celeriac: its default)."""

    @abc.abstractmethod
    def drain_pools(self, quick: bool) -> list[Pool]:
        """The pools the drain and round-trip scenarios try (the best is reported)."""

    @abc.abstractmethod
    def io_pools(self, concurrency: int, prefork_limit: int, quick: bool) -> list[Pool]:
        """The pools the I/O-bound scenario tries."""

    @abc.abstractmethod
    def memory_pools(self, quick: bool) -> list[Pool]:
        """The pools whose idle RSS is measured; the first one also runs the growth test."""


class CeleriacSide(Side):
    name = "celeriac"
    app_module = "benchmarks.apps.celeriac_app"

    def client(self, settings: dict[str, Any]) -> Any:
        return celeriac_app.build_app("celeriac_bench_client", settings)

    def close(self, app: Any) -> None:
        app.close()

    def prequeue(self, app: Any, task: str, arguments: Sequence[tuple[Any, ...]]) -> list[str]:
        ids: list[str] = []
        requests: list[PublishRequest] = []
        queue = app.conf.task_default_queue
        for args in arguments:
            outgoing = calling.build(app.conf, task, args, None, {}, app.tasks[task])
            ids.append(outgoing.message.id)
            body = wire.encode(
                outgoing.message, serializer=outgoing.serializer, compression=outgoing.compression
            )
            route = outgoing.route
            requests.append(PublishRequest(body, route.exchange, route.routing_key))

        async def publish() -> None:
            broker = await app.abroker()
            await broker.declare(queue_spec(app.conf, queue))
            for start in range(0, len(requests), BATCH):
                await broker.publish_many(requests[start : start + BATCH])

        app.run_sync(publish())
        return ids

    def group(self, app: Any, task: str, arguments: Sequence[tuple[Any, ...]]) -> list[str]:
        # celeriac's group arrives with its canvas; until then this row is N/A, not an error.
        group = getattr(importlib.import_module("celeriac"), "group", None)
        if group is None:
            raise GroupUnavailable("celeriac has no group() yet")
        signature = app.tasks[task].s
        result = group(signature(*args) for args in arguments).apply_async()
        return [child.id for child in result.results]

    def worker_argv(self, queue: str, pool: Pool) -> list[str]:
        return [
            "-m",
            "celeriac",
            "-A",
            self.app_module,
            "worker",
            "--loglevel=warning",
            "-Q",
            queue,
            "-n",
            f"{queue}@%h",
            *pool.args,
        ]

    def default_pool(self) -> Pool:
        return Pool(f"threads -c {CPUS}")  # celeriac's defaults: no options

    def drain_pools(self, quick: bool) -> list[Pool]:
        return [self.default_pool()]

    def io_pools(self, concurrency: int, prefork_limit: int, quick: bool) -> list[Pool]:
        # async def tasks run on the event loop, as many at once as --async-concurrency allows
        # (-c is the pool's size for sync tasks, which this scenario has none of).
        return [
            Pool(
                f"async --async-concurrency {concurrency}",
                ("--async-concurrency", str(concurrency)),
            )
        ]

    def memory_pools(self, quick: bool) -> list[Pool]:
        return [self.default_pool()]


class CelerySide(Side):
    name = "celery"
    app_module = "benchmarks.apps.celery_app"

    def client(self, settings: dict[str, Any]) -> Any:
        return celery_app.build_app("celery_bench_client", settings)

    def close(self, app: Any) -> None:
        """``Celery.close()`` closes the broker connections but keeps the result store's: close
        those too."""
        backend = app.backend
        if isinstance(backend, RedisBackend):
            backend.result_consumer.stop()  # the pub/sub connection of .get()
            backend.client.connection_pool.disconnect()
        app.close()
        # Producers are pooled per connection URL in a registry global to the process, which
        # would hand the next client app (same URL) a pool whose connections are closed.
        _reset_kombu_pools()

    def prequeue(self, app: Any, task: str, arguments: Sequence[tuple[Any, ...]]) -> list[str]:
        apply_async = app.tasks[task].apply_async
        with app.producer_or_acquire() as producer:
            return [apply_async(args, producer=producer).id for args in arguments]

    def group(self, app: Any, task: str, arguments: Sequence[tuple[Any, ...]]) -> list[str]:
        signature = app.tasks[task].s
        result = celery.group(signature(*args) for args in arguments).apply_async()
        return [child.id for child in result.results]

    def worker_argv(self, queue: str, pool: Pool) -> list[str]:
        return [
            "-m",
            "celery",
            "-A",
            self.app_module,
            "worker",
            "--loglevel=warning",
            "-Q",
            queue,
            "-n",
            f"{queue}@%h",
            # Cluster chatter the benchmark does not use; off, it only spares Celery work.
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            *pool.args,
        ]

    def default_pool(self) -> Pool:
        return Pool("solo", ("-P", "solo"))

    def drain_pools(self, quick: bool) -> list[Pool]:
        pools = [
            Pool("solo", ("-P", "solo")),
            Pool("prefork -c 2", ("-P", "prefork", "-c", "2")),
            Pool(f"threads -c {CPUS}", ("-P", "threads", "-c", str(CPUS))),
        ]
        return pools[:1] if quick else pools

    def io_pools(self, concurrency: int, prefork_limit: int, quick: bool) -> list[Pool]:
        pools = [Pool(f"threads -c {concurrency}", ("-P", "threads", "-c", str(concurrency)))]
        if not quick:
            # One process per concurrent task: 500 of them would take GBs and minutes to fork on
            # a small machine, so prefork runs with at most ``prefork_limit`` children.
            children = min(concurrency, prefork_limit)
            pools.append(Pool(f"prefork -c {children}", ("-P", "prefork", "-c", str(children))))
        return pools

    def memory_pools(self, quick: bool) -> list[Pool]:
        # threads first: as lean as solo (one process, the same imports) and several times faster
        # than solo on RabbitMQ, it runs the growth test; solo and prefork are measured idle.
        solo, prefork, threads = self.drain_pools(quick=False)
        return [threads] if quick else [threads, solo, prefork]


SIDES: tuple[Side, ...] = (CeleriacSide(), CelerySide())


def worker_env(broker_url: str, result_backend: str, queue: str) -> dict[str, str]:
    """The ``BENCH_*`` environment a worker reads its settings from."""
    return {
        config.BROKER_VAR: broker_url,
        config.BACKEND_VAR: result_backend,
        config.QUEUE_VAR: queue,
    }
