"""Fixtures of the broker tests.

``broker_factory`` is parametrized over every transport in :data:`TRANSPORTS`; a new transport
joins the conformance suite by adding one entry there (its class and a function that gives the URL
of a fresh, empty store for one test). Tests are plain functions that run their scenario with
``broker_factory.run(scenario)`` — one ``asyncio.run`` per test, no pytest plugin needed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from celeriac.brokers.base import Broker, BrokerOptions, Delivery, TransportMessage
from celeriac.brokers.memory import MemoryBroker
from celeriac.brokers.sqlite import SQLiteBroker

T = TypeVar("T")


@dataclass(frozen=True)
class Transport:
    cls: type[Broker]
    #: URL of a fresh, empty store, given the test's tmp_path.
    fresh_url: Callable[[Path], str]


TRANSPORTS: dict[str, Transport] = {
    "memory": Transport(MemoryBroker, lambda tmp: f"memory://conformance-{uuid.uuid4().hex}"),
    # tmp_path is absolute, hence the fourth slash.
    "sqlite": Transport(SQLiteBroker, lambda tmp: f"sqlite:///{tmp / 'broker.sqlite3'}"),
}


class BrokerFactory:
    """Makes brokers of one transport, all on the same fresh store."""

    def __init__(self, name: str, transport: Transport, tmp_path: Path) -> None:
        self.name = name
        self.cls = transport.cls
        self.url = transport.fresh_url(tmp_path)
        self._opened: list[Broker] = []

    def new(self, **options: Any) -> Broker:
        """An unconnected broker; ``options`` are :class:`BrokerOptions` fields."""
        return self.cls(self.url, BrokerOptions(**options))

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
def broker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> BrokerFactory:
    return BrokerFactory(request.param, TRANSPORTS[request.param], tmp_path)


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
