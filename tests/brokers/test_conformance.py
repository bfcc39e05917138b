"""The broker conformance suite: the contract of ``celeriac.brokers.base``, run on every transport.

Every test takes ``broker_factory`` (see conftest), so a transport added to ``TRANSPORTS`` runs all
of them. Timing tests use short leases (0.2-0.4 s) and generous upper bounds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from celeriac.brokers._routing import topic_matches
from celeriac.brokers.base import Delivery, PublishRequest, QueueSpec, TransportMessage
from celeriac.exceptions import (
    ConnectionError,
    ImproperlyConfigured,
    PublishError,
    RoutingError,
)
from tests.brokers.conftest import (
    BrokerFactory,
    Clock,
    bodies,
    message,
    publish_bodies,
)

# -- publish and fetch -------------------------------------------------------------------------


def test_round_trip_preserves_the_message(broker_factory: BrokerFactory) -> None:
    body = bytes(range(256)) * 3
    headers = {
        "lang": "py",
        "task": "proj.add",
        "id": "1b8f9c1e",
        "argsrepr": "(1, 2)",
        "timelimit": [None, 5.5],
        "nested": {"ünïcode": "✓", "n": 2**40, "flag": True, "none": None},
    }
    properties = {
        "correlation_id": "1b8f9c1e",
        "reply_to": "reply-queue",
        "delivery_mode": 2,
        "priority": 3,
        "body_encoding": "base64",
    }

    async def scenario() -> None:
        broker = await broker_factory()
        sent = TransportMessage(body, "application/x-custom", "binary", headers, properties)
        await broker.publish(sent, exchange="", routing_key="celery")
        [got] = await broker.fetch(["celery"], 10, 1)
        assert got.message == sent
        assert got.message.body == body and type(got.message.body) is bytes
        assert (got.queue, got.exchange, got.routing_key) == ("celery", "", "celery")
        assert got.redelivered is False and got.delivery_count == 1
        assert isinstance(got.delivery_tag, str) and got.delivery_tag

    broker_factory.run(scenario)


def test_headers_are_serialized_not_shared(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        sent = message(headers={"args": (1, 2), "meta": {"k": "v"}})
        await broker.publish(sent, exchange="", routing_key="q")
        sent.headers["meta"]["k"] = "changed after publish"
        [got] = await broker.fetch(["q"], 1, 1)
        # A tuple comes back as a list, as from any broker that carries JSON.
        assert got.message.headers == {"args": [1, 2], "meta": {"k": "v"}}

    broker_factory.run(scenario)


@pytest.mark.parametrize(
    ("headers", "properties", "body"),
    [
        ({"obj": object()}, {}, b"{}"),
        ({}, {"when": time}, b"{}"),
        ({"items": {1, 2}}, {}, b"{}"),
        ({}, {}, "a str, not bytes"),
    ],
)
def test_what_a_broker_cannot_carry_fails_at_publish(
    broker_factory: BrokerFactory, headers: dict[Any, Any], properties: dict[str, Any], body: Any
) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        bad = TransportMessage(body, "application/json", "utf-8", headers, properties)
        with pytest.raises(PublishError):
            await broker.publish(bad, exchange="", routing_key="q")
        assert await broker.size("q") == 0

    broker_factory.run(scenario)


def test_fifo_within_a_priority(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        names = [f"m{i:02}" for i in range(20)]
        await publish_bodies(broker, "q", names)
        got: list[str] = []
        for _ in range(7):
            got += bodies(await broker.fetch(["q"], 3, 0))
        assert got == names

    broker_factory.run(scenario)


def test_higher_priority_first_then_oldest(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        if not broker.priority_without_declaration:  # RabbitMQ: only a priority queue orders
            await broker.declare(QueueSpec("q", max_priority=9))
        for name, priority in [("a0", 0), ("b5", 5), ("c9", 9), ("d5", 5), ("e0", 0), ("f9", 9)]:
            await broker.publish(message(name, priority=priority), exchange="", routing_key="q")
        await broker.publish(message("g-none"), exchange="", routing_key="q")
        got = bodies(await broker.fetch(["q"], 3, 0)) + bodies(await broker.fetch(["q"], 10, 0))
        if broker.higher_priority_first:
            assert got == ["c9", "f9", "b5", "d5", "a0", "e0", "g-none"]
        else:  # Redis, as kombu: priority 0 (and none) first
            assert got == ["a0", "e0", "g-none", "b5", "d5", "c9", "f9"]

    broker_factory.run(scenario)


def test_queues_are_served_in_the_order_given(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        # The priority served first, and one served later (Redis serves 0 first, as kombu).
        urgent, normal = (7, None) if broker.higher_priority_first else (0, 7)
        await publish_bodies(broker, "b", ["b1", "b2"], priority=normal)
        await publish_bodies(broker, "a", ["a1", "a2"], priority=normal)
        await broker.publish(message("c-urgent", priority=urgent), exchange="", routing_key="c")
        got = await broker.fetch(["a", "b", "c"], 3, 0)
        # Priority first, then the queue order of the fetch, then age.
        assert bodies(got) == ["c-urgent", "a1", "a2"]
        assert [d.queue for d in got] == ["c", "a", "a"]
        await broker.reject(got[1], requeue=True)
        await broker.reject(got[2], requeue=True)
        assert bodies(await broker.fetch(["b", "a"], 3, 0)) == ["b1", "b2", "a1"]

    broker_factory.run(scenario)


def test_max_messages_is_respected(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        await publish_bodies(broker, "q", [str(i) for i in range(10)])
        assert len(await broker.fetch(["q"], 4, 0)) == 4
        assert len(await broker.fetch(["q"], 1, 0)) == 1
        assert len(await broker.fetch(["q"], 100, 0)) == 5
        assert await broker.fetch(["q"], 100, 0) == []

    broker_factory.run(scenario)


def test_fetch_times_out_with_nothing(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        clock = Clock()
        assert await broker.fetch(["empty"], 5, 0) == []
        assert clock() < 0.1
        clock = Clock()
        assert await broker.fetch(["empty"], 5, 0.3) == []
        assert 0.3 <= clock() < 0.6

    broker_factory.run(scenario)


def test_publish_many_is_one_ordered_batch(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        publish_many = getattr(broker, "publish_many", None)
        if publish_many is None:
            pytest.skip(f"{broker_factory.name} has no publish_many")
        await publish_many([PublishRequest(message(str(i)), "", "q") for i in range(5)])
        assert bodies(await broker.fetch(["q"], 10, 0)) == ["0", "1", "2", "3", "4"]
        # One unroutable message fails the whole batch: nothing of it is stored.
        with pytest.raises(RoutingError):
            await publish_many(
                [
                    PublishRequest(message("ok"), "", "q"),
                    PublishRequest(message("x"), "nowhere", "k"),
                ]
            )
        assert await broker.size("q") == 0

    broker_factory.run(scenario)


# -- delays and leases -------------------------------------------------------------------------


def test_delayed_message_waits_then_is_delivered_once(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        due = time.time() + 0.3
        await broker.publish(message("later"), exchange="", routing_key="q", not_before=due)
        await broker.publish(message("now"), exchange="", routing_key="q")
        assert bodies(await broker.fetch(["q"], 10, 0)) == ["now"]
        assert await broker.fetch(["q"], 10, 0.1) == []
        assert await broker.size("q") == (1 if broker.size_counts_delayed else 0)
        [got] = await broker.fetch(["q"], 10, 2)
        assert time.time() >= due
        # Delivered when due, not a polling interval later (RabbitMQ: whole seconds, rounded up).
        assert time.time() < due + 0.2 + broker.delay_granularity
        assert got.message.body == b"later" and got.delivery_count == 1
        await broker.ack([got])
        assert await broker.fetch(["q"], 10, 0.2) == []

    broker_factory.run(scenario)


def test_not_before_in_the_past_is_ready_now(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        await broker.publish(message("x"), exchange="", routing_key="q", not_before=1.0)
        assert bodies(await broker.fetch(["q"], 1, 0)) == ["x"]

    broker_factory.run(scenario)


def test_ack_removes(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=0.2)
        await publish_bodies(broker, "q", ["a", "b"])
        got = await broker.fetch(["q"], 10, 0)
        await broker.ack(got)
        await broker.ack(got)  # twice is harmless
        await broker.ack([])
        assert await broker.size("q") == 0
        await asyncio.sleep(0.3)
        assert await broker.fetch(["q"], 10, 0) == []

    broker_factory.run(scenario)


def test_lease_expiry_redelivers(broker_factory: BrokerFactory) -> None:
    if not broker_factory.cls.leases_expire:
        pytest.skip(f"{broker_factory.name}: a lease lasts while the connection lives")

    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=0.25)
        await publish_bodies(broker, "q", ["m"])
        clock = Clock()
        [first] = await broker.fetch(["q"], 1, 0)
        assert await broker.fetch(["q"], 1, 0.1) == []
        [again] = await broker.fetch(["q"], 1, 2)
        assert 0.25 <= clock() < 0.6
        assert again.message == first.message
        assert (again.redelivered, again.delivery_count) == (True, 2)
        assert again.delivery_tag != first.delivery_tag

    broker_factory.run(scenario)


def test_ack_of_a_lost_lease_does_not_remove_the_redelivered_copy(
    broker_factory: BrokerFactory,
) -> None:
    if not broker_factory.cls.leases_expire:
        pytest.skip(f"{broker_factory.name}: a lease lasts while the connection lives")

    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=0.2)
        await publish_bodies(broker, "q", ["m"])
        [stale] = await broker.fetch(["q"], 1, 0)
        [current] = await broker.fetch(["q"], 1, 2)  # after the lease ran out
        await broker.ack([stale])
        await broker.renew([stale])
        await broker.reject(stale, requeue=False, reason="late")
        await broker.defer(stale, time.time())
        # The current copy is untouched: still leased, and back after its own lease.
        assert await broker.fetch(["q"], 1, 0) == []
        [third] = await broker.fetch(["q"], 1, 2)
        assert third.delivery_count == 3
        assert await broker.dead_letters() == []
        await broker.ack([current])  # lost too now: ignored
        await broker.ack([third])
        assert await broker.size("q") == 0
        assert await broker.fetch(["q"], 1, 0.3) == []

    broker_factory.run(scenario)


def test_an_expired_lease_can_be_acked_until_redelivered(broker_factory: BrokerFactory) -> None:
    if not broker_factory.cls.leases_expire:
        pytest.skip(f"{broker_factory.name}: a lease lasts while the connection lives")

    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=0.1)
        await publish_bodies(broker, "q", ["slow"])
        [slow] = await broker.fetch(["q"], 1, 0)
        await asyncio.sleep(0.2)
        assert await broker.size("q") == 1  # not under a live lease any more
        await broker.ack([slow])  # nobody else had it yet: the ack counts
        assert await broker.size("q") == 0
        assert await broker.fetch(["q"], 1, 0.2) == []

    broker_factory.run(scenario)


def test_renew_keeps_a_running_message(broker_factory: BrokerFactory) -> None:
    if not broker_factory.cls.leases_expire:
        pytest.skip(f"{broker_factory.name}: a lease lasts while the connection lives")

    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=0.3)
        await publish_bodies(broker, "q", ["long"])
        clock = Clock()
        [got] = await broker.fetch(["q"], 1, 0)
        await asyncio.sleep(0.2)
        renewed_at = clock()  # the new lease ends at least 0.3 s after this
        await broker.renew([got])
        await asyncio.sleep(0.25)  # past the original lease end (0.3)
        assert await broker.fetch(["q"], 1, 0) == []
        assert await broker.size("q") == 0
        [again] = await broker.fetch(["q"], 1, 2)
        assert clock() >= renewed_at + 0.3
        assert again.delivery_count == 2

    broker_factory.run(scenario)


def test_reject_with_requeue_redelivers_at_once(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        await publish_bodies(broker, "q", ["first", "second"])
        [got] = await broker.fetch(["q"], 1, 0)
        await broker.reject(got, requeue=True)
        again = await broker.fetch(["q"], 10, 0)
        assert bodies(again) == ["first", "second"]  # back at its place in the queue
        assert (again[0].redelivered, again[0].delivery_count) == (True, 2)
        assert (again[1].redelivered, again[1].delivery_count) == (False, 1)

    broker_factory.run(scenario)


def test_reject_without_requeue_dead_letters(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        if not broker.keeps_dead_letters:
            pytest.skip(f"{broker_factory.name} keeps no dead letters")
        await publish_bodies(broker, "q", ["poison", "bad"])
        poison, bad = await broker.fetch(["q"], 2, 0)
        before = time.time()
        await broker.reject(poison, requeue=False, reason="killed 3 workers")
        await broker.reject(bad, requeue=False)
        assert await broker.fetch(["q"], 10, 0.1) == []
        assert await broker.size("q") == 0
        newest, oldest = await broker.dead_letters()
        assert (newest.queue, newest.message.body, newest.reason) == ("q", b"bad", "")
        assert (oldest.message, oldest.reason) == (poison.message, "killed 3 workers")
        assert before <= oldest.dead_lettered_at <= time.time()
        assert [d.message.body for d in await broker.dead_letters(limit=1)] == [b"bad"]

    broker_factory.run(scenario)


def test_defer_waits_in_the_broker(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        await publish_bodies(broker, "q", ["eta"])
        [got] = await broker.fetch(["q"], 1, 0)
        due = time.time() + 0.3
        await broker.defer(got, due)
        assert await broker.size("q") == (1 if broker.size_counts_delayed else 0)
        assert await broker.fetch(["q"], 1, 0.1) == []
        [again] = await broker.fetch(["q"], 1, 2)
        assert due <= time.time() < due + 0.2 + broker.delay_granularity
        # A deferred delivery was handed back unused: it does not count as a delivery.
        assert (again.delivery_count, again.redelivered) == (1, False)
        await broker.ack([got])  # the deferred delivery's tag is dead
        assert await broker.fetch(["q"], 1, 0) == []
        await broker.ack([again])
        assert await broker.size("q") == 0

    broker_factory.run(scenario)


# -- purge and size ----------------------------------------------------------------------------


def test_size_counts_ready_and_delayed_but_not_leased(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=0.2)
        assert await broker.size("q") == 0
        await publish_bodies(broker, "q", ["a", "b", "c"])
        later = time.time() + 60
        await broker.publish(message("d"), exchange="", routing_key="q", not_before=later)
        await publish_bodies(broker, "other", ["x"])
        delayed = 1 if broker.size_counts_delayed else 0
        assert await broker.size("q") == 3 + delayed
        await broker.fetch(["q"], 2, 0)
        assert await broker.size("q") == 1 + delayed
        if broker.leases_expire:
            await asyncio.sleep(0.3)  # the leases ran out: waiting again
            assert await broker.size("q") == 3 + delayed
        assert await broker.size("other") == 1

    broker_factory.run(scenario)


def test_purge_deletes_what_is_waiting(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory(visibility_timeout=0.3)
        await publish_bodies(broker, "q", ["leased1", "leased2", "a", "b", "c"])
        later = time.time() + 60
        await broker.publish(message("d"), exchange="", routing_key="q", not_before=later)
        await publish_bodies(broker, "other", ["x"])
        leased = await broker.fetch(["q"], 2, 0)
        assert await broker.purge("q") == (4 if broker.size_counts_delayed else 3)
        assert await broker.size("q") == 0
        assert await broker.purge("q") == 0
        assert await broker.purge("never-used") == 0
        assert await broker.size("other") == 1
        # Leased messages belong to their worker: an ack or a redelivery still finds them.
        await broker.ack(leased[:1])
        if not broker.leases_expire:
            return  # back when the connection ends: tested per transport
        [back] = await broker.fetch(["q"], 10, 2)
        assert back.message.body == b"leased2"

    broker_factory.run(scenario)


# -- routing -----------------------------------------------------------------------------------


def test_direct_exchange_routes_by_binding(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        await broker.declare(QueueSpec("celery", exchange="celery", routing_key="celery"))
        await broker.declare(QueueSpec("video", exchange="media", routing_key="media.video"))
        await broker.declare(QueueSpec("image", exchange="media", routing_key="media.image"))
        await broker.declare(QueueSpec("audit", exchange="media", routing_key="media.video"))
        await broker.declare(QueueSpec("image", exchange="media", routing_key="media.image"))
        await broker.publish(message("t"), exchange="celery", routing_key="celery")
        await broker.publish(message("v"), exchange="media", routing_key="media.video")
        await broker.publish(message("i"), exchange="media", routing_key="media.image")
        sizes = {q: await broker.size(q) for q in ("celery", "video", "image", "audit")}
        assert sizes == {"celery": 1, "video": 1, "image": 1, "audit": 1}
        [video] = await broker.fetch(["video"], 5, 0)
        assert (video.exchange, video.routing_key, video.queue) == ("media", "media.video", "video")
        assert bodies(await broker.fetch(["audit"], 5, 0)) == ["v"]

    broker_factory.run(scenario)


def test_topic_and_fanout_exchanges(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        for queue, pattern in [
            ("one", "logs.*"),
            ("many", "logs.#"),
            ("all", "#"),
            ("err", "*.error"),
        ]:
            await broker.declare(
                QueueSpec(queue, exchange="topics", routing_key=pattern, exchange_type="topic")
            )
        await broker.declare(QueueSpec("f1", exchange="fan", exchange_type="fanout"))
        await broker.declare(
            QueueSpec("f2", exchange="fan", routing_key="x", exchange_type="fanout")
        )
        for key in ["logs.error", "logs.app.info", "logs", "app.error"]:
            await broker.publish(message(key), exchange="topics", routing_key=key)
        if broker.durable_fanout:
            await broker.publish(message("fan"), exchange="fan", routing_key="anything")
        got = {q: bodies(await broker.fetch([q], 10, 0)) for q in ("one", "many", "all", "err")}
        assert got == {
            "one": ["logs.error"],
            "many": ["logs.error", "logs.app.info", "logs"],
            "all": ["logs.error", "logs.app.info", "logs", "app.error"],
            "err": ["logs.error", "app.error"],
        }
        if broker.durable_fanout:
            assert bodies(await broker.fetch(["f1", "f2"], 10, 0)) == ["fan", "fan"]
        # Otherwise fanout is a broadcast to subscribers (Redis pub/sub), tested per transport.

    broker_factory.run(scenario)


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("#", ["", "a", "a.b.c"], []),
        ("*", ["a"], ["", "a.b"]),
        ("a.*", ["a.b"], ["a", "a.b.c", "b.a"]),
        ("a.#", ["a", "a.b", "a.b.c"], ["b", "ab"]),
        ("a.#.z", ["a.z", "a.b.z", "a.b.c.z"], ["a", "a.b", "z"]),
        ("#.z", ["z", "a.z", "a.b.z"], ["z.a"]),
        ("*.*", ["a.b"], ["a", "a.b.c"]),
        ("a.b", ["a.b"], ["a.b.c", "a"]),
        ("", [""], ["a"]),
    ],
)
def test_topic_patterns_follow_amqp(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    assert all(topic_matches(pattern, key) for key in matching)
    assert not any(topic_matches(pattern, key) for key in not_matching)


def test_unroutable_publish_raises(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        with pytest.raises(RoutingError, match="not declared"):
            await broker.publish(message(), exchange="undeclared", routing_key="k")
        await broker.declare(QueueSpec("q", exchange="ex", routing_key="k"))
        with pytest.raises(RoutingError, match="no queue is bound"):
            await broker.publish(message(), exchange="ex", routing_key="other")
        with pytest.raises(RoutingError):
            await broker.publish(message(), exchange="", routing_key="")
        assert await broker.size("q") == 0

    broker_factory.run(scenario)


def test_max_priority_caps_priorities(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        await broker.declare(QueueSpec("q", max_priority=3))
        for name, priority in [("p9", 9), ("p3", 3), ("p2", 2), ("p200", 200)]:
            await broker.publish(message(name, priority=priority), exchange="", routing_key="q")
        # 9, 3 and 200 are all 3 in this queue: FIFO among them.
        capped = ["p9", "p3", "p200"]
        expected = [*capped, "p2"] if broker.higher_priority_first else ["p2", *capped]
        assert bodies(await broker.fetch(["q"], 10, 0)) == expected

    broker_factory.run(scenario)


def test_bad_declarations_are_refused(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        await broker.declare(QueueSpec("q", exchange="ex", routing_key="k"))
        await broker.declare(QueueSpec("q", exchange="ex", routing_key="k"))  # idempotent
        with pytest.raises(ImproperlyConfigured, match="already declared as 'direct'"):
            await broker.declare(QueueSpec("q2", exchange="ex", exchange_type="topic"))
        with pytest.raises(ImproperlyConfigured, match="headers"):
            await broker.declare(QueueSpec("q3", exchange="h", exchange_type="headers"))
        with pytest.raises(ImproperlyConfigured):
            await broker.declare(QueueSpec(""))
        with pytest.raises(ImproperlyConfigured, match="default exchange"):
            await broker.declare(QueueSpec("q4", routing_key="elsewhere"))
        with pytest.raises(ImproperlyConfigured, match="max_priority"):
            await broker.declare(QueueSpec("q5", max_priority=1000))

    broker_factory.run(scenario)


# -- misuse ------------------------------------------------------------------------------------


def test_bad_arguments_are_clear_errors(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        with pytest.raises(ImproperlyConfigured):
            await broker.fetch([], 1, 0)
        with pytest.raises(ImproperlyConfigured):
            await broker.fetch("celery", 1, 0)
        with pytest.raises(ImproperlyConfigured):
            await broker.fetch(["q"], 0, 0)
        with pytest.raises(ImproperlyConfigured):
            await broker.fetch(["q"], 1, -1)
        with pytest.raises(PublishError):
            await broker.publish(message(), exchange="", routing_key="q", not_before=float("nan"))
        foreign = Delivery(message(), "q", "tag", handle=None)
        with pytest.raises(ImproperlyConfigured, match="was not fetched"):
            await broker.ack([foreign])
        with pytest.raises(ImproperlyConfigured):
            await broker.dead_letters(limit=0)
        with pytest.raises(ImproperlyConfigured, match="transport option"):
            broker_factory.new(transport_options={"no_such_option": 1})
        with pytest.raises(ImproperlyConfigured, match="visibility_timeout"):
            broker_factory.new(visibility_timeout=0)

    broker_factory.run(scenario)


def test_a_closed_broker_says_so(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = broker_factory.new()
        with pytest.raises(ConnectionError, match="not connected"):
            await broker.publish(message(), exchange="", routing_key="q")
        await broker.connect()
        await broker.publish(message(), exchange="", routing_key="q")
        await broker.close()
        await broker.close()
        with pytest.raises(ConnectionError, match="not connected"):
            await broker.fetch(["q"], 1, 0)
        await broker.connect()  # reconnecting finds the same store
        assert await broker.size("q") == 1
        await broker.close()

    broker_factory.run(scenario)


# -- concurrency -------------------------------------------------------------------------------


def _run_in_thread(target: Any) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_two_consumers_never_get_the_same_message(broker_factory: BrokerFactory) -> None:
    """Two brokers on one store, each on its own thread and event loop, drain 200 messages."""
    total = 200
    received: dict[str, list[str]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def consume(name: str) -> None:
        async def loop() -> None:
            broker = broker_factory.new()
            await broker.connect()
            try:
                start.wait()
                while deliveries := await broker.fetch(["q"], 7, 0.3):
                    received[name] += bodies(deliveries)
                    await asyncio.sleep(0.002)  # interleave with the other consumer
                    await broker.ack(deliveries)
            finally:
                await broker.close()

        try:
            asyncio.run(loop())
        except BaseException as exc:
            errors.append(exc)

    async def scenario() -> None:
        producer = await broker_factory()
        await publish_bodies(producer, "q", [str(i) for i in range(total)])
        threads = [_run_in_thread(lambda n=n: consume(n)) for n in received]
        for thread in threads:
            await asyncio.to_thread(thread.join, 20)
        assert not errors, errors
        everything = received["a"] + received["b"]
        assert sorted(everything, key=int) == [str(i) for i in range(total)]
        assert received["a"] and received["b"], "both consumers should have had a share"
        assert await producer.size("q") == 0

    broker_factory.run(scenario)


def test_a_publish_wakes_a_waiting_fetch_at_once(broker_factory: BrokerFactory) -> None:
    """The publish comes from another thread and loop; polling (1 s) cannot explain the speed."""
    published_at: list[float] = []

    def publish_later() -> None:
        async def main() -> None:
            broker = broker_factory.new()
            await broker.connect()
            await asyncio.sleep(0.2)
            await broker.publish(message("wake"), exchange="", routing_key="q")
            published_at.append(time.monotonic())
            await broker.close()

        asyncio.run(main())

    async def scenario() -> None:
        consumer = await broker_factory(polling_interval=1.0)
        await consumer.fetch(["q"], 1, 0.05)  # let an idle poll back off first
        thread = _run_in_thread(publish_later)
        got = await consumer.fetch(["q"], 1, 5)
        fetched_at = time.monotonic()
        await asyncio.to_thread(thread.join, 5)
        assert bodies(got) == ["wake"]
        assert fetched_at - published_at[0] < 0.05

    broker_factory.run(scenario)


def test_a_publish_to_another_queue_does_not_end_the_wait(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        broker = await broker_factory()
        waiting = asyncio.create_task(broker.fetch(["q"], 1, 0.3))
        await asyncio.sleep(0.05)
        await publish_bodies(broker, "other", ["not for q"])
        assert await waiting == []
        assert await broker.size("other") == 1

    broker_factory.run(scenario)


def test_many_brokers_share_one_store(broker_factory: BrokerFactory) -> None:
    async def scenario() -> None:
        client, worker = await broker_factory(), await broker_factory()
        waiting = asyncio.create_task(worker.fetch(["q"], 10, 2))
        await asyncio.sleep(0.05)
        await publish_bodies(client, "q", ["hello"])
        deliveries = await waiting
        assert bodies(deliveries) == ["hello"]
        await worker.ack(deliveries)
        assert await client.size("q") == 0

    broker_factory.run(scenario)
