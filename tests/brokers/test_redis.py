"""What only the Redis transport has: kombu's layout and the real kombu on the other side, leases
and restores, delayed messages with many consumers, fanout over pub/sub, lost connections.

The conformance suite (test_conformance.py) covers the broker contract. Every test here works on
the shared Redis (database :data:`tests.services.REDIS_DB`) under a ``global_keyprefix`` of its
own, and deletes the keys of that prefix when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import kombu
import pytest
import redis

from celeriac.brokers.base import BrokerOptions, Delivery, PublishRequest, QueueSpec
from celeriac.brokers.redis import RedisBroker
from celeriac.exceptions import ConnectionError, ImproperlyConfigured, PublishError
from tests import services
from tests.brokers.conftest import bodies, message

SEP = b"\x06\x16"

spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    services.require_redis()
    value = f"{services.unique('rb')}:"
    yield value
    admin = redis.Redis.from_url(services.redis_url())
    try:
        keys = list(admin.scan_iter(match=f"{value}*", count=1000))
        if keys:
            admin.delete(*keys)
    finally:
        admin.close()


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(services.redis_url())
    yield client
    client.close()


def new_broker(prefix: str, **options: Any) -> RedisBroker:
    extra = options.pop("transport_options", {})
    transport_options = {"global_keyprefix": prefix, **extra}
    return RedisBroker(
        services.redis_url(), BrokerOptions(**options, transport_options=transport_options)
    )


@contextlib.asynccontextmanager
async def connected(prefix: str, **options: Any) -> AsyncIterator[RedisBroker]:
    broker = new_broker(prefix, **options)
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


def kombu_connection(prefix: str, **options: Any) -> kombu.Connection:
    return kombu.Connection(
        services.redis_url(), transport_options={"global_keyprefix": prefix, **options}
    )


def kill_connections(name: str) -> int:
    """CLIENT KILL every connection named ``name`` (this test's broker only); how many."""
    admin = redis.Redis.from_url(services.redis_url())
    try:
        killed = 0
        for client in admin.client_list():
            if client.get("name") == name:
                killed += int(admin.client_kill_filter(_id=client["id"]))
        return killed
    finally:
        admin.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the layout, byte for byte -----------------------------------------------------------------


def test_a_published_message_is_kombus_envelope(prefix: str, admin: redis.Redis) -> None:
    async def scenario() -> None:
        async with connected(prefix) as broker:
            sent = message(b'{"x": 1}', headers={"task": "t.add", "id": "1"}, correlation_id="1")
            await broker.publish(sent, exchange="", routing_key="q")

    run(scenario())
    [raw] = admin.lrange(f"{prefix}q", 0, -1)
    assert raw.startswith(b'{"body": "eyJ4IjogMX0=", "content-encoding": "utf-8", ')
    envelope = json.loads(raw)
    assert envelope["content-type"] == "application/json"
    assert envelope["headers"] == {"task": "t.add", "id": "1"}
    properties = envelope["properties"]
    assert properties["delivery_info"] == {"exchange": "", "routing_key": "q"}
    assert properties["body_encoding"] == "base64"
    assert str(uuid.UUID(properties["delivery_tag"])) == properties["delivery_tag"]
    assert properties["correlation_id"] == "1"


def test_declare_writes_kombus_binding_tables(prefix: str, admin: redis.Redis) -> None:
    async def scenario() -> None:
        async with connected(prefix) as broker:
            await broker.declare(QueueSpec("celery", exchange="celery", routing_key="celery"))
            await broker.declare(
                QueueSpec("tq", exchange="tex", routing_key="a.*.#", exchange_type="topic")
            )
            await broker.declare(QueueSpec("pq", max_priority=5))

    run(scenario())
    direct = {b"celery" + SEP + SEP + b"celery"}
    assert admin.smembers(f"{prefix}_kombu.binding.celery") == direct
    assert admin.smembers(f"{prefix}_kombu.binding_permanent.celery") == direct
    # The member kombu 5.7 itself writes for Queue('tq', Exchange('tex', 'topic'), 'a.*.#').
    topic = {b"a.*.#" + SEP + rb"^a\.[^\.]+\..*?$" + SEP + b"tq"}
    assert admin.smembers(f"{prefix}_kombu.binding.tex") == topic
    assert admin.smembers(f"{prefix}_kombu.binding_permanent.tex") == topic
    assert admin.hgetall(f"{prefix}_celeriac.exchanges") == {b"celery": b"direct", b"tex": b"topic"}
    assert admin.hget(f"{prefix}_celeriac.max_priority", "pq") == b"5"


def test_priorities_land_in_kombus_buckets(prefix: str, admin: redis.Redis) -> None:
    priorities = [0, 1, 3, 5, 6, 8, 9, 200]
    with kombu_connection(prefix) as conn:
        producer = conn.Producer()
        for priority in priorities:
            producer.publish(b"k", exchange="", routing_key="kq", priority=priority)

    async def scenario() -> list[str]:
        async with connected(prefix) as broker:
            for priority in priorities:
                await broker.publish(
                    message(str(priority), priority=priority), exchange="", routing_key="cq"
                )
            # kombu's order on Redis: bucket 0 first, then 3, 6, 9.
            return bodies(await broker.fetch(["cq"], 20, 0))

    order = run(scenario())
    assert order == ["0", "1", "3", "5", "6", "8", "9", "200"]

    def buckets(queue: str) -> dict[str, int]:
        return {
            step: admin.llen(f"{prefix}{queue}" + ("" if step == "0" else f"\x06\x16{step}"))
            for step in ("0", "3", "6", "9")
        }

    assert buckets("kq") == {"0": 2, "3": 2, "6": 2, "9": 2}


# -- interop with the real kombu ---------------------------------------------------------------


def test_a_message_published_by_kombu_is_fetched_as_sent(prefix: str, admin: redis.Redis) -> None:
    with kombu_connection(prefix) as conn:
        conn.Producer().publish(
            b'{"args": [1, 2]}',
            exchange="",
            routing_key="q",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "proj.add", "id": "abc", "timelimit": [None, None]},
            priority=3,
            correlation_id="abc",
            reply_to="replies",
        )
    [raw] = admin.lrange(f"{prefix}q\x06\x163", 0, -1)
    stored = json.loads(raw)

    async def scenario() -> Delivery:
        async with connected(prefix) as broker:
            [got] = await broker.fetch(["q"], 10, 0)
            await broker.ack([got])
            return got

    got = run(scenario())
    assert got.message.body == b'{"args": [1, 2]}'
    assert got.message.content_type == "application/json"
    assert got.message.content_encoding == "utf-8"
    assert got.message.headers == stored["headers"]
    transport_owned = ("delivery_info", "delivery_tag")
    expected = {k: v for k, v in stored["properties"].items() if k not in transport_owned}
    assert got.message.properties == expected
    assert got.message.properties["priority"] == 3
    assert (got.exchange, got.routing_key, got.redelivered, got.delivery_count) == (
        "",
        "q",
        False,
        1,
    )
    assert admin.hlen(f"{prefix}unacked") == 0


