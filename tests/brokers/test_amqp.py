"""The RabbitMQ transport beyond the conformance suite: URLs, wire format, Celery/kombu interop,
the delayed-delivery topology, connection loss, and the AMQP replacements of the conformance
tests it skips (leases held while the connection lives, delayed messages not counted by size).

Tests that need the server run against the real RabbitMQ (``tests.services``); each works under a
unique name prefix and deletes the queues and exchanges it created.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import math
import ssl
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import kombu
import pytest
from kombu.transport.native_delayed_delivery import (
    calculate_routing_key,
    declare_native_delayed_delivery_exchanges_and_queues,
)
from pamqp.commands import Basic

from celeriac.brokers import _amqp_codec as codec
from celeriac.brokers import _amqp_topology as topology
from celeriac.brokers._amqp_url import AMQPParams, connect, parse_amqp_url
from celeriac.brokers.amqp import AMQPBroker
from celeriac.brokers.base import (
    BrokerOptions,
    Delivery,
    PublishRequest,
    QueueSpec,
    TransportMessage,
)
from celeriac.exceptions import ConnectionError, ImproperlyConfigured, PublishError
from tests import services
from tests.brokers.conftest import bodies, message

T = TypeVar("T")

URL = services.amqp_url()


# -- URLs and options (no server) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "vhost", "user", "password"),
    [
        ("amqp://", "localhost", 5672, "/", "guest", "guest"),
        ("amqp://h", "h", 5672, "/", "guest", "guest"),
        ("amqp://h/", "h", 5672, "/", "guest", "guest"),
        ("amqp://u:p@h:1234//", "h", 1234, "/", "u", "p"),
        ("amqp://h/%2F", "h", 5672, "/", "guest", "guest"),
        ("amqp://h/prod", "h", 5672, "prod", "guest", "guest"),
        ("amqp://h/team%2Fprod", "h", 5672, "team/prod", "guest", "guest"),
        ("pyamqp://u:p%40ss%3Aw@h/v", "h", 5672, "v", "u", "p@ss:w"),
        ("amqps://h", "h", 5671, "/", "guest", "guest"),
        ("AMQP://H:5673", "h", 5673, "/", "guest", "guest"),
    ],
)
def test_urls_read_as_kombu_reads_them(
    url: str, host: str, port: int, vhost: str, user: str, password: str
) -> None:
    params, rest = parse_amqp_url(url, {})
    assert (params.host, params.port, params.vhost) == (host, port, vhost)
    assert (params.username, params.password) == (user, password)
    assert params.tls == url.lower().startswith("amqps")
    assert rest == {}


def test_connection_options_come_from_the_query_or_the_transport_options() -> None:
    params, rest = parse_amqp_url(
        "amqp://h/?heartbeat=15&connect_timeout=2.5",
        {"heartbeat": 99, "connection_name": "svc", "prefetch_count": 4},
    )
    # The query wins over the transport option of the same name; the rest is left for the caller.
    assert (params.heartbeat, params.connect_timeout) == (15, 2.5)
    assert params.connection_name == "svc"
    assert rest == {"prefetch_count": 4}
    params, _ = parse_amqp_url("amqp://h", {"heartbeat": 0})
    assert (params.heartbeat, params.connect_timeout) == (0, 10.0)
    assert "secret" not in parse_amqp_url("amqp://u:secret@h/v", {})[0].display()
    assert "secret" not in repr(parse_amqp_url("amqp://u:secret@h/v", {})[0])


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        ("redis://h", {}, "not an AMQP URL"),
        ("amqp://h/?frame_max=1", {}, "unknown parameter 'frame_max'"),
        ("amqp://h/?heartbeat=1&heartbeat=2", {}, "twice"),
        ("amqp://h:99999", {}, "(?i)port"),
        ("amqp://h/?heartbeat=-1", {}, "heartbeat"),
        ("amqp://h", {"heartbeat": "soon"}, "heartbeat"),
        ("amqp://h", {"heartbeat": 1.5}, "heartbeat"),
        ("amqp://h", {"connect_timeout": 0}, "connect_timeout"),
        ("amqp://h", {"connect_timeout": True}, "connect_timeout"),
        ("amqp://h/?ssl=maybe", {}, "ssl must be true or false"),
        ("amqps://h/?ssl=false", {}, "contradicts"),
        ("amqp://h", {"ssl": {"ca_certs": "/nonexistent/ca.pem"}}, "cannot load"),
        ("amqp://h", {"ssl": {"verify": True}}, "unknown ssl option 'verify'"),
        ("amqp://h", {"ssl": {"cert_reqs": "CERT_MAYBE"}}, "cert_reqs"),
        ("amqp://h", {"ssl": {"keyfile": "/k.pem"}}, "keyfile given without certfile"),
        ("amqp://h", {"ssl": 3}, "ssl must be"),
        ("amqp://h", {"connection_name": ""}, "connection_name"),
        ("amqp://a;amqp://b", {}, "failover"),
        ("amqp://h/#frag", {}, "fragment"),
    ],
)
def test_bad_urls_and_connection_options_are_refused(
    url: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        parse_amqp_url(url, options)


def test_tls_options() -> None:
    params, _ = parse_amqp_url("amqp://h", {"ssl": True})
    assert params.tls and params.port == 5671
    assert params.ssl_context is not None
    assert params.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert params.ssl_context.check_hostname
    params, _ = parse_amqp_url(
        "amqps://h:5999", {"ssl": {"cert_reqs": ssl.CERT_NONE, "server_hostname": "broker"}}
    )
    assert params.port == 5999 and params.server_hostname == "broker"
    assert params.ssl_context is not None
    assert params.ssl_context.verify_mode == ssl.CERT_NONE
    assert not params.ssl_context.check_hostname
    context = ssl.create_default_context()
    assert parse_amqp_url("amqp://h", {"ssl": context})[0].ssl_context is context


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"no_such_option": 1}, "unknown transport option"),
        ({"prefetch_count": 0}, "prefetch_count"),
        ({"prefetch_count": True}, "prefetch_count"),
        ({"queue_type": "lazy"}, "queue_type"),
        ({"delayed_delivery_queue_type": "stream"}, "delayed_delivery_queue_type"),
        ({"delivery_limit": -1}, "delivery_limit"),
        ({"dead_letter_queue": ""}, "dead_letter_queue"),
        ({"name_prefix": 5}, "name_prefix"),
        ({"consumer_timeout": float("inf")}, "consumer_timeout"),
    ],
)
def test_bad_transport_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        AMQPBroker(URL, BrokerOptions(transport_options=options))


# -- wire format (no server) ---------------------------------------------------------------------


def _decode(encoded: codec.Encoded) -> tuple[Any, dict[str, Any]]:
    """What a consumer reads, decoded by the client library (pamqp), as a delivery would be."""
    properties = Basic.Properties()
    data = encoded.properties
    properties.unmarshal(int.from_bytes(data[:2], "big"), data[2:])
    return codec.from_amqp(encoded.body, properties)


def test_headers_carry_what_celery_sends_exactly() -> None:
    headers = {
        "lang": "py",
        "eta": None,
        "timelimit": [None, 0.1],
        "retries": 0,
        "big": 2**40,
        "neg": -(2**62),
        "flag": False,
        "nested": {"ünïcode": "✓", "list": [1, "two", None, [3.5]]},
        "when": datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "cost": decimal.Decimal("12.34"),
        "tuple": (1, 2),
    }
    properties = {"correlation_id": "c", "reply_to": "", "priority": 3, "body_encoding": "base64"}
    sent = message("{}", headers=headers, **properties)
    got, added = _decode(codec.encode(sent))
    # A double, not pamqp's single-precision float: 0.1 stays 0.1.
    assert got.headers["timelimit"] == [None, 0.1]
    assert got.headers["tuple"] == [1, 2]
    assert got.headers == {**headers, "tuple": [1, 2]}
    # reply_to "" survives (pamqp would drop it); body_encoding has no AMQP property: it rides
    # in a reserved header and comes back as a property; the transport's message id is dropped.
    assert got.properties == {**properties, "delivery_mode": 2}
    assert set(added) == {codec.PROPERTIES_HEADER}
    assert got.body == sent.body and got.content_type == "application/json"


@pytest.mark.parametrize(
    ("headers", "properties", "match"),
    [
        ({"s": {1, 2}}, {}, "set"),
        ({"o": object()}, {}, "object"),
        ({"huge": 2**64}, {}, "64-bit"),
        ({1: "x"}, {}, "keys must be strings"),
        ({"k" * 300: 1}, {}, "255-byte"),
        ({"x-celeriac-reason": "forged"}, {}, "reserved"),
        ({}, {"priority": "high"}, "priority"),
        ({}, {"delivery_mode": 3}, "delivery_mode"),
        ({}, {"expiration": "soon"}, "expiration"),
        ({}, {"correlation_id": 5}, "correlation_id"),
        ({}, {"when": time}, "module"),
        ({}, {"reply_to": "r" * 300}, "255-byte"),
    ],
)
def test_what_amqp_cannot_carry_is_refused(
    headers: dict[Any, Any], properties: dict[str, Any], match: str
) -> None:
    with pytest.raises(PublishError, match=match):
        codec.encode(message("{}", headers=headers, **properties))


def test_delay_routing_keys_are_kombus() -> None:
    for seconds in (1, 2, 5, 3600, 86400 * 30, topology.MAX_DELAY):
        ours = topology.delay_routing_key(seconds, "celery")
        assert ours == calculate_routing_key(seconds, "celery")
        assert topology.strip_delay_prefix(ours) == "celery"
    # A retried message's key already carries a delay: it is replaced, not stacked.
    again = topology.delay_routing_key(7, topology.delay_routing_key(5, "a.b"))
    assert again == calculate_routing_key(7, "a.b")
    with pytest.raises(ValueError):
        topology.delay_routing_key(0, "celery")
    assert topology.delivery_binding_key("video") == "#.video"
    assert topology.delivery_binding_key("#.logs") == "#.logs"


# -- helpers for the tests against the server ----------------------------------------------------


class Env:
    """Brokers under one unique name prefix, and the deletion of what they declared."""

    def __init__(self) -> None:
        self.prefix = f"{services.unique('celeriac-amqp-')}."
        self.brokers: list[AMQPBroker] = []
        self.queues: set[str] = set()  # wire names
        self.exchanges: set[str] = set()

    def new(self, *, url: str = URL, **options: Any) -> AMQPBroker:
        transport_options = {"name_prefix": self.prefix, **options.pop("transport_options", {})}
        broker = AMQPBroker(url, BrokerOptions(transport_options=transport_options, **options))
        self.brokers.append(broker)
        return broker

    async def broker(self, **options: Any) -> AMQPBroker:
        broker = self.new(**options)
        await broker.connect()
        return broker

    def wire(self, name: str) -> str:
        return self.prefix + name

    def _collect(self, broker: AMQPBroker) -> None:
        self.queues.update(broker._wire(spec.name) for spec in broker._declared)
        self.exchanges.update(broker._wire(spec.exchange) for spec in broker._declared)
        self.queues.update(broker._consuming)
        link = broker._link
        if link is not None:
            self.queues.update(link.known_queues)
            self.exchanges.update(link.known_exchanges)
        self.exchanges.update(broker._exchange_types)

    def run(self, scenario: Callable[[], Awaitable[T]]) -> T:
        async def main() -> T:
            try:
                return await scenario()
            finally:
                for broker in self.brokers:
                    self._collect(broker)
                    await broker.close()
                self.brokers = []

        return asyncio.run(main())

    def cleanup(self) -> None:
        with kombu.Connection(URL) as connection:
            channel = connection.default_channel
            for queue in sorted(self.queues):
                if queue.startswith(self.prefix):
                    channel.queue_delete(queue)
            for exchange in sorted(self.exchanges):
                if exchange.startswith(self.prefix):
                    channel.exchange_delete(exchange)


@pytest.fixture
def env() -> Iterator[Env]:
    services.require_rabbitmq()
    environment = Env()
    yield environment
    environment.cleanup()


def close_connection(name: str) -> None:
    """Close the server side of our connection named ``name``, as a network failure would."""
    try:
        listing = subprocess.run(
            [
                "rabbitmqctl",
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "client_properties",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"rabbitmqctl is needed to close a connection: {exc}")
    for line in listing.splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{name}"}}' in properties:
            subprocess.run(
                ["rabbitmqctl", "close_connection", pid, "test: connection lost"],
                capture_output=True,
                timeout=30,
                check=True,
            )
            return
    raise AssertionError(f"no connection named {name!r}")


async def fetch_all(broker: AMQPBroker, queue: str, count: int, timeout: float) -> list[Delivery]:
    """Fetch until ``count`` deliveries arrived or ``timeout`` passed."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        got += await broker.fetch([queue], count - len(got), left)
    return got


