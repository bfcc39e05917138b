"""The ``rpc://`` result store against a real RabbitMQ, and against the real Celery's rpc backend.

The shared conformance suite (``test_conformance.py``) does not run on this store: every test there
stores a document by task id and reads it back, from the same or from another instance. An rpc
store keeps nothing by task id: a document only goes to the reply queue its task message named,
and only the store owning that queue reads it. The same behaviours are checked here the rpc way
(a "worker" store publishing to a "client" store's reply queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiormq
import pytest
from aiormq import exceptions as amqp_errors
from pamqp import commands as spec

from celeriac import Celery, exceptions, states
from celeriac.backends import rpc as rpc_module
from celeriac.backends.base import BackendOptions, ReplyRoute, reply_route
from celeriac.backends.memory import MemoryBackend
from celeriac.backends.meta import build_meta, exception_from_meta
from celeriac.backends.rpc import RPCBackend
from celeriac.worker.finisher import Finisher
from tests import services
from tests.forking import run_in_fork_child

JSON = "application/json"
PICKLE = "application/x-python-serialize"


def new_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def amqp_url() -> str:
    services.require_rabbitmq()
    return services.amqp_url()


def rpc_store(broker_url: str, **options: Any) -> RPCBackend:
    return RPCBackend("rpc://", BackendOptions(broker_url=broker_url, **options))


@asynccontextmanager
async def open_rpc(broker_url: str, **options: Any) -> AsyncIterator[RPCBackend]:
    backend = rpc_store(broker_url, **options)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def raw_channel(broker_url: str) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A plain aiormq channel, to look at the broker without going through the store."""
    conn = await aiormq.connect(broker_url)
    try:
        yield await conn.channel()
    finally:
        await conn.close()


async def queue_exists(broker_url: str, name: str) -> bool:
    async with raw_channel(broker_url) as channel:
        try:
            await channel.queue_declare(name, passive=True)
        except amqp_errors.ChannelNotFoundEntity:
            return False
        return True


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- configuration (no server needed) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("rpc://host", "just 'rpc://'"),
        ("rpc://guest@localhost//", "just 'rpc://'"),
        ("rpc:///vhost", "just 'rpc://'"),
        ("rpc://?heartbeat=5", "no query"),
        ("redis://", "just 'rpc://'"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match=match):
        RPCBackend(url, BackendOptions(broker_url="amqp://"))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "no broker_url"),
        ({"broker_url": "redis://localhost"}, "needs an AMQP broker"),
        ({"broker_url": "sqlite:///b.sqlite3"}, "needs an AMQP broker"),
        ({"broker_url": "amqp://h/?frame_max=1"}, "unknown parameter 'frame_max'"),
        ({"broker_url": "amqp://", "transport_options": (("x", 1),)}, "no result_backend_trans"),
        ({"broker_url": "amqp://", "expires": 0.0001}, "at least 0.001"),
        ({"broker_url": "amqp://", "broker_transport_options": (("heartbeat", -1),)}, "heartbeat"),
    ],
)
def test_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match=match):
        RPCBackend("rpc://", BackendOptions(**options))


def test_accepts_rpc_url_forms_and_broker_options() -> None:
    options = BackendOptions(
        broker_url="pyamqp://u:p@rabbit:5673/prod",
        # the broker's own options are the broker's business; connection options apply here too
        broker_transport_options=(("connect_timeout", 2), ("prefetch_count", 10)),
    )
    for url in ("rpc://", "rpc:///", "RPC://"):
        backend = RPCBackend(url, options)
        assert backend._params.host == "rabbit"
        assert backend._params.vhost == "prod"
        assert backend._params.connect_timeout == 2
    assert "p@" not in repr(backend)


def test_the_app_gives_the_store_its_broker_url() -> None:
    app = Celery(
        "t",
        broker="amqp://guest:guest@127.0.0.1:5672//",
        backend="rpc://",
        broker_transport_options={"heartbeat": 10},
        set_as_current=False,
    )
    store = app.create_result_store()
    assert isinstance(store, RPCBackend)
    assert store.options.broker_url == "amqp://guest:guest@127.0.0.1:5672//"
    assert store._params.heartbeat == 10