def test_a_message_published_by_us_is_consumed_and_acked_by_kombu(
    prefix: str, admin: redis.Redis
) -> None:
    sent = message(
        b'{"kwargs": {}}',
        headers={"task": "proj.mul", "id": "xyz", "retries": 0},
        correlation_id="xyz",
        priority=0,
    )

    async def scenario() -> None:
        async with connected(prefix) as broker:
            await broker.publish(sent, exchange="", routing_key="shared")

    run(scenario())
    with kombu_connection(prefix) as conn:
        queue = conn.SimpleQueue("shared")
        got = queue.get(timeout=5)
        assert got.body == sent.body
        assert got.content_type == "application/json"
        assert got.headers == sent.headers
        assert got.properties["correlation_id"] == "xyz"
        assert got.delivery_info["routing_key"] == "shared"
        assert admin.hlen(f"{prefix}unacked") == 1  # kombu's ack emulation holds it
        got.ack()
        queue.close()
    assert admin.hlen(f"{prefix}unacked") == 0
    assert admin.zcard(f"{prefix}unacked_index") == 0


def test_routing_by_a_kombu_declared_exchange(prefix: str) -> None:
    """A Celery worker declared the queue (binding table only, no type known): we route by it."""
    with kombu_connection(prefix) as conn:
        exchange = kombu.Exchange("kex", type="direct")
        kombu.Queue("kq", exchange, routing_key="k.rk")(conn.default_channel).declare()
        topic = kombu.Exchange("ktex", type="topic")
        kombu.Queue("ktq", topic, routing_key="logs.#")(conn.default_channel).declare()

    async def scenario() -> None:
        async with connected(prefix) as broker:
            await broker.publish(message("direct"), exchange="kex", routing_key="k.rk")
            # Topic bindings are matched with AMQP's rules: "logs.#" matches "logs".
            await broker.publish(message("topic"), exchange="ktex", routing_key="logs")
            assert bodies(await broker.fetch(["kq"], 5, 0)) == ["direct"]
            assert bodies(await broker.fetch(["ktq"], 5, 0)) == ["topic"]

    run(scenario())


