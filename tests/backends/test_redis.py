"""The Redis result store against the real Redis and the real Celery package.

The conformance suite (test_conformance.py) runs on this store too; here are the Redis-specific
checks: Celery's exact keys and values both ways, success-is-final against whatever Celery wrote,
expiry, one shared pub/sub connection, connection loss and recovery, and the speed figures.

Every test works on database ``services.REDIS_DB`` under a ``global_keyprefix`` of its own, and
deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync

from celeriac import codecs, exceptions, states
from celeriac.backends import redis as redis_store
from celeriac.backends.base import BackendOptions
from celeriac.backends.meta import build_meta, exception_from_meta
from celeriac.backends.redis import RedisBackend, key_prefix
from tests import services

JSON = "application/json"
PICKLE = "application/x-python-serialize"
MSGPACK = "application/x-msgpack"


def new_id() -> str:
    return str(uuid.uuid4())


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def raw() -> Iterator[redis_sync.Redis]:
    """A plain client on the test database, to look at (and tamper with) what the store wrote."""
    services.require_redis()
    client = redis_sync.Redis(
        host=services.REDIS_HOST, port=services.REDIS_PORT, db=services.REDIS_DB
    )
    yield client
    client.close()


@pytest.fixture
def prefix(raw: redis_sync.Redis) -> Iterator[str]:
    """A ``global_keyprefix`` of this test's own; its keys are deleted afterwards."""
    value = services.unique("rt") + ":"
    yield value
    keys = list(raw.scan_iter(match=f"{value}*", count=1000))
    if keys:
        raw.delete(*keys)


@pytest.fixture
def name() -> str:
    """A client name of this test's own (CLIENT LIST / CLIENT KILL pick its connections)."""
    return services.unique("celeriac-rt-")


Factory = Callable[..., RedisBackend]


@pytest.fixture
def make(prefix: str, name: str) -> Factory:
    """``make(**BackendOptions fields, url=..., options={...})``: an unconnected store."""

    def build(
        url: str | None = None, options: dict[str, Any] | None = None, **fields: Any
    ) -> RedisBackend:
        transport = {"global_keyprefix": prefix, "client_name": name, **(options or {})}
        fields.setdefault("transport_options", tuple(transport.items()))
        return RedisBackend(url or services.redis_url(), BackendOptions(**fields))

    return build


@contextlib.asynccontextmanager
async def opened(backend: RedisBackend) -> AsyncIterator[RedisBackend]:
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


def key(prefix: str, task_id: str) -> bytes:
    return f"{prefix}celery-task-meta-{task_id}".encode()


def clients_named(raw: redis_sync.Redis, client_name: str) -> list[dict[str, Any]]:
    return [c for c in raw.client_list() if c.get("name") == client_name]


def kill_clients(raw: redis_sync.Redis, client_name: str) -> int:
    """CLIENT KILL every connection called ``client_name`` (only this test's own)."""
    killed = 0
    for client in clients_named(raw, client_name):
        killed += int(raw.client_kill_filter(_id=client["id"]))
    return killed


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


def subscribed(backend: RedisBackend, task_id: str) -> bool:
    """Whether the store's waiters on ``task_id`` have a confirmed subscription."""
    listener = backend._listener
    assert listener is not None
    entry = listener._channels.get(backend.key(task_id))
    return entry is not None and entry.confirmed


# -- Celery ---------------------------------------------------------------------------------------


@pytest.fixture
def celery_app(prefix: str) -> Iterator[Any]:
    """A real Celery app whose result backend is this test's Redis prefix."""
    celery = pytest.importorskip("celery")
    app = celery.Celery(
        "interop",
        broker="memory://",
        backend=services.redis_url(),
        result_backend_transport_options={"global_keyprefix": prefix},
    )
    yield app
    app.backend.result_consumer.stop()
    app.backend.client.close()
    app.close()


def celery_app_with(prefix: str, **conf: Any) -> Any:
    celery = pytest.importorskip("celery")
    return celery.Celery(
        "interop",
        broker="memory://",
        backend=services.redis_url(),
        result_backend_transport_options={"global_keyprefix": prefix},
        **conf,
    )


# -- layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "celery-task-meta-"),
        ("", "celery-task-meta-"),
        ("app", "app_celery-task-meta-"),
        ("app:", "app:celery-task-meta-"),
        ("app_", "app_celery-task-meta-"),
        ("app-", "app-celery-task-meta-"),
        ("app.", "app.celery-task-meta-"),
    ],
)
def test_key_prefix_follows_celery(given: str | None, expected: str) -> None:
    options = {} if given is None else {"global_keyprefix": given}
    assert key_prefix(options) == expected


