"""``Delivery.delivery_count`` on every transport: 1 on the first delivery, one more for each
delivery that was used and not settled (a worker that died, a requeue), unchanged by a delivery
handed back unused (a deferral). The poison-message cap of the worker relies on it.

The generic tests run on every transport of the conformance suite; the AMQP ones check how a
classic queue, where RabbitMQ counts nothing, is counted anyway.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac.brokers.amqp import AMQPBroker
from celeriac.brokers.base import BrokerOptions, Delivery, PublishRequest, QueueSpec
from tests import services
from tests.brokers.conftest import BrokerFactory, bodies, message

#: Lease of the deliveries a test loses on purpose: short, so the message comes back quickly.
LEASE = 0.2


async def lose(broker_factory: BrokerFactory, queue: str) -> Delivery:
    """Fetch one message with a broker of its own and close it without settling the delivery,
    as a worker process that dies does; return once the message can be delivered again."""
    broker = await broker_factory(visibility_timeout=LEASE)
    [got] = await broker.fetch([queue], 1, 5)
    await broker.close()
    if broker_factory.cls.leases_expire:
        await asyncio.sleep(LEASE)
    return got


def test_every_lost_delivery_counts(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=LEASE)
        await broker.declare(QueueSpec("q"))
        await broker.publish(message("m", correlation_id="c1"), exchange="", routing_key="q")
        lost = [await lose(broker_factory, "q") for _ in range(3)]
        assert [(d.delivery_count, d.redelivered) for d in lost] == [
            (1, False),
            (2, True),
            (3, True),
        ]
        [fourth] = await broker.fetch(["q"], 1, 5)
        assert (fourth.delivery_count, fourth.redelivered) == (4, True)
        assert fourth.message == lost[0].message  # the same message, not a changed copy
        await broker.ack([fourth])
        assert await broker.fetch(["q"], 1, 0.3) == []

    broker_factory.run(scenario)


def test_requeues_count_and_deferrals_do_not(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=LEASE)
        await broker.declare(QueueSpec("q"))
        await broker.publish(message("m"), exchange="", routing_key="q")
        assert (await lose(broker_factory, "q")).delivery_count == 1
        [second] = await broker.fetch(["q"], 1, 5)
        assert second.delivery_count == 2
        await broker.reject(second, requeue=True)
        [third] = await broker.fetch(["q"], 1, 5)
        assert (third.delivery_count, third.redelivered) == (3, True)
        await broker.defer(third, time.time())  # handed back unused, ready at once
        [again] = await broker.fetch(["q"], 1, 5)
        assert (again.delivery_count, again.redelivered) == (3, True)
        await broker.defer(again, time.time() + 0.2)  # and through the broker's delay
        [later] = await broker.fetch(["q"], 1, 5)
        assert later.delivery_count == 3
        await broker.reject(later, requeue=True)
        [last] = await broker.fetch(["q"], 1, 5)
        assert last.delivery_count == 4
        assert last.message == second.message
        await broker.ack([last])
        assert await broker.fetch(["q"], 1, 0.3) == []

    broker_factory.run(scenario)


# -- RabbitMQ: classic queues count nothing, quorum queues count returns -----------------------


class AMQPEnv:
    """Brokers on a shared RabbitMQ, every name under a prefix of this test's own."""

    def __init__(self) -> None:
        self.prefix = services.unique("celeriac-count-") + "."
        self._opened: list[AMQPBroker] = []

    async def broker(self, **transport_options: Any) -> AMQPBroker:
        options = BrokerOptions(transport_options={"name_prefix": self.prefix, **transport_options})
        broker = AMQPBroker(services.amqp_url(), options)
        await broker.connect()
        self._opened.append(broker)
        return broker

    async def lose(self, queue: str) -> Delivery:
        broker = await self.broker()
        [got] = await broker.fetch([queue], 1, 5)
        await broker.close()
        return got

    async def close_all(self) -> None:
        for broker in self._opened:
            await broker.close()

    def delete(self, queues: list[str], exchanges: list[str]) -> None:
        import kombu

        with kombu.Connection(services.amqp_url()) as connection:
            channel = connection.default_channel
            for queue in queues:
                channel.queue_delete(self.prefix + queue)
            for exchange in exchanges:
                channel.exchange_delete(self.prefix + exchange)


@pytest.fixture
def amqp() -> Iterator[AMQPEnv]:
    services.require_rabbitmq()
    env = AMQPEnv()
    yield env
    env.delete(["q", "celeriac.dead_letter"], ["ex"])


def run(env: AMQPEnv, scenario: Any) -> None:
    async def main() -> None:
        try:
            await scenario()
        finally:
            await env.close_all()

    asyncio.run(main())


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_amqp_counts_redeliveries_on_both_queue_types(amqp: AMQPEnv, queue_type: str) -> None:
    """A classic queue's redelivery is counted by republishing it with its count; the copy is the
    same message, with the exchange and routing key it was first published with."""

    async def scenario() -> None:
        broker = await amqp.broker()
        await broker.declare(QueueSpec("q", exchange="ex", routing_key="rk", queue_type=queue_type))
        sent = message("m", headers={"id": "task-1"}, priority=3, correlation_id="task-1")
        await broker.publish(sent, exchange="ex", routing_key="rk")
        lost = [await amqp.lose("q") for _ in range(3)]
        assert [d.delivery_count for d in lost] == [1, 2, 3]
        [fourth] = await broker.fetch(["q"], 1, 5)
        assert (fourth.delivery_count, fourth.redelivered) == (4, True)
        for delivery in (*lost, fourth):
            assert (delivery.exchange, delivery.routing_key, delivery.queue) == ("ex", "rk", "q")
            assert delivery.message == lost[0].message
        assert not any(key.startswith("x-") for key in fourth.message.headers)
        await broker.ack([fourth])
        assert await broker.fetch(["q"], 1, 0.3) == []
        assert await broker.size("q") == 0

    run(amqp, scenario)