def test_kombus_restore_brings_back_what_we_did_not_ack(prefix: str) -> None:
    async def fetch_without_ack() -> Delivery:
        async with connected(prefix) as broker:
            # Routed by a direct exchange to two queues: each holds a copy.
            for queue in ("q", "audit"):
                await broker.declare(QueueSpec(queue, exchange="ex", routing_key="rk"))
            await broker.publish(message("m"), exchange="ex", routing_key="rk")
            [got] = await broker.fetch(["q"], 1, 0)
            return got  # the broker is closed: a dead worker

    lost = run(fetch_without_ack())
    time.sleep(0.3)
    with kombu_connection(prefix, visibility_timeout=0.2) as conn:
        conn.default_channel.qos.restore_visible(num=100)

    async def fetch_again() -> Delivery:
        async with connected(prefix) as broker:
            [again] = await broker.fetch(["q"], 1, 0)
            await broker.ack([lost])  # lost lease: ignored
            await broker.ack([again])
            assert await broker.size("q") == 0
            # Restored into the queue it was fetched from only, not copied to "audit" again.
            assert await broker.size("audit") == 1
            return again

    again = run(fetch_again())
    assert again.message == lost.message
    assert (again.exchange, again.routing_key) == ("ex", "rk")
    assert (again.redelivered, again.delivery_count) == (True, 2)
    assert again.delivery_tag != lost.delivery_tag


def test_we_restore_a_dead_celery_workers_delivery_only_after_the_foreign_timeout(
    prefix: str, admin: redis.Redis
) -> None:
    conn = kombu_connection(prefix)
    try:
        queue = conn.SimpleQueue("kq")
        queue.put({"n": 1})
        held = queue.get(timeout=5)  # never acked: the Celery worker "died"
        assert admin.hlen(f"{prefix}unacked") == 1

        async def scenario() -> Delivery:
            options = {"foreign_visibility_timeout": 0.5}
            async with connected(prefix, transport_options=options) as broker:
                started = time.monotonic()
                # Younger than foreign_visibility_timeout: a live worker's task, left alone.
                assert await broker.fetch(["kq"], 1, 0.2) == []
                [got] = await broker.fetch(["kq"], 1, 3)
                assert time.monotonic() - started >= 0.4
                await broker.ack([got])
                return got

        got = run(scenario())
        assert json.loads(got.message.body) == {"n": 1}
        assert got.message.headers == held.headers
        assert (got.redelivered, got.delivery_count) == (True, 2)
        assert admin.hlen(f"{prefix}unacked") == 0
    finally:
        conn.release()