# -- connecting ------------------------------------------------------------------------------------


def test_connection_failures_are_clear() -> None:
    services.require_rabbitmq()
    host, port = services.AMQP_HOST, services.AMQP_PORT

    async def attempt(url: str, **options: Any) -> None:
        params, _ = parse_amqp_url(url, options)
        connection = await connect(params)
        await connection.close()

    with pytest.raises(ImproperlyConfigured, match="refused the login of user 'guest'"):
        asyncio.run(attempt(f"amqp://guest:wrong@{host}:{port}//"))
    with pytest.raises(ImproperlyConfigured, match="vhost 'no-such-vhost'"):
        asyncio.run(attempt(f"amqp://guest:guest@{host}:{port}/no-such-vhost"))
    with pytest.raises(ConnectionError, match="cannot connect"):
        asyncio.run(attempt(f"amqp://guest:guest@{host}:1//"))
    with pytest.raises(ConnectionError, match=r"TLS|cannot connect|did not answer"):
        asyncio.run(attempt(f"amqps://guest:guest@{host}:{port}//", connect_timeout=3))
    asyncio.run(attempt(URL))


def test_a_broker_that_cannot_connect_says_so(env: Env) -> None:
    async def scenario() -> None:
        broker = env.new(url=f"amqp://guest:guest@{services.AMQP_HOST}:1//")
        with pytest.raises(ConnectionError):
            await broker.connect()
        with pytest.raises(ConnectionError, match="not connected"):
            await broker.size("q")

    env.run(scenario)


