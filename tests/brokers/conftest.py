"""Fixtures of the broker tests.

``broker_factory`` is parametrized over every transport in :data:`TRANSPORTS`; a new transport
joins the conformance suite by adding one entry there (its class and a function that gives the URL
of a fresh, empty store for one test). Tests are plain functions that run their scenario with
``broker_factory.run(scenario)`` — one ``asyncio.run`` per test, no pytest plugin needed.
"""

from __future__ import annotations

import asyncio
import atexit
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from celeriac.brokers.amqp import AMQPBroker
from celeriac.brokers.base import Broker, BrokerOptions, Delivery, TransportMessage
from celeriac.brokers.memory import MemoryBroker
from celeriac.brokers.redis import RedisBroker
from celeriac.brokers.sqlite import SQLiteBroker
from tests import services

T = TypeVar("T")


@dataclass(frozen=True)
class Transport:
    cls: type[Broker]
    #: URL of a fresh, empty store, given the test's tmp_path.
    fresh_url: Callable[[Path], str]
    #: Transport options that make the store fresh (a unique key prefix on a shared server).
    fresh_options: Callable[[], dict[str, Any]] = dict
    #: Skips the test (fails it under CI) when the service the transport needs is down.
    require: Callable[[], None] = lambda: None
    #: Deletes what a test left in a shared server, given its fresh options.
    cleanup: Callable[[dict[str, Any]], None] = lambda options: None


def _redis_cleanup(options: dict[str, Any]) -> None:
    import redis

    client = redis.Redis.from_url(services.redis_url())
    try:
        prefix = options["global_keyprefix"]
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


#: Name prefixes of the AMQP conformance tests' queues and exchanges, deleted at exit.
_AMQP_PREFIXES: list[str] = []
_AMQP_ROOT = services.unique("celeriac-conf-")


def _amqp_options() -> dict[str, Any]:
    prefix = f"{_AMQP_ROOT}.{uuid.uuid4().hex[:8]}."
    if not _AMQP_PREFIXES:
        atexit.register(_amqp_sweep)
    _AMQP_PREFIXES.append(prefix)
    return {"name_prefix": prefix}


def _amqp_sweep() -> None:
    """Delete every queue and exchange named with this run's prefix (one listing for the run).

    AMQP cannot list entities, so ``rabbitmqctl`` does; without it (a remote server) the
    entities stay, all named ``celeriac-conf-…``.
    """
    import subprocess

    import kombu

    names: dict[str, list[str]] = {}
    for kind in ("queues", "exchanges"):
        try:
            listing = subprocess.run(
                ["rabbitmqctl", f"list_{kind}", "-q", "--no-table-headers", "name"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return
        names[kind] = [n for n in listing.split() if n.startswith(_AMQP_ROOT)]
    with kombu.Connection(services.amqp_url()) as connection:
        channel = connection.default_channel
        for queue in names["queues"]:
            channel.queue_delete(queue)
        for exchange in names["exchanges"]:
            channel.exchange_delete(exchange)


TRANSPORTS: dict[str, Transport] = {
    "memory": Transport(MemoryBroker, lambda tmp: f"memory://conformance-{uuid.uuid4().hex}"),
    # tmp_path is absolute, hence the fourth slash.
    "sqlite": Transport(SQLiteBroker, lambda tmp: f"sqlite:///{tmp / 'broker.sqlite3'}"),
    # A shared server: db REDIS_DB, and every key of the test under a unique prefix.
    "redis": Transport(
        RedisBroker,
        lambda tmp: services.redis_url(),
        fresh_options=lambda: {"global_keyprefix": f"{services.unique('conf')}:"},
        require=services.require_redis,
        cleanup=_redis_cleanup,
    ),
    # A shared RabbitMQ vhost: every queue and exchange of the test under a unique name prefix.
    "amqp": Transport(
        AMQPBroker,
        lambda tmp: services.amqp_url(),
        fresh_options=_amqp_options,
        require=services.require_rabbitmq,
    ),
}


class BrokerFactory:
    """Makes brokers of one transport, all on the same fresh store."""

    def __init__(self, name: str, transport: Transport, tmp_path: Path) -> None:
        self.name = name
        self.cls = transport.cls
        self.url = transport.fresh_url(tmp_path)
        self.transport_options = transport.fresh_options()
        self._opened: list[Broker] = []

    def new(self, **options: Any) -> Broker:
        """An unconnected broker; ``options`` are :class:`BrokerOptions` fields."""
        extra = options.pop("transport_options", {})
        transport_options = {**self.transport_options, **extra}
        return self.cls(self.url, BrokerOptions(**options, transport_options=transport_options))

    async def __call__(self, **options: Any) -> Broker:
        """A connected broker, closed when the scenario given to :meth:`run` ends."""
        broker = self.new(**options)
        await broker.connect()
        self._opened.append(broker)
        return broker

    def run(self, scenario: Callable[[], Awaitable[T]]) -> T:
        async def main() -> T:
            try:
                return await scenario()
            finally:
                opened, self._opened = self._opened, []
                for broker in opened:
                    await broker.close()

        return asyncio.run(main())


@pytest.fixture(params=sorted(TRANSPORTS))
def broker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerFactory]:
    transport = TRANSPORTS[request.param]
    transport.require()
    factory = BrokerFactory(request.param, transport, tmp_path)
    yield factory
    transport.cleanup(factory.transport_options)


def message(
    body: bytes | str = b"{}",
    *,
    priority: int | None = None,
    headers: dict[str, Any] | None = None,
    **properties: Any,
) -> TransportMessage:
    """A JSON message; ``priority`` goes into the properties like kombu puts it."""
    if priority is not None:
        properties["priority"] = priority
    return TransportMessage(
        body=body.encode() if isinstance(body, str) else body,
        content_type="application/json",
        content_encoding="utf-8",
        headers=dict(headers or {}),
        properties=properties,
    )


def bodies(deliveries: list[Delivery]) -> list[str]:
    return [d.message.body.decode() for d in deliveries]


async def publish_bodies(
    broker: Broker, queue: str, names: list[str], *, priority: int | None = None
) -> None:
    for name in names:
        await broker.publish(message(name, priority=priority), exchange="", routing_key=queue)


async def drain(broker: Broker, queue: str, *, batch: int = 100) -> list[Delivery]:
    """Everything ready in ``queue`` now, leased (not acked)."""
    got: list[Delivery] = []
    while more := await broker.fetch([queue], batch, 0):
        got += more
    return got


class Clock:
    """Seconds since creation, for timing assertions."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start