def test_fanout_over_pub_sub_both_ways(prefix: str) -> None:
    received: list[bytes] = []

    def kombu_subscriber(ready: threading.Event) -> None:
        with kombu_connection(prefix) as conn:
            queue = kombu.Queue("kfan", kombu.Exchange("bcast", type="fanout"))
            with conn.Consumer(queue, on_message=lambda msg: received.append(msg.body)):
                ready.set()
                deadline = time.monotonic() + 5
                while not received and time.monotonic() < deadline:
                    with contextlib.suppress(TimeoutError, OSError):
                        conn.drain_events(timeout=0.2)

    async def scenario() -> None:
        async with connected(prefix) as broker:
            # celeriac -> kombu: kombu subscribes /<db>.bcast when it starts consuming. kombu
            # keeps exchange types in memory: declaring the binding tells celeriac the type.
            await broker.declare(QueueSpec("kfan", exchange="bcast", exchange_type="fanout"))
            ready = threading.Event()
            thread = threading.Thread(target=kombu_subscriber, args=(ready,), daemon=True)
            thread.start()
            await asyncio.to_thread(ready.wait, 5)
            while thread.is_alive() and not received:
                await broker.publish(message("to kombu"), exchange="bcast", routing_key="")
                await asyncio.sleep(0.1)
            await asyncio.to_thread(thread.join, 5)
            assert received and received[0] == b"to kombu"

            # kombu -> celeriac, and celeriac -> celeriac: both bound queues get a copy.
            await broker.declare(QueueSpec("f1", exchange="news", exchange_type="fanout"))
            await broker.declare(QueueSpec("f2", exchange="news", exchange_type="fanout"))
            assert await broker.fetch(["f1", "f2"], 10, 0) == []  # subscribes
            with kombu_connection(prefix) as conn:
                news = kombu.Exchange("news", type="fanout")
                conn.Producer().publish(
                    b"from kombu", exchange=news, routing_key="x", declare=[news]
                )
            await broker.publish(message("from us"), exchange="news", routing_key="")
            got: list[Delivery] = []
            while len(got) < 4 and (more := await broker.fetch(["f1", "f2"], 10, 2)):
                got += more
            assert sorted(bodies(got)) == ["from kombu", "from kombu", "from us", "from us"]
            assert {d.queue for d in got} == {"f1", "f2"}
            await broker.ack(got)  # held by nobody in Redis: nothing to do
            # Nobody subscribed: best effort, as kombu; no error.
            await broker.declare(QueueSpec("lonely", exchange="void", exchange_type="fanout"))
            await broker.publish(message("lost"), exchange="void", routing_key="")

    run(scenario())


# -- leases ------------------------------------------------------------------------------------


def test_a_renewed_lease_is_never_redelivered_and_a_dropped_one_comes_back(prefix: str) -> None:
    async def scenario() -> None:
        async with connected(prefix, visibility_timeout=0.3) as other:
            worker = new_broker(prefix, visibility_timeout=0.3)
            await worker.connect()
            await worker.publish(message("long"), exchange="", routing_key="q")
            await worker.publish(message("dropped"), exchange="", routing_key="q")
            long, dropped = await worker.fetch(["q"], 2, 0)
            redelivered: list[Delivery] = []
            started = time.monotonic()
            while time.monotonic() - started < 0.9:  # three times the lease
                await worker.renew([long])  # "long" is renewed, "dropped" is not
                got = await other.fetch(["q"], 5, 0.1)
                await other.ack(got)
                redelivered += got
            [again] = redelivered
            assert again.message == dropped.message
            assert (again.redelivered, again.delivery_count) == (True, 2)
            await worker.close()  # the worker dies holding "long"
            [back] = await other.fetch(["q"], 5, 2)
            assert back.message == long.message
            assert (back.redelivered, back.delivery_count) == (True, 2)
            await other.ack([back])
            assert await other.size("q") == 0

    run(scenario())


def test_a_dead_consumers_messages_come_back_in_their_order(prefix: str) -> None:
    async def scenario() -> None:
        async with connected(prefix, visibility_timeout=0.2) as broker:
            names = [f"m{i}" for i in range(12)]
            for name in names:
                await broker.publish(message(name), exchange="", routing_key="q")
            held = await broker.fetch(["q"], 8, 0)  # ranks 1..8 of one fetch; never acked
            await broker.publish(message("newer"), exchange="", routing_key="q")
            await asyncio.sleep(0.3)
            got = await broker.fetch(["q"], 20, 0)
            # Back at the front of the queue, in the order they were fetched.
            assert bodies(got) == [*names[:8], *names[8:], "newer"]
            assert [d.delivery_count for d in got] == [2] * 8 + [1] * 5
            assert bodies(held) == names[:8]

    run(scenario())


