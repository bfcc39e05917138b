"""The brokers measured, and how each measurement gets a place of its own on them.

Every measurement gets an :class:`Endpoint`: a queue name no other run uses, the broker and result
store URLs, and a reader of the result store. Afterwards :meth:`Service.cleanup` deletes what that
measurement created, and nothing else — other benchmark runs and test runs may share the servers.

* **Redis** — database 10 (``BENCH_REDIS_URL`` to change it), kept apart from the test suite's
  database 9 and from real data in 0. It is not flushed: the keys deleted afterwards are the
  results of the measurement's own task ids and the keys named after its own queue.
* **RabbitMQ** — ``BENCH_AMQP_URL``; the queue and its exchange are deleted afterwards. Results
  are stored in Redis for both projects (the same store as in the Redis rows, so the two rows
  differ by the broker only).
* **SQLite** — celeriac only, broker and result store in files of the measurement's own, in the
  run's temporary directory. Celery has no SQLite broker of its own. kombu's SQLAlchemy transport
  (``sqla+sqlite://``, with Celery's ``db+sqlite://`` results) works, but it is a polling
  development transport: it drains in the low hundreds of tasks per second and ``.get()`` polls
  the database, so it would add many minutes to a run for a comparison nobody deploys.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import socket
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiormq
import aiormq.exceptions
import redis

from benchmarks.results import RedisResults, ResultReader, SQLiteResults

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: Seconds to connect to RabbitMQ for the cleanup and the version.
CONNECT_TIMEOUT = 10.0


@dataclass(slots=True)
class Endpoint:
    """Where one measurement's messages and results go."""

    queue: str
    broker_url: str
    result_backend: str
    reader: ResultReader


def fresh_queue(prefix: str) -> str:
    """A queue name no other run uses."""
    return f"bench.{prefix}.{uuid.uuid4().hex[:10]}"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2.0
        ):
            return True
    except OSError:
        return False


class Service(abc.ABC):
    """One broker the benchmark runs on."""

    name: str
    #: Whether the real Celery is measured on this broker too.
    celery_supported: bool = True
    #: What the reader of the ``.delay()`` figures must know about publishing on this broker.
    publish_note: str | None = None

    @abc.abstractmethod
    def unavailable(self) -> str | None:
        """Why this broker cannot be used now (it is not running), or None."""

    @abc.abstractmethod
    def endpoint(self, workdir: Path, label: str) -> Endpoint:
        """A fresh queue (and result store) for one measurement."""

    @abc.abstractmethod
    def cleanup(self, endpoint: Endpoint, ids: Sequence[str]) -> None:
        """Delete the queue, its messages and the results of ``ids``; close the reader."""

    @abc.abstractmethod
    def version(self) -> str | None:
        """The server's version, for the machine facts."""


def _delete_redis_queue(client: redis.Redis, queue: str) -> None:
    """Delete the keys named after ``queue`` (its lists, bindings, leases, delayed messages) and
    its entries in the shared in-flight records, which a stopped worker should have emptied."""
    pattern = f"*{queue}*"
    keys = list(client.scan_iter(match=pattern, count=1000))
    if keys:
        client.delete(*keys)
    for name in ("_celeriac.exchanges", "_celeriac.max_priority"):
        client.hdel(name, queue)
    stale = [
        tag for tag, entry in client.hscan_iter("unacked", count=1000) if _routed_to(entry, queue)
    ]
    if stale:
        client.hdel("unacked", *stale)
        client.zrem("unacked_index", *stale)


def _routed_to(entry: bytes, queue: str) -> bool:
    try:
        _envelope, exchange, routing_key = json.loads(entry)
    except (ValueError, TypeError):
        return False
    return queue in (exchange, routing_key)


class RedisService(Service):
    name = "redis"

    def __init__(self, url: str = REDIS_URL) -> None:
        self.url = url

    def unavailable(self) -> str | None:
        return None if _reachable(self.url, 6379) else f"Redis is not running at {self.url}"

    def endpoint(self, workdir: Path, label: str) -> Endpoint:
        return Endpoint(fresh_queue(label), self.url, self.url, RedisResults(self.url))

    def cleanup(self, endpoint: Endpoint, ids: Sequence[str]) -> None:
        try:
            endpoint.reader.forget(ids)
            client = redis.Redis.from_url(self.url)
            try:
                _delete_redis_queue(client, endpoint.queue)
            finally:
                client.close()
        finally:
            endpoint.reader.close()

    def version(self) -> str | None:
        client = redis.Redis.from_url(self.url)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()


class RabbitMQService(Service):
    name = "rabbitmq"
    publish_note = (
        "on RabbitMQ celeriac's .delay() returns once the broker confirmed the message "
        "(publisher confirms, always on); Celery's default (confirm_publish off) does not wait"
    )

    def __init__(self, url: str = AMQP_URL, results_url: str = REDIS_URL) -> None:
        self.url = url
        self.results = RedisService(results_url)

    def unavailable(self) -> str | None:
        if not _reachable(self.url, 5672):
            return f"RabbitMQ is not running at {urlsplit(self.url).hostname}"
        return self.results.unavailable()  # results are stored in Redis

    def endpoint(self, workdir: Path, label: str) -> Endpoint:
        url = self.results.url
        return Endpoint(fresh_queue(label), self.url, url, RedisResults(url))

    def cleanup(self, endpoint: Endpoint, ids: Sequence[str]) -> None:
        try:
            endpoint.reader.forget(ids)
            asyncio.run(_delete_amqp_names(self.url, endpoint.queue))
        finally:
            endpoint.reader.close()

    def version(self) -> str | None:
        return asyncio.run(_amqp_version(self.url))


async def _delete_amqp_names(url: str, name: str) -> None:
    """Delete the queue ``name`` and the exchange of the same name (either may be missing)."""
    connection = await asyncio.wait_for(aiormq.connect(url), CONNECT_TIMEOUT)
    try:
        for delete in ("queue_delete", "exchange_delete"):
            channel = await connection.channel()
            try:
                await getattr(channel, delete)(name)
            except aiormq.exceptions.AMQPError:
                pass  # never declared (the measurement failed early): nothing to delete
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()


async def _amqp_version(url: str) -> str | None:
    connection = await asyncio.wait_for(aiormq.connect(url), CONNECT_TIMEOUT)
    try:
        value = connection.server_properties.get("version")
        return value.decode() if isinstance(value, bytes) else str(value)
    finally:
        await connection.close()


class SQLiteService(Service):
    name = "sqlite"
    celery_supported = False

    def unavailable(self) -> str | None:
        return None

    def endpoint(self, workdir: Path, label: str) -> Endpoint:
        queue = fresh_queue(label)
        results = workdir / f"{queue}-results.sqlite3"
        return Endpoint(
            queue,
            f"sqlite:///{workdir / (queue + '-broker.sqlite3')}",
            f"sqlite:///{results}",
            SQLiteResults(results),
        )

    def cleanup(self, endpoint: Endpoint, ids: Sequence[str]) -> None:
        endpoint.reader.close()
        for url in (endpoint.broker_url, endpoint.result_backend):
            path = Path(url.removeprefix("sqlite:///"))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)

    def version(self) -> str | None:
        return sqlite3.sqlite_version


SERVICES: dict[str, Service] = {
    service.name: service for service in (RedisService(), RabbitMQService(), SQLiteService())
}