def test_reply_route_of_a_message() -> None:
    assert reply_route("q", "c", "t") == ReplyRoute("q", "c")
    assert reply_route("q", None, "t") == ReplyRoute("q", "t")  # Celery's fallback: the task id
    assert reply_route("q", "", "t") == ReplyRoute("q", "t")
    assert reply_route("", "c", "t") is None  # Celery writes "" for "no reply queue"
    assert reply_route(None, "c", "t") is None
    assert reply_route(7, "c", "t") is None  # a careless producer's value is no queue name


def test_other_stores_ignore_reply_routes() -> None:
    async def main() -> None:
        backend = MemoryBackend(f"memory://test-{uuid.uuid4().hex}", BackendOptions())
        await backend.connect()
        assert not backend.uses_reply_queue
        assert await backend.reply_queue() is None
        a, b = new_id(), new_id()
        await backend.store_routed(build_meta(a, states.SUCCESS, 1), ReplyRoute("q", a))
        await backend.store_many_routed([(build_meta(b, states.SUCCESS, 2), None)])
        assert (await backend.get(a))["result"] == 1
        assert (await backend.get(b))["result"] == 2

    asyncio.run(main())


# -- the reply queue --------------------------------------------------------------------------------


def test_reply_queue_is_declared_as_celery_declares_it(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url, expires=3600.0) as client:
            name = await client.reply_queue()
            assert name == client.oid
            assert str(uuid.UUID(name)) == name
            assert await client.reply_queue() == name  # declared once, same name
            async with raw_channel(amqp_url) as channel:
                # Re-declaring with Celery's flags succeeds only if they are exactly the same.
                await channel.queue_declare(
                    name, durable=True, auto_delete=True, arguments={"x-expires": 3600000}
                )
            async with raw_channel(amqp_url) as channel:
                with pytest.raises(amqp_errors.ChannelPreconditionFailed):
                    await channel.queue_declare(name, durable=True, auto_delete=True)
            async with raw_channel(amqp_url) as channel:
                ok = await channel.queue_declare(name, passive=True)
                assert ok.consumer_count == 1
        # auto_delete: the queue goes with its consumer
        await eventually(lambda: _not(queue_exists(amqp_url, name)))

    asyncio.run(main())


async def _not(check: Any) -> bool:
    return not await check


def test_no_expiry_declares_no_x_expires(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url, expires=None) as client:
            name = await client.reply_queue()
            async with raw_channel(amqp_url) as channel:
                await channel.queue_declare(name, durable=True, auto_delete=True)

    asyncio.run(main())