def test_requeued_messages_keep_their_order(prefix: str) -> None:
    async def scenario() -> None:
        async with connected(prefix) as broker:
            for name in ["a", "b", "c", "d"]:
                await broker.publish(message(name), exchange="", routing_key="q")
            first = await broker.fetch(["q"], 2, 0)
            second = await broker.fetch(["q"], 1, 0)
            # Handed back in any order (a warm shutdown), they return in the order fetched.
            for delivery in [second[0], first[1], first[0]]:
                await broker.reject(delivery, requeue=True)
            got = await broker.fetch(["q"], 10, 0)
            assert bodies(got) == ["a", "b", "c", "d"]
            assert [d.delivery_count for d in got] == [2, 2, 2, 1]

    run(scenario())


def test_a_cancelled_fetch_loses_nothing(prefix: str) -> None:
    async def scenario() -> None:
        async with connected(prefix) as broker:
            for name in ["a", "b", "c"]:
                await broker.publish(message(name), exchange="", routing_key="q")
            for ticks in range(6):
                task = asyncio.ensure_future(broker.fetch(["q"], 10, 1))
                for _ in range(ticks):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    got = await task
                    await broker.reject(got[0], requeue=False, reason="fetch was not cancelled")
                    return
                await asyncio.sleep(0.05)  # the release of a claim already sent
                assert await broker.size("q") == 3
            again = await broker.fetch(["q"], 10, 0)
            assert bodies(again) == ["a", "b", "c"]
            assert [d.delivery_count for d in again] == [1, 1, 1]

    run(scenario())


def test_one_fetch_of_thousands_leases_every_message_once(prefix: str, admin: redis.Redis) -> None:
    """A fetch far bigger than a worker's usual one: every message is leased once (kombu's
    unacked hash and index, the queue's lease set), and the ack removes every trace."""
    count = 2_500

    async def scenario() -> None:
        async with connected(prefix) as broker:
            await broker.publish_many(
                [PublishRequest(message(str(i)), "", "many") for i in range(count)]
            )
            got = await broker.fetch(["many"], count, 0)
            assert sorted(bodies(got), key=int) == [str(i) for i in range(count)]
            assert len({d.delivery_tag for d in got}) == count
            assert admin.hlen(f"{prefix}unacked") == count
            assert admin.zcard(f"{prefix}unacked_index") == count
            assert admin.zcard(f"{prefix}_celeriac.leases.many") == count
            await broker.ack(got)
            assert admin.hlen(f"{prefix}unacked") == 0
            assert admin.zcard(f"{prefix}unacked_index") == 0
            assert admin.zcard(f"{prefix}_celeriac.leases.many") == 0
            assert await broker.fetch(["many"], 10, 0) == []

    run(scenario())


def test_a_fetch_loads_its_script_again_when_the_server_forgot_it(prefix: str) -> None:
    async def scenario() -> None:
        async with connected(prefix) as broker:
            await broker.publish(message("a"), exchange="", routing_key="q")
            # As after a restart or SCRIPT FLUSH: a script the server has never seen (NOSCRIPT).
            claim = broker._scripts["claim"]
            broker._scripts["claim"] = broker._client.register_script(
                f"{claim.script}\n-- {uuid.uuid4()}"
            )
            got = await broker.fetch(["q"], 10, 0)
            assert bodies(got) == ["a"]
            await broker.ack(got)
            assert await broker.size("q") == 0

    run(scenario())


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":")])
def test_a_restore_edits_the_envelope_in_place(
    prefix: str, admin: redis.Redis, separators: tuple[str, str]
) -> None:
    """The scripts never re-encode JSON: every byte but the flags and the counter survives."""
    headers = {
        "tricky": 'a "quoted" {brace} [bracket] \\ back\\slash ,: end',
        "empty_list": [],
        "empty_object": {},
        "big": 2**60 + 1,
        "float": 0.1,
        "nested": [[], {"a": [1, {"b": "}"}]}, None, True],
        "unicode": "\u2713 \u00e9",
    }
    envelope = {
        "body": "eyJ4IjogMX0=",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": "q"},
            "body_encoding": "base64",
            "delivery_tag": "t-1",
        },
    }
    admin.lpush(f"{prefix}q", json.dumps(envelope, separators=separators))

    async def scenario() -> tuple[Delivery, Delivery]:
        async with connected(prefix, visibility_timeout=0.1) as broker:
            [first] = await broker.fetch(["q"], 1, 0)
            [again] = await broker.fetch(["q"], 1, 2)
            return first, again

    first, again = run(scenario())
    assert first.message.headers == headers
    assert again.message == first.message
    assert (again.redelivered, again.delivery_count) == (True, 2)
    entry = json.loads(admin.hget(f"{prefix}unacked", again.delivery_tag))
    restored = entry[0]
    assert entry[1:] == ["", "q"]
    assert restored["headers"] == {**headers, "redelivered": True}
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    assert restored["properties"]["x-celeriac-delivery-count"] == 1
    assert restored["properties"]["delivery_tag"] == "t-1"