def test_keys_values_and_expiry_are_celerys(make: Factory, raw: redis_sync.Redis) -> None:
    async def main() -> None:
        async with opened(make(options={"global_keyprefix": "pfx"})) as backend:
            assert backend.prefix == "pfx_celery-task-meta-"
            task_id = new_id()
            meta = build_meta(task_id, states.SUCCESS, {"x": [1, 2]})
            await backend.store(meta)
            stored = raw.get(f"pfx_celery-task-meta-{task_id}")
            assert stored == json.dumps(meta).encode()  # the encoded document, nothing around it
            assert 86399 <= raw.ttl(f"pfx_celery-task-meta-{task_id}") <= 86400
            raw.delete(f"pfx_celery-task-meta-{task_id}")

    asyncio.run(main())


@pytest.mark.parametrize(("expires", "ttl_ms"), [(None, -1), (0, -1), (30, 30_000), (2.5, 2_500)])
def test_expiry_settings(
    make: Factory, raw: redis_sync.Redis, prefix: str, expires: float | None, ttl_ms: int
) -> None:
    # None and 0 keep results forever (PTTL -1), as in Celery; a fraction of a second is kept.
    async def main() -> None:
        async with opened(make(expires=expires)) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 1))
            pttl = raw.pttl(key(prefix, task_id))
            assert pttl == -1 if ttl_ms == -1 else ttl_ms - 200 < pttl <= ttl_ms

    asyncio.run(main())


def test_result_expires_one_second(make: Factory, raw: redis_sync.Redis, prefix: str) -> None:
    async def main() -> None:
        async with opened(make(expires=1)) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 1))
            assert raw.ttl(key(prefix, task_id)) == 1
            assert 900 <= raw.pttl(key(prefix, task_id)) <= 1000
            await asyncio.sleep(1.05)
            assert raw.exists(key(prefix, task_id)) == 0
            assert (await backend.get(task_id))["status"] == states.PENDING

    asyncio.run(main())


def test_every_write_is_published_on_the_keys_channel(
    make: Factory, raw: redis_sync.Redis, prefix: str
) -> None:
    task_id = new_id()
    pubsub = raw.pubsub()
    pubsub.subscribe(key(prefix, task_id))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    metas = [
        build_meta(task_id, states.STARTED, {"pid": 1}),
        build_meta(task_id, states.SUCCESS, 2),
        build_meta(task_id, states.FAILURE, ValueError("refused: success is final")),
    ]

    async def main() -> None:
        async with opened(make()) as backend:
            for meta in metas:
                await backend.store(meta)

    asyncio.run(main())
    published = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        published.append(message["data"])
    pubsub.close()
    assert published == [json.dumps(metas[0]).encode(), json.dumps(metas[1]).encode()]


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "match"),
    [
        ("redis://h/0", {"global_keyprefx": "x"}, "Did you mean 'global_keyprefix'"),
        ("redis://h/0", {"visibility_timeout": 1}, "Known options: client_name"),
        ("redis://h/0", {"global_keyprefix": 5}, "global_keyprefix must be a string"),
        ("redis://h/0", {"master_name": "m"}, "only applies to sentinel://"),
        ("redis+socket:///tmp/r.sock", {"ssl": {}}, "only applies to rediss://"),
        ("redis://h/0", {"socket_timeout": "soon"}, "socket_timeout must be a number"),
        ("redis://h/x", {}, "must be a number"),
        ("redis://h/0?nope=1", {}, "unknown option"),
        ("sentinel://h:26379", {}, "master_name"),
    ],
)
def test_bad_options_are_refused(url: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match=match):
        RedisBackend(url, BackendOptions(transport_options=tuple(options.items())))


def test_unknown_serializer_is_refused_at_once() -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match="unknown serializer"):
        RedisBackend("redis://h/0", BackendOptions(serializer="jsno"))


def test_connection_options_are_applied(make: Factory, raw: redis_sync.Redis, name: str) -> None:
    async def main() -> None:
        backend = make(options={"socket_timeout": 3, "health_check_interval": 7})
        async with opened(backend):
            assert backend._client is not None
            kwargs = backend._client.connection_pool.connection_kwargs
            assert (kwargs["socket_timeout"], kwargs["health_check_interval"]) == (3.0, 7)
            assert len(clients_named(raw, name)) == 1  # the connect's PING

    asyncio.run(main())