# -- topology --------------------------------------------------------------------------------------


def test_declarations_are_equivalent_to_celerys(env: Env) -> None:
    """Celery's default queue, a priority queue and a quorum queue: kombu and we agree both ways."""
    ours_first = [
        QueueSpec(env.wire("tasks"), exchange=env.wire("tasks"), routing_key=env.wire("tasks")),
        QueueSpec(env.wire("prio"), exchange=env.wire("prio"), routing_key="p", max_priority=9),
        QueueSpec(env.wire("qq"), exchange=env.wire("qq"), routing_key="qq", queue_type="quorum"),
    ]

    def kombu_queue(spec: QueueSpec) -> kombu.Queue:
        arguments = {"x-queue-type": "quorum"} if spec.queue_type == "quorum" else None
        return kombu.Queue(
            spec.name,
            kombu.Exchange(spec.exchange, type=spec.exchange_type),
            spec.routing_key,
            max_priority=spec.max_priority,
            queue_arguments=arguments,
        )

    async def declare(specs: list[QueueSpec]) -> None:
        # No name prefix of the broker's own here: the names are already the wire names.
        broker = await env.broker(transport_options={"name_prefix": ""})
        for spec in specs:
            await broker.declare(spec)

    env.queues.update(s.name for s in ours_first)
    env.exchanges.update(s.exchange for s in ours_first)
    env.run(lambda: declare(ours_first))
    with kombu.Connection(URL) as connection:
        for spec in ours_first:
            kombu_queue(spec)(connection.default_channel).declare()
        # Celery 5.5's delayed-delivery declarations find ours equivalent.
        declare_native_delayed_delivery_exchanges_and_queues(connection, "quorum")

    kombu_first = [
        QueueSpec(env.wire("k1"), exchange=env.wire("k1"), routing_key=env.wire("k1")),
        QueueSpec(env.wire("k2"), exchange=env.wire("kx"), routing_key="k2", max_priority=4),
        QueueSpec(env.wire("k3"), exchange=env.wire("kx"), routing_key="k3", queue_type="quorum"),
    ]
    env.queues.update(s.name for s in kombu_first)
    env.exchanges.update(s.exchange for s in kombu_first)
    with kombu.Connection(URL) as connection:
        for spec in kombu_first:
            kombu_queue(spec)(connection.default_channel).declare()
    env.run(lambda: declare(kombu_first))