def test_a_restore_of_an_envelope_with_empty_headers(prefix: str, admin: redis.Redis) -> None:
    admin.lpush(
        f"{prefix}q",
        b'{"body": "", "headers": {}, "properties": {"delivery_info": {}, "body_encoding": "utf-8"}}',
    )

    async def scenario() -> Delivery:
        async with connected(prefix, visibility_timeout=0.1) as broker:
            await broker.fetch(["q"], 1, 0)
            [again] = await broker.fetch(["q"], 1, 2)
            return again

    again = run(scenario())
    assert (again.message.body, again.message.headers) == (b"", {})
    assert (again.redelivered, again.delivery_count) == (True, 2)
    [restored, _, _] = json.loads(admin.hget(f"{prefix}unacked", again.delivery_tag))
    assert restored["headers"] == {"redelivered": True}
    assert restored["properties"]["delivery_info"] == {"redelivered": True}


def test_a_wait_on_the_server_ends_on_time(prefix: str) -> None:
    """The server times blocking commands out only every 100 ms (hz 10): ours end on time."""

    async def scenario() -> None:
        async with connected(prefix, polling_interval=1.0) as broker:
            for timeout in (0.05, 0.25, 0.42):
                started = time.monotonic()
                assert await broker.fetch(["q"], 1, timeout) == []
                assert timeout <= time.monotonic() - started < timeout + 0.06
            due = time.time() + 0.23
            await broker.publish(message("later"), exchange="", routing_key="q", not_before=due)
            [got] = await broker.fetch(["q"], 1, 2)
            assert due <= time.time() < due + 0.06
            assert got.message.body == b"later"

    run(scenario())


def test_a_malformed_list_item_is_dead_lettered(prefix: str, admin: redis.Redis) -> None:
    admin.lpush(f"{prefix}q", b"not json at all")

    async def scenario() -> None:
        async with connected(prefix) as broker:
            await broker.publish(message("ok"), exchange="", routing_key="q")
            assert bodies(await broker.fetch(["q"], 10, 0)) == ["ok"]
            [dead] = await broker.dead_letters()
            assert dead.queue == "q" and dead.reason.startswith("malformed envelope")
            assert dead.message.body == b"not json at all"

    run(scenario())
    assert admin.hlen(f"{prefix}unacked") == 1  # only "ok", still leased


def test_dead_letters_are_capped(prefix: str) -> None:
    async def scenario() -> None:
        options = {"dead_letter_limit": 3}
        async with connected(prefix, transport_options=options) as broker:
            for i in range(5):
                await broker.publish(message(str(i)), exchange="", routing_key="q")
            for delivery in await broker.fetch(["q"], 5, 0):
                await broker.reject(delivery, requeue=False, reason=f"bad {delivery.queue}")
            dead = await broker.dead_letters(limit=10)
            assert [d.message.body for d in dead] == [b"4", b"3", b"2"]
            assert {d.reason for d in dead} == {"bad q"}

    run(scenario())


# -- delayed messages --------------------------------------------------------------------------