def test_unreachable_redis_is_a_connection_error(make: Factory) -> None:
    backend = make(url="redis://127.0.0.1:1/9", options={"socket_connect_timeout": 0.5})
    start = time.monotonic()
    with pytest.raises(exceptions.ConnectionError, match=r"127\.0\.0\.1:1/9.*connect"):
        asyncio.run(backend.connect())
    assert time.monotonic() - start < 3


def test_closed_store_says_not_connected(make: Factory) -> None:
    async def main() -> None:
        backend = make()
        async with opened(backend):
            pass
        for call in (backend.get(new_id()), backend.wait(new_id(), timeout=1)):
            with pytest.raises(exceptions.ConnectionError, match="not connected"):
                await call

    asyncio.run(main())


# -- Celery interop ----------------------------------------------------------------------------------


def test_celery_reads_our_results(make: Factory, celery_app: Any) -> None:
    from celery.exceptions import TaskRevokedError as CeleryRevoked

    ok, failed, revoked = new_id(), new_id(), new_id()

    async def main() -> None:
        async with opened(make()) as backend:
            await backend.store_many(
                [
                    build_meta(ok, states.SUCCESS, {"answer": [42, "x"]}),
                    build_meta(failed, states.FAILURE, ValueError("bad thing"), traceback="tb"),
                    build_meta(revoked, states.REVOKED, exceptions.TaskRevokedError("revoked")),
                ]
            )

    asyncio.run(main())
    assert celery_app.AsyncResult(ok).get(timeout=5) == {"answer": [42, "x"]}
    with pytest.raises(ValueError, match=r"^bad thing$"):
        celery_app.AsyncResult(failed).get(timeout=5)
    assert celery_app.AsyncResult(failed).traceback == "tb"
    with pytest.raises(CeleryRevoked, match="revoked"):
        celery_app.AsyncResult(revoked).get(timeout=5)


def test_we_read_celerys_results(make: Factory, celery_app: Any) -> None:
    ok, failed, started = new_id(), new_id(), new_id()
    celery_app.backend.store_result(ok, {"answer": 42}, states.SUCCESS)
    celery_app.backend.store_result(failed, KeyError("missing"), states.FAILURE, traceback="tb")
    celery_app.backend.store_result(started, {"pid": 7, "hostname": "w"}, states.STARTED)

    async def main() -> None:
        async with opened(make()) as backend:
            meta = await backend.get(ok)
            assert (meta["status"], meta["result"], meta["task_id"]) == (
                states.SUCCESS,
                {"answer": 42},
                ok,
            )
            meta = await backend.wait(failed, timeout=1)
            assert meta["traceback"] == "tb"
            exc = exception_from_meta(meta["result"])
            assert type(exc) is KeyError
            assert exc.args == ("missing",)
            meta = await backend.wait(started, timeout=1, states_wanted={states.STARTED})
            assert meta["result"] == {"pid": 7, "hostname": "w"}

    asyncio.run(main())


def test_celerys_store_result_wakes_our_waiter(make: Factory, celery_app: Any) -> None:
    task_id = new_id()
    celery_app.backend.client.ping()  # connected before the clock starts

    async def main() -> float:
        async with opened(make()) as backend:
            waiting = asyncio.create_task(backend.wait(task_id, timeout=10))
            await until(lambda: subscribed(backend, task_id))
            await asyncio.sleep(0.01)  # the waiter has read the key and sleeps
            written = threading.Event()

            def celery_writes() -> float:
                celery_app.backend.store_result(task_id, "from celery", states.SUCCESS)
                written.set()
                return time.monotonic()

            written_at = await asyncio.to_thread(celery_writes)
            meta = await waiting
            assert meta["result"] == "from celery"
            return time.monotonic() - written_at

    delay = asyncio.run(main())
    print(f"\nwoken {delay * 1000:.2f} ms after Celery's store_result returned")
    assert delay < 0.05


def test_success_written_by_celery_is_final(make: Factory, celery_app: Any) -> None:
    task_id = new_id()
    celery_app.backend.store_result(task_id, "celery's", states.SUCCESS)

    async def main() -> None:
        async with opened(make()) as backend:
            await backend.store(build_meta(task_id, states.FAILURE, ValueError("duplicate")))
            await backend.store_many([build_meta(task_id, states.STARTED)])
            meta = await backend.get(task_id)
            assert (meta["status"], meta["result"]) == (states.SUCCESS, "celery's")

    asyncio.run(main())
    assert celery_app.AsyncResult(task_id).get(timeout=5) == "celery's"