def test_a_worker_store_declares_nothing(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            task_id = new_id()
            await worker.store_routed(
                build_meta(task_id, states.SUCCESS, 1),
                ReplyRoute(await client.reply_queue(), task_id),
            )
            assert await client.wait(task_id, timeout=5)
            assert not await queue_exists(amqp_url, worker.oid)

    asyncio.run(main())


# -- documents ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [42, "text", [1, "two", None], {"a": {"b": [1.5]}}, None])
def test_round_trip(amqp_url: str, value: Any) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            task_id = new_id()
            route = ReplyRoute(await client.reply_queue(), task_id)
            written = build_meta(task_id, states.SUCCESS, value, extended={"name": "t.add"})
            await worker.store_routed(written, route)
            read = await client.wait(task_id, timeout=5)
            assert read == written
            assert list(read) == list(written)
            assert await client.get(task_id) == written

    asyncio.run(main())


def test_unknown_task_is_pending(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as client:
            task_id = new_id()
            meta = await client.get(task_id)
            assert (meta["status"], meta["result"], meta["task_id"]) == (
                states.PENDING,
                None,
                task_id,
            )

    asyncio.run(main())


def test_latest_document_per_task_and_other_tasks_buffered(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            queue = await client.reply_queue()
            a, b, c = new_id(), new_id(), new_id()
            await worker.store_many_routed(
                [
                    (build_meta(a, states.STARTED, {"pid": 1}), ReplyRoute(queue, a)),
                    (build_meta(b, states.SUCCESS, "b"), ReplyRoute(queue, b)),
                    (build_meta(c, states.RETRY, KeyError("again")), ReplyRoute(queue, c)),
                    (build_meta(a, states.SUCCESS, "a"), ReplyRoute(queue, a)),
                ]
            )
            assert (await client.wait(a, timeout=5))["result"] == "a"
            # b and c arrived while the caller waited for a: kept for when it asks.
            assert (await client.get(b))["result"] == "b"
            meta = await client.wait(c, timeout=1, states_wanted={states.RETRY})
            assert type(exception_from_meta(meta["result"])) is KeyError

    asyncio.run(main())


def test_success_is_final(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            task_id = new_id()
            route = ReplyRoute(await client.reply_queue(), task_id)
            await worker.store_routed(build_meta(task_id, states.SUCCESS, "first"), route)
            await client.wait(task_id, timeout=5)
            marker = new_id()
            await worker.store_many_routed(
                [
                    (build_meta(task_id, states.STARTED, {"pid": 1}), route),
                    (build_meta(task_id, states.FAILURE, ValueError("dup")), route),
                    (build_meta(marker, states.SUCCESS, 1), ReplyRoute(route.reply_to, marker)),
                ]
            )
            await client.wait(marker, timeout=5)  # replies arrive in order: the others are in
            assert (await client.get(task_id))["result"] == "first"

    asyncio.run(main())


def test_keyed_by_correlation_id_with_task_id_fallback(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as client:
            queue = await client.reply_queue()
            task_id = new_id()
            async with raw_channel(amqp_url) as channel:
                # An old sender: no correlation_id property, the document's task_id names it.
                body = b'{"status": "SUCCESS", "result": 3, "task_id": "%s"}' % task_id.encode()
                await channel.basic_publish(
                    body,
                    routing_key=queue,
                    properties=spec.Basic.Properties(content_type=JSON, content_encoding="utf-8"),
                )
            assert (await client.wait(task_id, timeout=5))["result"] == 3

    asyncio.run(main())


def test_no_reply_queue_no_reply(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            await client.reply_queue()
            task_id = new_id()
            await worker.store(build_meta(task_id, states.SUCCESS, 1))
            await worker.store_many([build_meta(task_id, states.SUCCESS, 1)])
            await worker.store_routed(build_meta(task_id, states.SUCCESS, 1), None)
            with pytest.raises(exceptions.TimeoutError):
                await client.wait(task_id, timeout=0.2)

    asyncio.run(main())


def test_unroutable_reply_is_dropped_with_a_debug_log(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker:
            task_id = new_id()
            gone = f"gone-{uuid.uuid4()}"
            with caplog.at_level(logging.DEBUG, logger=rpc_module.__name__):
                await worker.store_routed(
                    build_meta(task_id, states.SUCCESS, 1), ReplyRoute(gone, task_id)
                )
            assert any(
                gone in record.getMessage() and record.levelno == logging.DEBUG
                for record in caplog.records
            )
            assert not await queue_exists(amqp_url, gone)  # the worker declared nothing

    asyncio.run(main())


def test_reply_to_too_long_for_amqp_is_not_sent(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker:
            task_id = new_id()
            with caplog.at_level(logging.WARNING, logger=rpc_module.__name__):
                await worker.store_routed(
                    build_meta(task_id, states.SUCCESS, 1), ReplyRoute("é" * 200, task_id)
                )
            assert "longer than 255 bytes" in caplog.text

    asyncio.run(main())


@pytest.mark.parametrize(("persistent", "mode"), [(False, 1), (True, 2)])
def test_reply_message_on_the_wire(amqp_url: str, persistent: bool, mode: int) -> None:
    async def main() -> None:
        received: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
        async with (
            raw_channel(amqp_url) as channel,
            open_rpc(amqp_url, persistent=persistent) as worker,
        ):
            declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
            queue = declared.queue
            assert queue is not None
            await channel.basic_consume(queue, received.put, no_ack=True)
            task_id = new_id()
            meta = build_meta(task_id, states.SUCCESS, 5)
            await worker.store_routed(meta, ReplyRoute(queue, f"corr-{task_id}"))
            message = await asyncio.wait_for(received.get(), 5)
        properties = message.header.properties
        assert message.delivery.exchange == ""
        assert message.delivery.routing_key == queue
        assert properties.correlation_id == f"corr-{task_id}"
        assert properties.delivery_mode == mode
        assert properties.headers == {}
        assert properties.priority == 0
        assert (properties.content_type, properties.content_encoding) == (JSON, "utf-8")
        assert message.body == worker.encode_meta(meta).data

    asyncio.run(main())


def test_forget(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            task_id = new_id()
            route = ReplyRoute(await client.reply_queue(), task_id)
            await worker.store_routed(build_meta(task_id, states.SUCCESS, 1), route)
            await client.wait(task_id, timeout=5)
            await client.forget(task_id)
            assert (await client.get(task_id))["status"] == states.PENDING
            await client.forget(task_id)  # forgetting twice is fine
            # A forgotten success no longer blocks a new document for the id.
            await worker.store_routed(build_meta(task_id, states.STARTED), route)
            meta = await client.wait(task_id, timeout=5, states_wanted={states.STARTED})
            assert meta["status"] == states.STARTED

    asyncio.run(main())


def test_documents_expire_from_memory(amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_module, "SWEEP_EVERY", 3)

    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url, expires=0.2) as client:
            queue = await client.reply_queue()
            ids = [new_id() for _ in range(3)]
            for task_id in ids[:2]:
                await worker.store_routed(
                    build_meta(task_id, states.SUCCESS, 1), ReplyRoute(queue, task_id)
                )
                await client.wait(task_id, timeout=5)
            await asyncio.sleep(0.3)
            assert (await client.get(ids[0]))["status"] == states.PENDING
            # The third arrival sweeps what expired, read or not.
            await worker.store_routed(
                build_meta(ids[2], states.SUCCESS, 1), ReplyRoute(queue, ids[2])
            )
            await client.wait(ids[2], timeout=5)
            assert set(client._documents) == {ids[2]}

    asyncio.run(main())


def test_oldest_documents_go_past_the_limit(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(rpc_module, "MAX_DOCUMENTS", 3)

    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            queue = await client.reply_queue()
            ids = [new_id() for _ in range(5)]
            items = [
                (build_meta(i, states.SUCCESS, n), ReplyRoute(queue, i)) for n, i in enumerate(ids)
            ]
            # ids[0] arrives again last: its later arrival keeps it.
            items.append((build_meta(ids[0], states.SUCCESS, 0), ReplyRoute(queue, ids[0])))
            await worker.store_many_routed(items)
            await client.wait(ids[4], timeout=5)
            await eventually(lambda: _has(client, ids[0]))
            assert list(client._documents) == [ids[3], ids[4], ids[0]]
            assert (await client.get(ids[1]))["status"] == states.PENDING

    with caplog.at_level(logging.WARNING, logger=rpc_module.__name__):
        asyncio.run(main())
    assert "the oldest are dropped" in caplog.text


async def _has(backend: RPCBackend, task_id: str) -> bool:
    return task_id in backend._documents and backend._arrivals == 6


def test_result_accept_content_refuses_other_types(amqp_url: str) -> None:
    async def main() -> None:
        pickled = {"serializer": "pickle", "accept": frozenset({PICKLE, JSON})}
        async with open_rpc(amqp_url, **pickled) as worker, open_rpc(amqp_url) as client:
            task_id = new_id()
            route = ReplyRoute(await client.reply_queue(), task_id)
            await worker.store_routed(build_meta(task_id, states.SUCCESS, 1), route)
            with pytest.raises(exceptions.ContentDisallowed):
                await client.wait(task_id, timeout=5)
            with pytest.raises(exceptions.ContentDisallowed):
                await client.get(task_id)

    asyncio.run(main())


def test_unserializable_document_sends_nothing(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            queue = await client.reply_queue()
            good, bad = new_id(), new_id()
            with pytest.raises(exceptions.EncodeError):
                await worker.store_many_routed(
                    [
                        (build_meta(good, states.SUCCESS, 1), ReplyRoute(queue, good)),
                        (build_meta(bad, states.SUCCESS, object()), ReplyRoute(queue, bad)),
                    ]
                )
            with pytest.raises(exceptions.TimeoutError):
                await client.wait(good, timeout=0.2)

    asyncio.run(main())


# -- waiting --------------------------------------------------------------------------------------


def test_wait_is_woken_by_the_reply(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            assert client.pushes
            task_id = new_id()
            route = ReplyRoute(await client.reply_queue(), task_id)

            async def store_later() -> float:
                await asyncio.sleep(0.1)
                await worker.store_routed(build_meta(task_id, states.SUCCESS, "done"), route)
                return time.monotonic()

            writer = asyncio.create_task(store_later())
            # No timeout and a long interval: only the arriving reply can end this wait soon.
            meta = await client.wait(task_id, interval=10)
            seen_at = time.monotonic()
            assert meta["result"] == "done"
            assert seen_at - await writer < 0.05

    asyncio.run(main())


def test_wait_times_out(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            task_id = new_id()
            route = ReplyRoute(await client.reply_queue(), task_id)
            await worker.store_routed(build_meta(task_id, states.STARTED), route)
            await client.wait(task_id, timeout=5, states_wanted={states.STARTED})
            start = time.monotonic()
            with pytest.raises(exceptions.TimeoutError, match=task_id):
                await client.wait(task_id, timeout=0.2)
            assert 0.19 <= time.monotonic() - start < 0.5
            assert not client._waiters  # nothing left behind

    asyncio.run(main())


def test_close_ends_waits_with_a_connection_error(amqp_url: str) -> None:
    async def main() -> None:
        client = rpc_store(amqp_url)
        await client.connect()
        waiting = asyncio.create_task(client.wait(new_id(), timeout=5))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(exceptions.ConnectionError, match="not connected"):
            await waiting

    asyncio.run(main())


# -- connections ------------------------------------------------------------------------------------


def test_not_connected(amqp_url: str) -> None:
    async def main() -> None:
        backend = rpc_store(amqp_url)
        with pytest.raises(exceptions.ConnectionError, match="not connected"):
            await backend.get(new_id())
        async with open_rpc(amqp_url) as backend:
            pass
        for call in (
            backend.get(new_id()),
            backend.reply_queue(),
            backend.store_routed(build_meta(new_id(), states.SUCCESS, 1), ReplyRoute("q", "c")),
        ):
            with pytest.raises(exceptions.ConnectionError, match="not connected"):
                await call

    asyncio.run(main())


def test_unreachable_broker_is_a_connection_error() -> None:
    async def main() -> None:
        backend = RPCBackend(
            "rpc://",
            BackendOptions(
                broker_url="amqp://guest:guest@127.0.0.1:1//",
                broker_transport_options=(("connect_timeout", 1),),
            ),
        )
        with pytest.raises(exceptions.ConnectionError, match=r"127\.0\.0\.1:1"):
            await backend.connect()
        await backend.close()

    asyncio.run(main())


def test_wrong_password_is_improperly_configured(amqp_url: str) -> None:
    async def main() -> None:
        backend = rpc_store(amqp_url.replace("guest:guest", "guest:wrong"))
        with pytest.raises(exceptions.ImproperlyConfigured, match="refused the login"):
            await backend.connect()
        await backend.close()

    asyncio.run(main())


class CuttableProxy:
    """A TCP relay to RabbitMQ whose connections the test cuts, as a network failure would."""

    def __init__(self) -> None:
        self.accepting = True
        self._transports: list[asyncio.BaseTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}//"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(services.AMQP_HOST, services.AMQP_PORT)
        self._transports += [writer.transport, up_writer.transport]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()

    def cut(self) -> None:
        for transport in self._transports:
            transport.abort()
        self._transports.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def test_reconnects_and_consumes_again_after_a_connection_loss(amqp_url: str) -> None:
    async def main() -> None:
        proxy = CuttableProxy()
        proxied = await proxy.start()
        try:
            async with open_rpc(amqp_url) as worker, open_rpc(proxied) as client:
                queue = await client.reply_queue()
                before, lost, after = new_id(), new_id(), new_id()
                await worker.store_routed(
                    build_meta(before, states.SUCCESS, "before"), ReplyRoute(queue, before)
                )
                await client.wait(before, timeout=5)
                waiting = asyncio.create_task(client.wait(after, timeout=10))

                proxy.accepting = False
                proxy.cut()
                # RabbitMQ deletes the auto_delete queue as its consumer's connection drops...
                await eventually(lambda: _not(queue_exists(amqp_url, queue)))
                # ...so a reply sent now is unroutable and lost, not an error for the worker.
                await worker.store_routed(
                    build_meta(lost, states.SUCCESS, "lost"), ReplyRoute(queue, lost)
                )
                proxy.accepting = True
                # The store reconnects and declares its queue again, under the same name.
                await eventually(lambda: queue_exists(amqp_url, queue))
                await worker.store_routed(
                    build_meta(after, states.SUCCESS, "after"), ReplyRoute(queue, after)
                )
                assert (await waiting)["result"] == "after"  # a wait spans the reconnect
                assert (await client.get(before))["result"] == "before"  # kept in memory
                assert (await client.get(lost))["status"] == states.PENDING
                assert await client.reply_queue() == queue
        finally:
            await proxy.close()

    asyncio.run(main())


def test_reply_queue_deleted_on_the_broker_is_declared_again(amqp_url: str) -> None:
    async def main() -> None:
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            queue = await client.reply_queue()
            async with raw_channel(amqp_url) as channel:
                await channel.queue_delete(queue)
            await eventually(lambda: queue_exists(amqp_url, queue))
            task_id = new_id()
            await worker.store_routed(
                build_meta(task_id, states.SUCCESS, 1), ReplyRoute(queue, task_id)
            )
            assert (await client.wait(task_id, timeout=5))["result"] == 1

    asyncio.run(main())


def test_worker_side_reconnects_on_next_store(amqp_url: str) -> None:
    async def main() -> None:
        proxy = CuttableProxy()
        proxied = await proxy.start()
        try:
            async with open_rpc(proxied) as worker, open_rpc(amqp_url) as client:
                queue = await client.reply_queue()
                first, second = new_id(), new_id()
                await worker.store_routed(
                    build_meta(first, states.SUCCESS, 1), ReplyRoute(queue, first)
                )
                proxy.cut()
                await eventually(lambda: _is_lost(worker))
                await worker.store_routed(
                    build_meta(second, states.SUCCESS, 2), ReplyRoute(queue, second)
                )
                assert (await client.wait(second, timeout=5))["result"] == 2
        finally:
            await proxy.close()

    asyncio.run(main())


async def _is_lost(backend: RPCBackend) -> bool:
    return backend._channel is None


def test_store_while_the_broker_is_unreachable_is_a_connection_error(amqp_url: str) -> None:
    async def main() -> None:
        proxy = CuttableProxy()
        proxied = await proxy.start()
        try:
            async with open_rpc(proxied) as worker:
                proxy.accepting = False
                proxy.cut()
                await eventually(lambda: _is_lost(worker))
                task_id = new_id()
                with pytest.raises(exceptions.ConnectionError):
                    await worker.store_routed(
                        build_meta(task_id, states.SUCCESS, 1), ReplyRoute("q", task_id)
                    )
        finally:
            await proxy.close()

    asyncio.run(main())


def test_store_connected_before_fork_gets_a_queue_of_its_own_in_the_child(amqp_url: str) -> None:
    async def connect() -> RPCBackend:
        backend = rpc_store(amqp_url)
        await backend.connect()
        await backend.reply_queue()
        return backend

    backend = asyncio.run(connect())
    parent_queue = backend.oid

    async def use_in_child() -> None:
        async with open_rpc(amqp_url) as worker:
            queue = await backend.reply_queue()
            assert queue != parent_queue
            task_id = new_id()
            await worker.store_routed(
                build_meta(task_id, states.SUCCESS, "child"), ReplyRoute(queue, task_id)
            )
            assert (await backend.wait(task_id, timeout=5))["result"] == "child"
        await backend.close()

    assert run_in_fork_child(use_in_child) == 0

    async def check_parent() -> None:
        # The connection belonged to the loop of connect(), gone now: the store starts afresh.
        await backend.close()
        await backend.connect()
        async with open_rpc(amqp_url) as worker:
            queue = await backend.reply_queue()
            assert queue != parent_queue
            task_id = new_id()
            await worker.store_routed(
                build_meta(task_id, states.SUCCESS, "parent"), ReplyRoute(queue, task_id)
            )
            assert (await backend.wait(task_id, timeout=5))["result"] == "parent"
        await backend.close()

    asyncio.run(check_parent())


# -- the worker's pipeline --------------------------------------------------------------------------


def test_finisher_passes_each_reply_route(amqp_url: str) -> None:
    from celeriac.brokers.base import BrokerOptions
    from celeriac.brokers.memory import MemoryBroker

    async def main() -> None:
        broker = MemoryBroker(f"memory://test-{uuid.uuid4().hex}", BrokerOptions())
        await broker.connect()
        async with open_rpc(amqp_url) as worker, open_rpc(amqp_url) as client:
            queue = await client.reply_queue()
            finisher = Finisher(broker, worker)
            ids = [new_id() for _ in range(20)]
            await asyncio.gather(
                *(
                    finisher.finish(build_meta(i, states.SUCCESS, n), None, ReplyRoute(queue, i))
                    for n, i in enumerate(ids)
                ),
                finisher.store(build_meta(ids[0], states.STARTED), ReplyRoute(queue, ids[0])),
            )
            for n, task_id in enumerate(ids):
                assert (await client.wait(task_id, timeout=5))["result"] == n
            # A value that cannot be encoded becomes a FAILURE sent to the same caller.
            bad = new_id()
            await finisher.finish(
                build_meta(bad, states.SUCCESS, object()), None, ReplyRoute(queue, bad)
            )
            meta = await client.wait(bad, timeout=5)
            assert meta["status"] == states.FAILURE
        await broker.close()

    asyncio.run(main())


# -- interop with the real Celery ------------------------------------------------------------------


@pytest.fixture
def celery_app(amqp_url: str) -> Iterator[Any]:
    celery = pytest.importorskip("celery")
    app = celery.Celery("rpc-interop", broker=amqp_url, backend="rpc://", result_expires=60)
    try:
        yield app
    finally:
        consumer = app.backend.result_consumer
        if consumer._connection is not None:  # started by AsyncResult.get()
            consumer.stop()
        with contextlib.suppress(Exception), app.connection_for_write() as conn:
            conn.default_channel.queue_delete(app.backend.oid)
        app.close()


def test_celery_client_reads_our_replies(amqp_url: str, celery_app: Any) -> None:
    # The Celery client's reply queue exists before the task is sent (Celery's on_task_call).
    with celery_app.connection_for_write() as conn:
        celery_app.backend.binding(conn.default_channel).declare()
    queue = celery_app.backend.oid
    ok, failed, revoked = new_id(), new_id(), new_id()

    async def reply() -> None:
        async with open_rpc(amqp_url) as worker:
            await worker.store_many_routed(
                [
                    (build_meta(ok, states.STARTED, {"pid": 1}), ReplyRoute(queue, ok)),
                    (build_meta(ok, states.SUCCESS, {"a": [1, 2]}), ReplyRoute(queue, ok)),
                    (
                        build_meta(failed, states.FAILURE, KeyError("missing"), traceback="tb"),
                        ReplyRoute(queue, failed),
                    ),
                    (
                        build_meta(revoked, states.REVOKED, exceptions.TaskRevokedError("expired")),
                        ReplyRoute(queue, revoked),
                    ),
                ]
            )

    asyncio.run(reply())
    assert celery_app.AsyncResult(ok).get(timeout=5) == {"a": [1, 2]}
    result = celery_app.AsyncResult(failed)
    with pytest.raises(KeyError, match="missing"):
        result.get(timeout=5)
    assert result.state == states.FAILURE
    assert result.traceback == "tb"
    from celery.exceptions import TaskRevokedError

    with pytest.raises(TaskRevokedError):
        celery_app.AsyncResult(revoked).get(timeout=5)


def test_our_reply_queue_is_equivalent_to_celerys(amqp_url: str, celery_app: Any) -> None:
    async def declare() -> RPCBackend:
        backend = rpc_store(amqp_url, expires=60.0)
        await backend.connect()
        await backend.reply_queue()
        return backend

    loop = asyncio.new_event_loop()
    try:
        backend = loop.run_until_complete(declare())
        # Celery declares its binding for the same name: RabbitMQ refuses any difference in
        # durable / auto_delete / arguments with PRECONDITION_FAILED.
        celery_app.backend.__dict__["oid"] = backend.oid
        with celery_app.connection_for_write() as conn:
            celery_app.backend.binding(conn.default_channel).declare()
        loop.run_until_complete(backend.close())
    finally:
        loop.close()


def test_we_read_replies_of_celerys_backend(amqp_url: str, celery_app: Any) -> None:
    from celery.app.task import Context

    async def main() -> None:
        async with open_rpc(amqp_url) as client:
            queue = await client.reply_queue()
            ok, failed = new_id(), new_id()

            def celery_worker_side() -> None:
                backend = celery_app.backend
                backend.store_result(
                    ok, 7, states.SUCCESS, request=Context(reply_to=queue, correlation_id=ok)
                )
                backend.mark_as_failure(
                    failed,
                    ValueError("boom"),
                    traceback="tb",
                    request=Context(id=failed, reply_to=queue, correlation_id=failed),
                )

            await asyncio.to_thread(celery_worker_side)
            meta = await client.wait(ok, timeout=5)
            assert (meta["status"], meta["result"]) == (states.SUCCESS, 7)
            meta = await client.wait(failed, timeout=5)
            assert meta["status"] == states.FAILURE
            assert meta["traceback"] == "tb"
            exc = exception_from_meta(meta["result"])
            assert type(exc) is ValueError
            assert exc.args == ("boom",)

    asyncio.run(main())


# -- a real worker answering through rpc:// ----------------------------------------------------------


def test_worker_replies_to_the_callers_queue(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks go through the in-process broker; every document comes back through rpc://."""
    from dataclasses import replace

    from celeriac.contrib.testing import start_worker

    app = Celery(
        "rpc-e2e",
        broker=f"memory://rpc-{uuid.uuid4().hex}",
        backend="rpc://",
        task_track_started=True,
        set_as_current=False,
    )
    # rpc:// talks to the broker of broker_url; here that broker carries only the replies.
    options = app.backend_options()
    monkeypatch.setattr(app, "backend_options", lambda: replace(options, broker_url=amqp_url))

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def fail() -> None:
        raise ValueError("no")

    @app.task(bind=True)
    def flaky(self: Any) -> str:
        if self.request.retries < 1:
            raise self.retry(countdown=0)
        return "third time lucky"

    try:
        with start_worker(app):
            result = add.delay(2, 3)
            assert result.get(timeout=5) == 5
            with pytest.raises(ValueError, match="no"):
                fail.delay().get(timeout=5)
            assert flaky.delay().get(timeout=5) == "third time lucky"
            with pytest.raises(exceptions.TaskRevokedError):
                add.apply_async((1, 2), expires=-1).get(timeout=5)
            with pytest.raises(exceptions.NotRegistered):
                app.send_task("tests.nobody.registered.this").get(timeout=5)
        store = app.backend
        assert isinstance(store, RPCBackend)
        assert store._consuming
    finally:
        app.close()