def test_delayed_messages_are_delivered_once_by_many_consumers(prefix: str) -> None:
    consumers, total = 5, 50

    async def scenario() -> None:
        async with connected(prefix) as producer:
            due = time.time() + 0.3
            await producer.publish_many(
                [PublishRequest(message(str(i)), "", "q", due) for i in range(total)]
            )
            brokers = [new_broker(prefix) for _ in range(consumers)]
            for broker in brokers:
                await broker.connect()
            seen: list[tuple[str, float]] = []

            async def consume(broker: RedisBroker) -> None:
                idle_until = time.monotonic() + 2.0
                while time.monotonic() < idle_until:
                    got = await broker.fetch(["q"], 7, 0.2)
                    now = time.time()
                    seen.extend((body, now) for body in bodies(got))
                    await broker.ack(got)

            try:
                await asyncio.gather(*(consume(b) for b in brokers))
            finally:
                for broker in brokers:
                    await broker.close()
            names = sorted((body for body, _ in seen), key=int)
            assert names == [str(i) for i in range(total)]  # every one, exactly once
            assert min(at for _, at in seen) >= due
            assert await producer.size("q") == 0

    run(scenario())


def test_delayed_delivery_off_sends_like_kombu(prefix: str, admin: redis.Redis) -> None:
    async def scenario() -> None:
        options = {"delayed_delivery": False}
        async with connected(prefix, transport_options=options) as broker:
            later = time.time() + 3600
            await broker.publish(message("eta"), exchange="", routing_key="q", not_before=later)
            # In the list at once (a Celery worker holds it until its eta itself).
            assert admin.llen(f"{prefix}q") == 1
            [got] = await broker.fetch(["q"], 1, 0)
            # Our worker defers it: it waits in Redis, not in the worker.
            await broker.defer(got, later)
            assert admin.llen(f"{prefix}q") == 0
            assert admin.zcard(f"{prefix}_celeriac.delayed.q") == 1
            assert await broker.size("q") == 1

    run(scenario())


# -- lost connections --------------------------------------------------------------------------


def test_killed_connections_fail_one_call_then_work_again(prefix: str) -> None:
    name = services.unique("kill")

    async def scenario() -> None:
        options = {"client_name": name}
        async with connected(prefix, polling_interval=1.0, transport_options=options) as broker:
            await broker.publish(message("before"), exchange="", routing_key="q")
            assert bodies(await broker.fetch(["q"], 5, 0)) == ["before"]
            waiting = asyncio.ensure_future(broker.fetch(["q"], 5, 5))
            await asyncio.sleep(0.3)  # blocked on the server by now
            assert await asyncio.to_thread(kill_connections, name) >= 1
            with pytest.raises(ConnectionError):
                await waiting
            # The next calls reconnect.
            await broker.publish(message("after"), exchange="", routing_key="q")
            assert bodies(await broker.fetch(["q"], 5, 1)) == ["after"]

    run(scenario())


def test_publishes_during_connection_kills_are_never_silently_lost(prefix: str) -> None:
    name = services.unique("kill")

    async def scenario() -> None:
        options = {"client_name": name}
        async with connected(prefix, transport_options=options) as broker:
            stored: list[str] = []
            failed = 0
            stop = threading.Event()

            def killer() -> None:
                while not stop.is_set():
                    kill_connections(name)
                    time.sleep(0.005)

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            try:
                for i in range(300):
                    try:
                        await broker.publish(message(str(i)), exchange="", routing_key="q")
                    except PublishError:
                        failed += 1
                    else:
                        stored.append(str(i))
            finally:
                stop.set()
                thread.join(5)
            got: list[str] = []
            errors = 0
            while True:
                try:
                    more = await broker.fetch(["q"], 100, 0)
                except ConnectionError:  # a connection killed at the very end
                    errors += 1
                    assert errors < 5
                    continue
                if not more:
                    break
                got += bodies(more)
            assert set(stored) <= set(got), "a publish that returned must be stored"
            assert len(got) <= 300
            print(f"\nkilled connections: {len(stored)} publishes stored, {failed} raised")

    run(scenario())


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"global_keyprefx": "x"}, "Did you mean 'global_keyprefix'"),
        ({"visibility_timeout": 3}, "BrokerOptions field"),
        ({"priority_steps": [3, 6]}, "priority_steps"),
        ({"priority_steps": [0, 5, 20]}, "priority_steps"),
        ({"foreign_visibility_timeout": 0}, "foreign_visibility_timeout"),
        ({"delayed_delivery": "yes"}, "delayed_delivery"),
        ({"dead_letter_limit": 0}, "dead_letter_limit"),
        ({"fanout_patterns": False}, "fanout_patterns"),
        ({"sep": ""}, "sep"),
        ({"socket_timeout": "soon"}, "socket_timeout"),
    ],
)
def test_bad_transport_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        RedisBroker(services.redis_url(), BrokerOptions(transport_options=options))