@pytest.mark.parametrize(
    ("celery_conf", "our_fields"),
    [
        ({"result_extended": True}, {}),
        (
            {"result_serializer": "pickle", "result_accept_content": ["pickle"]},
            {"serializer": "pickle", "accept": frozenset({PICKLE})},
        ),
        (
            {"result_serializer": "msgpack", "result_accept_content": ["msgpack"]},
            {"serializer": "msgpack", "accept": frozenset({MSGPACK})},
        ),
        ({"result_compression": "zlib"}, {}),
    ],
    ids=["json-extended", "pickle", "msgpack", "compressed"],
)
def test_success_written_by_celery_is_final_for_every_format(
    make: Factory, prefix: str, celery_conf: dict[str, Any], our_fields: dict[str, Any]
) -> None:
    app = celery_app_with(prefix, **celery_conf)
    try:
        task_id = new_id()
        app.backend.store_result(task_id, [1, "one"], states.SUCCESS)

        async def main() -> None:
            async with opened(make(**our_fields)) as backend:
                await backend.store(build_meta(task_id, states.FAILURE, ValueError("dup")))
                meta = await backend.get(task_id)
                assert (meta["status"], meta["result"]) == (states.SUCCESS, [1, "one"])

        asyncio.run(main())
        assert app.AsyncResult(task_id).get(timeout=5) == [1, "one"]
    finally:
        app.backend.client.close()
        app.close()


def test_non_final_state_written_by_celery_is_replaced(make: Factory, celery_app: Any) -> None:
    task_id = new_id()
    celery_app.backend.store_result(task_id, {"pid": 1, "hostname": "w"}, states.STARTED)

    async def main() -> None:
        async with opened(make()) as backend:
            await backend.store(build_meta(task_id, states.SUCCESS, "ours"))

    asyncio.run(main())
    assert celery_app.AsyncResult(task_id).get(timeout=5) == "ours"


# -- success is final, however the stored value looks --------------------------------------------------


def _msgpack(value: Any) -> bytes:
    return codecs.dumps(value, "msgpack").data


STORED_SUCCESSES: dict[str, Callable[[str], bytes]] = {
    # json with the status not first: decoded by cjson inside the script
    "json-reordered": lambda t: json.dumps(
        {"result": 1, "status": "SUCCESS", "task_id": t}
    ).encode(),
    # json with the state spelled with an escape: found by decoding, not by the text
    "json-escaped": lambda t: (
        b'{"status": "\\u0053UCCESS", "result": 1, "task_id": "' + t.encode() + b'"}'
    ),
    # msgpack, while the store itself writes json: decoded by cmsgpack inside the script
    "msgpack": lambda t: _msgpack({"status": "SUCCESS", "result": 1, "task_id": t}),
    # Celery 5.7 compressed payload: handed back to Python, decompressed and decoded there
    "compressed": lambda t: codecs.compress_payload(
        json.dumps({"status": "SUCCESS", "result": 1, "task_id": t}).encode(), "zlib"
    ),
}


@pytest.mark.parametrize("form", sorted(STORED_SUCCESSES))
def test_success_is_recognised_in_any_stored_form(
    make: Factory, raw: redis_sync.Redis, prefix: str, form: str
) -> None:
    async def main() -> None:
        accept = frozenset({JSON, MSGPACK})
        async with opened(make(accept=accept)) as backend:
            task_id = new_id()
            raw.set(key(prefix, task_id), STORED_SUCCESSES[form](task_id))
            await backend.store(build_meta(task_id, states.FAILURE, ValueError("dup")))
            assert raw.get(key(prefix, task_id)) == STORED_SUCCESSES[form](task_id)
            meta = await backend.get(task_id)
            assert (meta["status"], meta["result"]) == (states.SUCCESS, 1)

    asyncio.run(main())


@pytest.mark.parametrize(
    "stored",
    [
        b'{"status": "STARTED", "result": "SUCCESS is a word here"}',
        b"not a document at all",
        b'{"status": ["SUCCESS"]}',
        b"\x00celery-compressed\x00application/x-zlib\x00garbage",
    ],
)
def test_values_that_are_not_a_success_are_replaced(
    make: Factory, raw: redis_sync.Redis, prefix: str, stored: bytes
) -> None:
    async def main() -> None:
        async with opened(make()) as backend:
            task_id = new_id()
            raw.set(key(prefix, task_id), stored)
            await backend.store(build_meta(task_id, states.SUCCESS, "ours"))
            assert (await backend.get(task_id))["result"] == "ours"

    asyncio.run(main())