def test_redeclaring_with_other_arguments_is_clear_and_harmless(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        await broker.declare(QueueSpec("jobs", exchange="jobs", routing_key="jobs", max_priority=5))
        with pytest.raises(ImproperlyConfigured, match=r"queue 'jobs'.*'x-max-priority'"):
            await broker.declare(QueueSpec("jobs", exchange="jobs", routing_key="jobs"))
        with pytest.raises(ImproperlyConfigured, match="quorum queues have no priorities"):
            await broker.declare(QueueSpec("q2", max_priority=3, queue_type="quorum"))
        # The connection was not poisoned: everything still works.
        await broker.publish(message("still fine"), exchange="jobs", routing_key="jobs")
        assert bodies(await broker.fetch(["jobs"], 5, 1)) == ["still fine"]

    env.run(scenario)


def test_each_declared_queue_is_bound_to_the_delay_delivery_exchange(env: Env) -> None:
    """A message Celery delays for our queue (its routing key, via its topology) reaches us."""

    async def scenario() -> None:
        broker = await env.broker(transport_options={"name_prefix": ""})
        await broker.declare(
            QueueSpec(env.wire("video"), exchange=env.wire("media"), routing_key="vid")
        )
        with kombu.Connection(URL) as connection:
            producer = kombu.Producer(connection.default_channel)
            producer.publish(
                {"from": "kombu"},
                exchange=topology.TOP_EXCHANGE,
                routing_key=calculate_routing_key(1, "vid"),
                serializer="json",
            )
        [got] = await fetch_all(broker, env.wire("video"), 1, 5)
        assert got.message.body == b'{"from": "kombu"}'
        assert got.routing_key == "vid"  # the delay prefix is not the message's business
        await broker.ack([got])

    env.queues.add(env.wire("video"))
    env.exchanges.add(env.wire("media"))
    env.run(scenario)


# -- interop with kombu ----------------------------------------------------------------------------


def test_a_kombu_message_is_fetched_unchanged(env: Env) -> None:
    headers = {
        "lang": "py",
        "task": "proj.add",
        "id": "6f1e",
        "eta": None,
        "timelimit": [None, None],
        "argsrepr": "(2, 3)",
        "retries": 0,
        "ratio": 0.1,
        "stamps": {},
    }

    async def scenario() -> None:
        broker = await env.broker()
        await broker.declare(QueueSpec("celery", exchange="celery", routing_key="celery"))
        with kombu.Connection(URL) as connection:
            kombu.Producer(connection.default_channel).publish(
                b"[[2, 3], {}, {}]",
                exchange=env.wire("celery"),
                routing_key="celery",
                content_type="application/json",
                content_encoding="utf-8",
                headers=headers,
                correlation_id="6f1e",
                reply_to="",
                priority=0,
                delivery_mode=2,
            )
        [got] = await fetch_all(broker, "celery", 1, 5)
        assert got.message.body == b"[[2, 3], {}, {}]"
        assert (got.message.content_type, got.message.content_encoding) == (
            "application/json",
            "utf-8",
        )
        assert got.message.headers == headers
        assert got.message.properties == {
            "correlation_id": "6f1e",
            "reply_to": "",
            "priority": 0,
            "delivery_mode": 2,
        }
        assert (got.exchange, got.routing_key, got.queue) == ("celery", "celery", "celery")
        await broker.ack([got])

    env.run(scenario)


def test_our_message_is_consumed_by_kombu_unchanged(env: Env) -> None:
    headers = {"task": "proj.add", "eta": None, "timelimit": [60, 0.1], "n": 2**40, "s": "✓"}

    async def scenario() -> None:
        broker = await env.broker()
        await broker.declare(QueueSpec("out", exchange="out", routing_key="out"))
        sent = TransportMessage(
            b"\x00\xffbinary",
            "application/octet-stream",
            "binary",
            headers,
            {"correlation_id": "c1", "reply_to": ""},
        )
        await broker.publish(sent, exchange="out", routing_key="out")

    env.run(scenario)
    with kombu.Connection(URL) as connection:
        queue = connection.SimpleQueue(kombu.Queue(env.wire("out"), no_declare=True), no_ack=True)
        got = queue.get(timeout=5)
        assert got.body == b"\x00\xffbinary"
        assert got.headers == headers
        assert got.properties["correlation_id"] == "c1"
        assert got.properties["reply_to"] == ""
        assert got.properties["delivery_mode"] == 2
        assert (got.content_type, got.content_encoding) == ("application/octet-stream", "binary")


# -- delayed delivery ------------------------------------------------------------------------------


def test_a_delayed_message_arrives_after_not_before_and_not_before_it(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        await broker.declare(QueueSpec("later", exchange="later", routing_key="later"))
        due = time.time() + 1.3
        await broker.publish(message("l"), exchange="later", routing_key="later", not_before=due)
        await broker.publish(message("d"), exchange="", routing_key="later", not_before=due + 0.2)
        assert await broker.size("later") == 0  # waiting in the shared delay queues
        assert await broker.fetch(["later"], 5, 1.0) == []
        got = await fetch_all(broker, "later", 2, 4)
        arrived = time.time()
        assert arrived >= due + 0.2
        assert arrived < due + 0.2 + broker.delay_granularity + 1.0
        assert sorted(bodies(got)) == ["d", "l"]
        routes = sorted((d.exchange, d.routing_key) for d in got)
        assert routes == [("", "later"), ("later", "later")]
        assert all(d.delivery_count == 1 and not d.redelivered for d in got)
        assert all("x-death" not in d.message.headers for d in got)
        await broker.ack(got)

    env.run(scenario)


def test_defer_puts_the_message_back_to_wait_in_the_broker(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        await broker.publish(message("eta"), exchange="", routing_key="q")
        [got] = await broker.fetch(["q"], 1, 1)
        due = time.time() + 1.1
        await broker.defer(got, due)
        assert await broker.size("q") == 0  # not counted while it waits
        assert await broker.fetch(["q"], 1, 0.8) == []
        [again] = await fetch_all(broker, "q", 1, 4)
        assert due <= time.time() < due + broker.delay_granularity + 1.0
        assert (again.delivery_count, again.redelivered) == (1, False)
        assert again.message == got.message
        await broker.ack([got])  # the deferred delivery is settled already: ignored
        await broker.ack([again])
        assert await broker.size("q") == 0

    env.run(scenario)


def test_delayed_publishing_to_a_fanout_exchange_is_refused(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        await broker.declare(QueueSpec("f", exchange="fan", exchange_type="fanout"))
        with pytest.raises(PublishError, match="fanout"):
            await broker.publish(
                message(), exchange="fan", routing_key="x", not_before=time.time() + 5
            )
        with pytest.raises(PublishError, match="at most"):
            await broker.publish(
                message(), exchange="", routing_key="f", not_before=time.time() + 2**29
            )

    env.run(scenario)


def test_size_and_purge_leave_delayed_messages_alone(env: Env) -> None:
    """Replaces the conformance size/purge tests: delayed messages are not in their queue yet."""

    async def scenario() -> None:
        broker = await env.broker()
        await broker.publish(message("ready"), exchange="", routing_key="q")
        await broker.publish(message("held"), exchange="", routing_key="q")
        await broker.publish(
            message("soon"), exchange="", routing_key="q", not_before=time.time() + 1
        )
        [held] = await broker.fetch(["q"], 1, 1)
        assert held.message.body == b"ready"
        assert await broker.size("q") == 1
        assert await broker.purge("q") == 1
        assert await broker.size("q") == 0
        [soon] = await fetch_all(broker, "q", 1, 4)  # the delayed one was not purged
        assert soon.message.body == b"soon"
        await broker.ack([held, soon])

    env.run(scenario)


# -- leases ----------------------------------------------------------------------------------------


def test_a_lease_lasts_while_the_connection_lives(env: Env) -> None:
    """Replaces the conformance lease tests: no visibility timeout; renew has nothing to do."""

    async def scenario() -> None:
        worker = await env.broker(visibility_timeout=0.1)
        other = await env.broker(visibility_timeout=0.1)
        await worker.publish(message("long"), exchange="", routing_key="q")
        [got] = await worker.fetch(["q"], 1, 1)
        await asyncio.sleep(0.4)  # four visibility timeouts
        await worker.renew([got])
        assert await other.fetch(["q"], 1, 0.3) == []
        assert await other.size("q") == 0
        await worker.ack([got])  # long after: still the worker's
        await worker.close()
        assert await other.fetch(["q"], 1, 0.3) == []
        with pytest.raises(ImproperlyConfigured, match="was not fetched"):
            await worker.renew([Delivery(message(), "q", "tag")])

    env.run(scenario)


def test_a_closed_broker_gives_its_unacked_messages_to_another(env: Env) -> None:
    async def scenario() -> None:
        first = await env.broker()
        await first.publish_many([PublishRequest(message(str(i)), "", "q") for i in range(3)])
        taken = await first.fetch(["q"], 2, 1)
        assert [d.delivery_count for d in taken] == [1, 1]
        await first.close()  # dies without acking: RabbitMQ requeues
        second = await env.broker()
        got = await fetch_all(second, "q", 3, 5)
        # A classic queue keeps no count: the two come back counted, as copies at the back.
        assert bodies(got) == ["2", "0", "1"]
        assert [(d.redelivered, d.delivery_count) for d in got] == [
            (False, 1),
            (True, 2),
            (True, 2),
        ]
        await second.ack(got)

    env.run(scenario)


def test_connection_loss_mid_consumption(env: Env) -> None:
    """The server drops the connection: unacked messages come back, fetch resumes by itself."""
    name = f"celeriac-test-{uuid.uuid4().hex}"

    async def scenario() -> None:
        broker = await env.broker(transport_options={"connection_name": name})
        await broker.declare(QueueSpec("work", exchange="work", routing_key="work"))
        await broker.publish_many(
            [PublishRequest(message(str(i)), "work", "work") for i in range(5)]
        )
        held = await broker.fetch(["work"], 3, 1)
        assert bodies(held) == ["0", "1", "2"]
        await asyncio.to_thread(close_connection, name)
        got = await fetch_all(broker, "work", 5, 10)
        assert sorted(bodies(got)) == ["0", "1", "2", "3", "4"]
        again = {d.message.body.decode(): d for d in got}
        assert all(again[b].delivery_count >= 2 and again[b].redelivered for b in "012")
        # The old deliveries died with their channel: settling them is ignored, not an error.
        await broker.ack(held)
        await broker.reject(held[0], requeue=False, reason="late")
        await broker.defer(held[1], time.time())
        await broker.renew(held)
        assert await broker.dead_letters() == []
        # The current copies are untouched; publishing and acking work on the new connection.
        assert await broker.size("work") == 0
        await broker.ack(got)
        await broker.publish(message("after"), exchange="work", routing_key="work")
        assert bodies(await fetch_all(broker, "work", 1, 5)) == ["after"]

    env.run(scenario)


def test_a_channel_error_does_not_stop_consuming(env: Env) -> None:
    """The consuming channel dies (here: an ack RabbitMQ does not know) but the connection
    lives: the consumers come back on a new channel, the channel's deliveries are redelivered."""

    async def scenario() -> None:
        broker = await env.broker()
        await broker.publish_many([PublishRequest(message(str(i)), "", "q") for i in range(3)])
        [held] = await broker.fetch(["q"], 1, 1)
        link = broker._link
        assert link is not None and link.consumption is not None
        await link.consumption.channel.basic_ack(10_000)  # PRECONDITION_FAILED: channel closed
        got = await fetch_all(broker, "q", 3, 5)
        assert sorted(bodies(got)) == ["0", "1", "2"]
        assert next(d for d in got if d.message.body == b"0").redelivered
        await broker.ack([held])  # stale: ignored
        await broker.ack(got)
        assert await broker.size("q") == 0
        assert broker._link is link  # the connection itself was kept

    env.run(scenario)


def test_a_deleted_queue_is_declared_and_consumed_again(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        await broker.publish(message("one"), exchange="", routing_key="gone")
        assert bodies(await broker.fetch(["gone"], 5, 1)) == ["one"]
        with kombu.Connection(URL) as connection:
            connection.default_channel.queue_delete(env.wire("gone"))
        await asyncio.sleep(0.2)
        await broker.publish(message("two"), exchange="", routing_key="gone")
        assert bodies(await fetch_all(broker, "gone", 1, 5)) == ["two"]

    env.run(scenario)


# -- acks, dead letters, quorum queues -------------------------------------------------------------


def test_acks_in_any_order_and_batches(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        await broker.publish_many([PublishRequest(message(str(i)), "", "q") for i in range(20)])
        got = await fetch_all(broker, "q", 20, 5)
        assert bodies(got) == [str(i) for i in range(20)]
        await broker.ack(got[5:9])  # a run in the middle: single acks
        await broker.ack(got[:3])  # the oldest run: one multiple ack
        await broker.ack([got[19], got[3], got[3]])
        await broker.ack(got)  # the rest, and the acked ones again (ignored)
        assert await broker.size("q") == 0
        await broker.publish(message("next"), exchange="", routing_key="q")
        assert bodies(await broker.fetch(["q"], 5, 1)) == ["next"]  # the channel is fine

    env.run(scenario)


def test_publish_many_keeps_order_and_confirms_large_batches(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        big = b"x" * 300_000  # spans several frames
        items = [PublishRequest(message(str(i)), "", "q") for i in range(1500)]
        items.append(PublishRequest(message(big), "", "q"))
        await broker.publish_many(items)
        assert await broker.size("q") == 1501
        got = await fetch_all(broker, "q", 1501, 10)
        assert bodies(got[:1500]) == [str(i) for i in range(1500)]
        assert got[-1].message.body == big
        await broker.ack(got)

    env.run(scenario)


def test_dead_letters_keep_the_message_and_the_reason(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker()
        assert broker.keeps_dead_letters
        await broker.declare(QueueSpec("jobs", exchange="jobs", routing_key="jobs"))
        sent = message("poison", headers={"task": "t", "eta": None}, correlation_id="c")
        await broker.publish(sent, exchange="jobs", routing_key="jobs")
        [got] = await broker.fetch(["jobs"], 1, 1)
        await broker.reject(got, requeue=False, reason="killed 3 workers")
        [letter] = await broker.dead_letters()
        assert (letter.queue, letter.reason) == ("jobs", "killed 3 workers")
        assert letter.message == got.message
        assert await broker.size("jobs") == 0
        # Listing does not consume them.
        assert len(await broker.dead_letters()) == 1

    env.run(scenario)


def test_a_dead_letter_exchange_gets_the_rejected_copies(env: Env) -> None:
    async def scenario() -> None:
        keeper = await env.broker()
        await keeper.declare(QueueSpec("dlq", exchange="dlx", routing_key="jobs"))
        broker = await env.broker(transport_options={"dead_letter_exchange": "dlx"})
        assert not broker.keeps_dead_letters
        await broker.publish(message("bad"), exchange="", routing_key="jobs")
        [got] = await broker.fetch(["jobs"], 1, 1)
        await broker.reject(got, requeue=False, reason="no such task")
        [copy] = await keeper.fetch(["dlq"], 1, 2)
        assert copy.message.body == b"bad"
        with pytest.raises(NotImplementedError):
            await broker.dead_letters()

    env.run(scenario)


def test_quorum_queues_count_deliveries_and_cap_them(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker(transport_options={"queue_type": "quorum", "delivery_limit": 1})
        await broker.declare(QueueSpec("qq", exchange="qq", routing_key="qq"))
        await broker.publish(message("flaky"), exchange="qq", routing_key="qq")
        counts = []
        for _ in range(2):
            [got] = await fetch_all(broker, "qq", 1, 5)
            counts.append(got.delivery_count)
            await broker.reject(got, requeue=True)
        assert counts == [1, 2]
        # Past the limit RabbitMQ dead-letters it into our dead-letter queue.
        assert await fetch_all(broker, "qq", 1, 1) == []
        [letter] = await broker.dead_letters()
        assert letter.queue == "qq" and "delivery_limit" in letter.reason
        assert letter.message.body == b"flaky"

    env.run(scenario)


def test_prefetch_count_option_and_fetching_beyond_it(env: Env) -> None:
    async def scenario() -> None:
        broker = await env.broker(transport_options={"prefetch_count": 2})
        await broker.publish_many([PublishRequest(message(str(i)), "", "q") for i in range(6)])
        first = await broker.fetch(["q"], 10, 1)
        # The consumer's window is 2, the rest is taken with basic.get: order is kept.
        assert bodies(first) == [str(i) for i in range(6)]
        await broker.ack(first)

    env.run(scenario)


def test_latency_and_throughput_are_reasonable(env: Env) -> None:
    """Not a benchmark (see the module docstring of the transport): a floor that catches a
    round trip per message sneaking back in."""

    async def scenario() -> None:
        broker = await env.broker()
        items = [PublishRequest(message(str(i)), "", "q") for i in range(2000)]
        started = time.perf_counter()
        await broker.publish_many(items)
        got: list[Delivery] = []
        while len(got) < 2000:
            batch = await broker.fetch(["q"], 100, 2)
            assert batch
            await broker.ack(batch)
            got += batch
        elapsed = time.perf_counter() - started
        assert elapsed < 4.0, f"2000 messages took {elapsed:.2f}s"
        assert not math.isnan(elapsed)

    env.run(scenario)


def test_params_are_immutable_and_comparable() -> None:
    one = AMQPParams(host="h")
    assert one == AMQPParams(host="h")
    with pytest.raises(AttributeError):
        one.host = "x"  # type: ignore[misc]