def test_kombu_options_with_their_defaults_are_accepted(prefix: str, admin: redis.Redis) -> None:
    options = {
        "fanout_prefix": True,
        "fanout_patterns": True,
        "priority_steps": list(range(10)),
        "sep": ":",
    }

    async def scenario() -> None:
        async with connected(prefix, transport_options=options) as broker:
            await broker.publish(message("p4", priority=4), exchange="", routing_key="q")

    run(scenario())
    assert admin.llen(f"{prefix}q:4") == 1


def test_every_key_carries_the_prefix(prefix: str, admin: redis.Redis) -> None:
    queue = services.unique("q")

    async def scenario() -> None:
        async with connected(prefix, visibility_timeout=0.1) as broker:
            await broker.declare(QueueSpec(queue, exchange=queue, routing_key=queue))
            await broker.publish(message(), exchange=queue, routing_key=queue)
            await broker.publish(
                message(), exchange="", routing_key=queue, not_before=time.time() + 60
            )
            [got] = await broker.fetch([queue], 5, 0)
            await broker.reject(got, requeue=False, reason="x")

    run(scenario())
    keys = [k.decode() for k in admin.scan_iter(match=f"*{queue}*", count=1000)]
    assert keys and all(k.startswith(prefix) for k in keys), keys


# -- speed -------------------------------------------------------------------------------------


def _latency_consumer(url: str, prefix: str, count: int, results: Any) -> None:
    """Child process: fetch ``count`` messages one by one; report publish-to-fetch latencies."""

    async def main() -> list[float]:
        broker = RedisBroker(url, BrokerOptions(transport_options={"global_keyprefix": prefix}))
        await broker.connect()
        latencies: list[float] = []
        results.put("ready")
        while len(latencies) < count:
            for delivery in await broker.fetch(["lat"], 1, 5):
                latencies.append(time.time() - float(delivery.message.body))
                await broker.ack([delivery])
        await broker.close()
        return latencies

    results.put(asyncio.run(main()))


def test_throughput_and_latency(prefix: str) -> None:
    count = 10_000

    async def throughput() -> tuple[float, float]:
        async with connected(prefix) as broker:
            batch = [PublishRequest(message(f'{{"n": {i}}}'), "", "bulk") for i in range(count)]
            started = time.perf_counter()
            await broker.publish_many(batch)
            publish_rate = count / (time.perf_counter() - started)
            started = time.perf_counter()
            drained = 0
            while got := await broker.fetch(["bulk"], 100, 0):
                await broker.ack(got)
                drained += len(got)
            drain_rate = drained / (time.perf_counter() - started)
            assert drained == count
            return publish_rate, drain_rate

    publish_rate, drain_rate = run(throughput())

    results = spawn.Queue()
    child = spawn.Process(
        target=_latency_consumer, args=(services.redis_url(), prefix, 1000, results)
    )
    child.start()
    try:
        assert results.get(timeout=30) == "ready"

        async def produce() -> None:
            async with connected(prefix) as broker:
                for _ in range(1000):
                    await broker.publish(message(repr(time.time())), exchange="", routing_key="lat")
                    await asyncio.sleep(0.002)

        run(produce())
        latencies = sorted(results.get(timeout=60))
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(
        f"\nredis broker: publish_many {publish_rate:,.0f} msg/s, fetch+ack drain "
        f"{drain_rate:,.0f} msg/s, publish->fetch latency p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )
    # Loose floors: the machine is shared; the printed figures are the measurement.
    assert publish_rate > 5_000
    assert drain_rate > 2_000
    assert p50 < 10