def test_a_value_that_is_not_a_string_is_replaced(
    make: Factory, raw: redis_sync.Redis, prefix: str
) -> None:
    async def main() -> None:
        async with opened(make()) as backend:
            task_id = new_id()
            raw.rpush(key(prefix, task_id), b"x")
            await backend.store_many([build_meta(task_id, states.SUCCESS, "ours")])
            assert (await backend.get(task_id))["result"] == "ours"

    asyncio.run(main())


def test_compare_and_set_sees_a_success_written_in_between(
    make: Factory, raw: redis_sync.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With pickle the script cannot judge a stored value: the store decodes it, then writes only if
    # the value is still the one it judged. A SUCCESS landing in between must win.
    pickled = {"serializer": "pickle", "accept": frozenset({PICKLE})}

    async def main() -> None:
        async with opened(make(**pickled)) as backend, opened(make(**pickled)) as other:
            task_id = new_id()
            # (a value without the text SUCCESS in it is known not to be one without decoding)
            await backend.store(build_meta(task_id, states.STARTED, {"note": "SUCCESS soon"}))
            judged = backend._is_success
            raced: list[bool] = []

            def success_sneaks_in(data: bytes) -> bool:
                verdict = judged(data)
                if not raced:
                    raced.append(True)
                    payload = other.encode_meta(build_meta(task_id, states.SUCCESS, "other"))
                    raw.set(key(prefix, task_id), payload.data)
                return verdict

            monkeypatch.setattr(backend, "_is_success", success_sneaks_in)
            await backend.store(build_meta(task_id, states.FAILURE, ValueError("late")))
            assert raced
            meta = await backend.get(task_id)
            assert (meta["status"], meta["result"]) == (states.SUCCESS, "other")

    asyncio.run(main())


def test_content_type_is_taken_from_unmistakable_bytes(
    make: Factory, raw: redis_sync.Redis, prefix: str
) -> None:
    async def main() -> None:
        async with (
            opened(make()) as json_only,
            opened(make(accept=frozenset({JSON, MSGPACK}))) as both,
        ):
            task_id = new_id()
            raw.set(key(prefix, task_id), _msgpack(build_meta(task_id, states.SUCCESS, 5)))
            with pytest.raises(exceptions.ContentDisallowed, match="msgpack"):
                await json_only.get(task_id)
            assert (await both.get(task_id))["result"] == 5

    asyncio.run(main())


# -- batches ---------------------------------------------------------------------------------------------


def test_store_many_is_one_round_trip(make: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with opened(make()) as backend:
            pipe = backend._pipe
            assert pipe is not None
            calls: list[list[tuple[Any, int]]] = []
            execute = pipe.execute

            def counting(commands: Any, **options: Any) -> Any:
                calls.append([(command[0], command[2]) for command in commands])
                return execute(commands, **options)

            monkeypatch.setattr(pipe, "execute", counting)
            ids = [new_id() for _ in range(100)]
            await backend.store_many([build_meta(i, states.SUCCESS, n) for n, i in enumerate(ids)])
            monkeypatch.undo()
            assert calls == [[("EVALSHA", 100)]]  # one command, one write, one round trip
            assert [(await backend.get(i))["result"] for i in ids] == list(range(100))

    asyncio.run(main())


def test_store_many_larger_than_one_script_call(make: Factory) -> None:
    async def main() -> None:
        async with opened(make()) as backend:
            count = redis_store.MAX_KEYS_PER_CALL * 2 + 7
            ids = [new_id() for _ in range(count)]
            await backend.store(build_meta(ids[-1], states.SUCCESS, "kept"))
            batch = [build_meta(i, states.SUCCESS, n) for n, i in enumerate(ids)]
            await backend.store_many(batch)
            assert (await backend.get(ids[0]))["result"] == 0
            assert (await backend.get(ids[count // 2]))["result"] == count // 2
            assert (await backend.get(ids[-1]))["result"] == "kept"

    asyncio.run(main())


def test_store_many_judges_in_python_only_what_the_script_cannot(
    make: Factory, raw: redis_sync.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pickle values holding the text SUCCESS are handed back to Python to judge, and written
    # again (guarded) only if they are not one; the rest of the batch is settled in the first
    # round. Two keys per script call: the guarded round is split into calls too.
    monkeypatch.setattr(redis_store, "MAX_KEYS_PER_CALL", 2)
    pickled = {"serializer": "pickle", "accept": frozenset({PICKLE})}

    async def main() -> None:
        async with opened(make(**pickled)) as backend:
            ids = [new_id() for _ in range(7)]
            stored = {
                0: build_meta(ids[0], states.STARTED, "SUCCESS soon"),  # judged: replaced
                2: build_meta(ids[2], states.SUCCESS, "kept"),  # judged: kept
                3: build_meta(ids[3], states.RETRY, "not yet"),  # no SUCCESS text: replaced
                5: build_meta(ids[5], states.PENDING, "SUCCESS later"),  # judged: replaced
                6: build_meta(ids[6], states.SUCCESS, "kept too"),  # judged: kept
            }
            for index, meta in stored.items():
                raw.set(key(prefix, ids[index]), backend.encode_meta(meta).data)
            judged: list[bytes] = []
            is_success = backend._is_success

            def judging(data: bytes) -> bool:
                judged.append(data)
                return is_success(data)

            monkeypatch.setattr(backend, "_is_success", judging)
            await backend.store_many(
                [
                    build_meta(task_id, states.FAILURE, ValueError(n))
                    for n, task_id in enumerate(ids)
                ]
            )
            assert len(judged) == 4
            results = [await backend.get(task_id) for task_id in ids]
            assert [meta["status"] for meta in results] == [
                states.FAILURE,
                states.FAILURE,
                states.SUCCESS,
                states.FAILURE,
                states.FAILURE,
                states.FAILURE,
                states.SUCCESS,
            ]
            assert (results[2]["result"], results[6]["result"]) == ("kept", "kept too")
            assert results[5]["result"]["exc_message"] == [5]

    asyncio.run(main())


def test_a_key_of_another_type_is_replaced_by_the_result(
    make: Factory, raw: redis_sync.Redis, prefix: str
) -> None:
    """What sits under a result key but is no string (a list, a hash) is no stored result: the
    result replaces it, beside keys holding a result or nothing, in one batch."""
    listed, hashed, empty, done = new_id(), new_id(), new_id(), new_id()
    raw.rpush(key(prefix, listed), "x")
    raw.hset(key(prefix, hashed), "f", "v")

    async def main() -> None:
        async with opened(make()) as backend:
            await backend.store(build_meta(done, states.SUCCESS, "first"))
            await backend.store_many(
                [build_meta(task_id, states.SUCCESS, task_id) for task_id in (listed, hashed)]
                + [
                    build_meta(empty, states.FAILURE, ValueError("no")),
                    build_meta(done, states.FAILURE, ValueError("late")),
                ]
            )
            assert (await backend.get(listed))["result"] == listed
            assert (await backend.get(hashed))["result"] == hashed
            assert (await backend.get(empty))["status"] == states.FAILURE
            assert (await backend.get(done))["result"] == "first"  # a SUCCESS stays

    asyncio.run(main())


def test_script_is_loaded_again_when_redis_forgot_it(make: Factory) -> None:
    async def main() -> None:
        async with opened(make()) as backend:
            real = backend._script_sha
            backend._script_sha = "0" * 40  # as after a restart or SCRIPT FLUSH: NOSCRIPT
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 1))
            assert backend._script_sha == real
            assert (await backend.get(task_id))["result"] == 1

    asyncio.run(main())


def test_oversized_value_is_refused_before_sending(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "MAX_VALUE_SIZE", 1000)

    async def main() -> None:
        async with opened(make()) as backend:
            with pytest.raises(exceptions.EncodeError, match="at most 1000 bytes"):
                await backend.store(build_meta(new_id(), states.SUCCESS, "x" * 2000))

    asyncio.run(main())


# -- waiting ---------------------------------------------------------------------------------------------


def test_many_waiters_share_one_pubsub_connection(
    make: Factory, raw: redis_sync.Redis, name: str
) -> None:
    count = 200

    async def main() -> None:
        async with (
            opened(make()) as backend,
            opened(make(options={"client_name": name + "-w"})) as writer,
        ):
            ids = [new_id() for _ in range(count)]
            same = new_id()  # and 50 more waiters on one task
            waiters = [asyncio.create_task(backend.wait(i, timeout=10)) for i in ids]
            waiters += [asyncio.create_task(backend.wait(same, timeout=10)) for _ in range(50)]
            await until(lambda: all(subscribed(backend, i) for i in [*ids, same]))
            assert len(clients_named(raw, f"{name}:pubsub")) == 1
            assert len(clients_named(raw, name)) <= 2  # the pool for reads
            numsub = dict(raw.pubsub_numsub(backend.key(ids[0]), backend.key(same)))
            assert set(numsub.values()) == {1}  # one subscription per channel, however many wait
            start = time.monotonic()
            await writer.store_many([build_meta(i, states.SUCCESS, i) for i in [*ids, same]])
            metas = await asyncio.gather(*waiters)
            elapsed = time.monotonic() - start
            assert [m["result"] for m in metas] == [*ids, *[same] * 50]
            print(f"\n{count + 50} waiters woken in {elapsed * 1000:.1f} ms")
            listener = backend._listener
            assert listener is not None
            await until(lambda: not listener._channels)  # all unsubscribed again
            assert raw.pubsub_numsub(backend.key(same)) == [(backend.key(same), 0)]

    asyncio.run(main())


def test_cancelled_waiter_unsubscribes(make: Factory, raw: redis_sync.Redis) -> None:
    async def main() -> None:
        async with opened(make()) as backend:
            task_id = new_id()
            waiting = asyncio.create_task(backend.wait(task_id))
            await until(lambda: subscribed(backend, task_id))
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            channel = backend.key(task_id)
            await until(lambda: raw.pubsub_numsub(channel) == [(channel, 0)])

    asyncio.run(main())


def test_write_between_read_and_wait_is_not_missed(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The waiter subscribes before it reads the key: a write landing right after the read is
    # published to it, so it is woken at once rather than at the next periodic read (2 s).
    async def main() -> None:
        async with opened(make()) as backend, opened(make()) as writer:
            task_id = new_id()
            real_get = backend.get

            async def get_then_write(tid: str) -> dict[str, Any]:
                meta = await real_get(tid)
                if meta["status"] == states.PENDING:
                    await writer.store(build_meta(tid, states.SUCCESS, "just after the read"))
                return meta

            monkeypatch.setattr(backend, "get", get_then_write)
            start = time.monotonic()
            meta = await backend.wait(task_id, timeout=5)
            assert meta["result"] == "just after the read"
            assert time.monotonic() - start < 0.5

    asyncio.run(main())


def test_waiter_falls_back_to_reading_the_key(
    make: Factory, raw: redis_sync.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A result set without a PUBLISH (a lost message) is still seen, at the next periodic read.
    monkeypatch.setattr(redis_store, "FALLBACK_POLL_INTERVAL", 0.2)

    async def main() -> None:
        async with opened(make()) as backend:
            task_id = new_id()
            waiting = asyncio.create_task(backend.wait(task_id, timeout=5))
            await until(lambda: subscribed(backend, task_id))
            await asyncio.sleep(0.02)
            raw.set(key(prefix, task_id), json.dumps(build_meta(task_id, states.SUCCESS, 1)))
            start = time.monotonic()
            assert (await waiting)["result"] == 1
            assert time.monotonic() - start < 0.5

    asyncio.run(main())


def test_wait_for_change_is_woken_by_a_write(make: Factory) -> None:
    async def main() -> None:
        async with opened(make()) as backend, opened(make()) as writer:
            task_id = new_id()
            start = time.monotonic()
            await backend._wait_for_change(task_id, 0.1)  # nothing written: times out
            assert 0.09 <= time.monotonic() - start < 0.5
            changed = asyncio.create_task(backend._wait_for_change(task_id, 5))
            await until(lambda: subscribed(backend, task_id))
            await writer.store(build_meta(task_id, states.STARTED))
            await asyncio.wait_for(changed, 1)

    asyncio.run(main())


# -- connection loss -----------------------------------------------------------------------------------


def test_store_works_after_its_connections_are_killed(
    make: Factory, raw: redis_sync.Redis, name: str
) -> None:
    async def main() -> None:
        async with (
            opened(make()) as backend,
            opened(make(options={"client_name": name + "-w"})) as writer,
        ):
            first = new_id()
            await backend.store(build_meta(first, states.SUCCESS, 1))
            waiting = asyncio.create_task(backend.wait(new_id(), timeout=0.3))
            await asyncio.sleep(0.05)
            assert kill_clients(raw, name) >= 1
            assert kill_clients(raw, f"{name}:pubsub") == 1
            with pytest.raises(exceptions.TimeoutError):
                await waiting
            second = new_id()
            await backend.store(build_meta(second, states.SUCCESS, 2))
            assert (await backend.get(first))["result"] == 1
            # waits work again, woken by pub/sub on the new connection
            task_id = new_id()
            waiting = asyncio.create_task(backend.wait(task_id, timeout=5))
            await until(lambda: subscribed(backend, task_id))
            await writer.store(build_meta(task_id, states.SUCCESS, 3))
            assert (await asyncio.wait_for(waiting, 1))["result"] == 3

    asyncio.run(main())


def test_waiter_reads_again_after_the_pubsub_connection_is_lost(
    make: Factory, raw: redis_sync.Redis, prefix: str, name: str
) -> None:
    # A result stored while the pub/sub connection is down was published to nobody; once the
    # listener is back and subscribed again, every waiter reads its key. Here the result is set
    # without any PUBLISH before the kill, so only that re-read (not the 2 s fallback) sees it.
    async def main() -> None:
        async with opened(make()) as backend:
            ids = [new_id() for _ in range(20)]
            waiting = [asyncio.create_task(backend.wait(i, timeout=10)) for i in ids]
            await until(lambda: all(subscribed(backend, i) for i in ids))
            await asyncio.sleep(0.02)
            for task_id in ids:
                raw.set(key(prefix, task_id), json.dumps(build_meta(task_id, states.SUCCESS, 1)))
            start = time.monotonic()
            assert kill_clients(raw, f"{name}:pubsub") == 1
            metas = await asyncio.gather(*waiting)
            assert all(m["status"] == states.SUCCESS for m in metas)
            assert time.monotonic() - start < redis_store.FALLBACK_POLL_INTERVAL / 2
            assert len(clients_named(raw, f"{name}:pubsub")) == 1  # reconnected once

    asyncio.run(main())


class _Proxy:
    """A TCP proxy to Redis that the test can take down and bring back on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        redis_reader, redis_writer = await asyncio.open_connection(
            services.REDIS_HOST, services.REDIS_PORT
        )
        self._writers |= {client_writer, redis_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pipe(client_reader, redis_writer), pipe(redis_reader, client_writer))
        self._writers -= {client_writer, redis_writer}


def test_redis_gone_and_back(make: Factory) -> None:
    async def main() -> None:
        proxy = _Proxy()
        await proxy.start()
        url = f"redis://127.0.0.1:{proxy.port}/{services.REDIS_DB}"
        async with opened(make(url=url)) as backend, opened(make()) as writer:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 1))
            pending = new_id()
            waiting = asyncio.create_task(backend.wait(pending, timeout=30))
            await until(lambda: subscribed(backend, pending))

            await proxy.stop()
            start = time.monotonic()
            with pytest.raises(exceptions.ConnectionError):
                await waiting  # the listener cannot reconnect: the waiter reads, and fails
            for call in (
                backend.get(task_id),
                backend.store(build_meta(new_id(), states.SUCCESS, 2)),
                backend.wait(pending, timeout=5),
            ):
                with pytest.raises(exceptions.ConnectionError, match=str(proxy.port)):
                    await call
            assert time.monotonic() - start < 5

            await proxy.start()  # Redis is back: the same store works again
            assert (await backend.get(task_id))["result"] == 1
            waiting = asyncio.create_task(backend.wait(pending, timeout=5))
            await until(lambda: subscribed(backend, pending))
            await writer.store(build_meta(pending, states.SUCCESS, "back"))
            assert (await asyncio.wait_for(waiting, 1))["result"] == "back"
        await proxy.stop()

    asyncio.run(main())


# -- figures ---------------------------------------------------------------------------------------------


def test_speed(make: Factory, name: str) -> None:
    """store_many throughput and wake latency; printed with -s, loosely asserted."""

    async def main() -> tuple[float, list[float]]:
        async with (
            opened(make()) as backend,
            opened(make(options={"client_name": name + "-w"})) as writer,
        ):
            metas = [build_meta(new_id(), states.SUCCESS, n) for n in range(10_000)]
            start = time.perf_counter()
            for at in range(0, len(metas), 100):
                await writer.store_many(metas[at : at + 100])
            rate = len(metas) / (time.perf_counter() - start)

            latencies: list[float] = []
            for _ in range(500):
                task_id = new_id()
                waiting = asyncio.create_task(backend.wait(task_id, timeout=5))
                await until(lambda: subscribed(backend, task_id))  # noqa: B023 - awaited here
                await asyncio.sleep(0)  # the waiter has read the key and sleeps
                start = time.perf_counter()
                await writer.store(build_meta(task_id, states.SUCCESS, 1))
                await waiting
                latencies.append(time.perf_counter() - start)
            return rate, latencies

    rate, latencies = asyncio.run(main())
    latencies.sort()
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"\nstore_many: {rate:,.0f} docs/s (10,000 in batches of 100)")
    print(f"wait() woken after store(): p50 {p50:.2f} ms, p99 {p99:.2f} ms (500 waits)")
    assert rate > 5_000
    assert p50 < 10