def test_amqp_requeue_keeps_the_place_while_the_count_allows(amqp: AMQPEnv) -> None:
    """reject(requeue=True) of a classic queue's message leaves it at its place when RabbitMQ's
    flag will say enough (the first delivery of its copy); later, the copy carries the count and
    goes to the back. Another connection reads the same count."""

    async def scenario() -> None:
        broker = await amqp.broker()
        await broker.declare(QueueSpec("q"))
        await broker.publish_many([PublishRequest(message(b), "", "q") for b in ("a", "b")])
        [first] = await broker.fetch(["q"], 1, 5)
        await broker.reject(first, requeue=True)
        [second] = await broker.fetch(["q"], 1, 5)
        assert (bodies([second]), second.delivery_count) == (["a"], 2)  # at its place
        await broker.reject(second, requeue=True)
        got = await broker.fetch(["q"], 2, 5)
        got += await broker.fetch(["q"], 1, 5) if len(got) < 2 else []
        assert [(b, d.delivery_count) for b, d in zip(bodies(got), got, strict=True)] == [
            ("b", 1),
            ("a", 3),  # behind "b" now, counted
        ]
        await broker.ack(got[:1])
        await broker.reject(got[1], requeue=True)  # first delivery of the copy: in place
        await broker.close()
        other = await amqp.broker()
        [fourth] = await other.fetch(["q"], 1, 5)
        assert (bodies([fourth]), fourth.delivery_count) == (["a"], 4)
        await other.ack([fourth])

    run(amqp, scenario)


def test_amqp_close_gives_back_prefetched_messages_uncounted(amqp: AMQPEnv) -> None:
    """Messages RabbitMQ pushed to a consumer that never handed them out are returned unused when
    the broker closes, as a warm shutdown does: a restart does not count against them."""

    async def scenario() -> None:
        first = await amqp.broker(prefetch_count=5)
        await first.declare(QueueSpec("q"))
        await first.publish_many([PublishRequest(message(str(i)), "", "q") for i in range(5)])
        [taken] = await first.fetch(["q"], 1, 5)
        assert bodies([taken]) == ["0"]
        deadline = time.monotonic() + 5
        while await first.size("q") < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the other four arrive in the consumer's buffer
        await first.close()  # "0" was handed out and not settled: it counts
        second = await amqp.broker()
        got: list[Delivery] = []
        while len(got) < 5:
            got += await second.fetch(["q"], 5, 5)
        counts = {d.message.body.decode(): d.delivery_count for d in got}
        assert counts == {"0": 2, "1": 1, "2": 1, "3": 1, "4": 1}
        await second.ack(got)

    run(amqp, scenario)


def test_amqp_counts_a_message_requeued_by_another_client(amqp: AMQPEnv) -> None:
    """A redelivery RabbitMQ flags without a count (here: a kombu consumer that requeues, as a
    Celery worker's restore does) is counted too."""
    import kombu

    async def scenario() -> None:
        broker = await amqp.broker()
        await broker.declare(QueueSpec("q"))
        await broker.publish(message("m"), exchange="", routing_key="q")
        await asyncio.to_thread(_kombu_requeue, amqp.prefix + "q")
        [got] = await broker.fetch(["q"], 1, 5)
        assert (got.delivery_count, got.redelivered, bodies([got])) == (2, True, ["m"])
        await broker.reject(got, requeue=True)
        [again] = await broker.fetch(["q"], 1, 5)
        assert again.delivery_count == 3
        await broker.ack([again])

    def _kombu_requeue(queue: str) -> None:
        with kombu.Connection(services.amqp_url()) as connection:
            channel = connection.channel()
            received = None
            deadline = time.monotonic() + 5
            while received is None and time.monotonic() < deadline:
                received = channel.basic_get(queue, no_ack=False)
            assert received is not None
            channel.basic_reject(received.delivery_tag, requeue=True)

    run(amqp, scenario)


def test_the_amqp_identity_of_a_message_includes_its_task_id(amqp: AMQPEnv) -> None:
    """Two calls with the same arguments have the same body; the remembered count of one requeued
    message is not given to the other."""

    async def scenario() -> None:
        broker = await amqp.broker()
        await broker.declare(QueueSpec("q"))
        calls = [
            PublishRequest(message("[[1, 2], {}, {}]", headers={"id": str(uuid.uuid4())}), "", "q")
            for _ in range(2)
        ]
        await broker.publish_many(calls)
        first, second = await broker.fetch(["q"], 2, 5)
        await broker.reject(first, requeue=True)
        await broker.reject(second, requeue=True)
        again = await broker.fetch(["q"], 2, 5)
        assert [d.delivery_count for d in again] == [2, 2]
        await broker.reject(again[0], requeue=True)
        [third] = await broker.fetch(["q"], 1, 5)
        assert (third.message.headers["id"], third.delivery_count) == (
            again[0].message.headers["id"],
            3,
        )
        await broker.ack([third, again[1]])

    run(amqp, scenario)
