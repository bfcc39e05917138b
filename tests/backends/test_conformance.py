"""One suite of behaviour every result store must have, run on each store of ``conftest.STORES``.

Store-specific checks (URLs, options, several processes on one SQLite file) follow at the end.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from celeriac import exceptions, states
from celeriac.backends.base import BackendOptions
from celeriac.backends.memory import MemoryBackend
from celeriac.backends.meta import build_meta, exception_from_meta
from celeriac.backends.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLiteBackend
from tests.forking import run_in_fork_child

JSON = "application/json"
PICKLE = "application/x-python-serialize"
MSGPACK = "application/x-msgpack"
YAML = "application/x-yaml"


def new_id() -> str:
    return str(uuid.uuid4())


# -- basics ------------------------------------------------------------------------------------


def test_unknown_id_is_pending(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            meta = await backend.get(task_id)
            assert meta["status"] == states.PENDING
            assert meta["result"] is None
            assert meta["task_id"] == task_id

    asyncio.run(main())


@pytest.mark.parametrize("value", [42, "text", [1, "two", None], {"a": {"b": [1.5]}}, None])
def test_success_round_trip(store_url: str, open_store: Any, value: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            written = build_meta(task_id, states.SUCCESS, value, extended={"name": "t.add"})
            await backend.store(written)
            read = await backend.get(task_id)
            assert read == written
            assert list(read) == list(written)

    asyncio.run(main())


def test_instances_share_the_store(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as writer, open_store(store_url) as reader:
            task_id = new_id()
            await writer.store(build_meta(task_id, states.SUCCESS, 1))
            assert (await reader.get(task_id))["result"] == 1

    asyncio.run(main())


def test_success_is_final(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, "first"))
            await backend.store(build_meta(task_id, states.FAILURE, ValueError("dup")))
            await backend.store(build_meta(task_id, states.STARTED, {"pid": 1}))
            meta = await backend.get(task_id)
            assert meta["status"] == states.SUCCESS
            assert meta["result"] == "first"

    asyncio.run(main())


def test_states_move_forward_until_success(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.STARTED, {"pid": 7, "hostname": "w"}))
            assert (await backend.get(task_id))["status"] == states.STARTED
            await backend.store(build_meta(task_id, states.RETRY, KeyError("again")))
            assert (await backend.get(task_id))["status"] == states.RETRY
            await backend.store(build_meta(task_id, states.SUCCESS, 5))
            meta = await backend.get(task_id)
            assert (meta["status"], meta["result"]) == (states.SUCCESS, 5)

    asyncio.run(main())


def test_failure_document_round_trip(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            await backend.store(
                build_meta(task_id, states.FAILURE, ValueError("bad thing"), traceback="tb")
            )
            meta = await backend.get(task_id)
            assert meta["status"] == states.FAILURE
            assert meta["traceback"] == "tb"
            exc = exception_from_meta(meta["result"])
            assert type(exc) is ValueError
            assert exc.args == ("bad thing",)

    asyncio.run(main())


def test_forget(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 1))
            await backend.forget(task_id)
            assert (await backend.get(task_id))["status"] == states.PENDING
            await backend.forget(task_id)  # forgetting twice is fine
            # A forgotten success no longer blocks a new document for the id.
            await backend.store(build_meta(task_id, states.STARTED))
            assert (await backend.get(task_id))["status"] == states.STARTED

    asyncio.run(main())


def test_store_many(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            done = new_id()
            await backend.store(build_meta(done, states.SUCCESS, "kept"))
            ids = [new_id() for _ in range(50)]
            batch = [build_meta(i, states.SUCCESS, n) for n, i in enumerate(ids)]
            batch.append(build_meta(done, states.FAILURE, ValueError("late duplicate")))
            await backend.store_many(batch)
            for n, task_id in enumerate(ids):
                assert (await backend.get(task_id))["result"] == n
            assert (await backend.get(done))["result"] == "kept"
            await backend.store_many([])

    asyncio.run(main())


# -- expiry ------------------------------------------------------------------------------------


def test_expiry(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url, expires=0.2) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 1))
            assert (await backend.get(task_id))["status"] == states.SUCCESS
            await asyncio.sleep(0.3)
            assert (await backend.get(task_id))["status"] == states.PENDING
            # An expired success counts as absent: a new document may take its place.
            await backend.store(build_meta(task_id, states.FAILURE, ValueError("x")))
            assert (await backend.get(task_id))["status"] == states.FAILURE

    asyncio.run(main())


def test_no_expiry(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url, expires=None) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 1))
            await asyncio.sleep(0.05)
            assert (await backend.get(task_id))["status"] == states.SUCCESS

    asyncio.run(main())


# -- wait --------------------------------------------------------------------------------------


def test_wait_returns_ready_document(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.SUCCESS, 3))
            meta = await backend.wait(task_id, timeout=1)
            assert (meta["status"], meta["result"]) == (states.SUCCESS, 3)
            started = new_id()
            await backend.store(build_meta(started, states.STARTED))
            meta = await backend.wait(started, timeout=1, states_wanted={states.STARTED})
            assert meta["status"] == states.STARTED

    asyncio.run(main())


def test_wait_times_out(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            task_id = new_id()
            await backend.store(build_meta(task_id, states.STARTED))
            start = time.monotonic()
            with pytest.raises(exceptions.TimeoutError, match=task_id):
                await backend.wait(task_id, timeout=0.2)
            assert 0.19 <= time.monotonic() - start < 0.5

    asyncio.run(main())


def test_wait_sees_write_from_another_thread_quickly(store_url: str, open_store: Any) -> None:
    interval = 0.05
    # A store that pushes must wake the waiter at once; a polling one within its interval.
    written_at: list[float] = []

    def writer(task_id: str) -> None:
        async def write() -> None:
            async with open_store(store_url) as backend:
                await asyncio.sleep(0.15)
                await backend.store(build_meta(task_id, states.SUCCESS, "done"))
                written_at.append(time.monotonic())

        asyncio.run(write())

    async def main() -> None:
        async with open_store(store_url) as backend:
            limit = 0.05 if backend.pushes else interval + 0.05
            task_id = new_id()
            thread = threading.Thread(target=writer, args=(task_id,))
            thread.start()
            try:
                meta = await backend.wait(task_id, timeout=5, interval=interval)
                seen_at = time.monotonic()
            finally:
                await asyncio.to_thread(thread.join)
            assert meta["result"] == "done"
            assert seen_at - written_at[0] < limit

    asyncio.run(main())


def test_memory_wait_without_timeout_is_woken_within_50ms() -> None:
    # With no timeout and a long interval, only the push can make the waiter see the write soon.
    url = f"memory://test-{uuid.uuid4().hex}"
    task_id = new_id()
    written_at: list[float] = []

    def write_later() -> None:
        async def write() -> None:
            writer = MemoryBackend(url, BackendOptions())
            await writer.connect()
            await asyncio.sleep(0.1)
            await writer.store(build_meta(task_id, states.SUCCESS, 1))
            written_at.append(time.monotonic())

        asyncio.run(write())

    async def main() -> None:
        reader = MemoryBackend(url, BackendOptions())
        await reader.connect()
        thread = threading.Thread(target=write_later)
        thread.start()
        try:
            meta = await reader.wait(task_id, interval=10)
            seen_at = time.monotonic()
        finally:
            await asyncio.to_thread(thread.join)
        assert meta["status"] == states.SUCCESS
        assert seen_at - written_at[0] < 0.05

    asyncio.run(main())


# -- serializers and accept --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("serializer", "content_type"),
    [("json", JSON), ("msgpack", MSGPACK), ("pickle", PICKLE), ("yaml", YAML)],
)
def test_serializers_round_trip(
    store_url: str, open_store: Any, serializer: str, content_type: str
) -> None:
    async def main() -> None:
        options = {"serializer": serializer, "accept": frozenset({content_type})}
        async with open_store(store_url, **options) as backend:
            for value in (7, "s", [1, [2]], {"k": None}, None):
                task_id = new_id()
                written = build_meta(task_id, states.SUCCESS, value)
                await backend.store(written)
                assert await backend.get(task_id) == written
            failed = new_id()
            await backend.store(build_meta(failed, states.FAILURE, KeyError("k")))
            exc = exception_from_meta((await backend.get(failed))["result"])
            assert type(exc) is KeyError
            assert exc.args == ("k",)

    asyncio.run(main())


def test_result_accept_content_refuses_other_types(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        pickled = {"serializer": "pickle", "accept": frozenset({PICKLE, JSON})}
        async with (
            open_store(store_url, **pickled) as writer,
            open_store(store_url, accept=frozenset({JSON})) as reader,
        ):
            task_id = new_id()
            await writer.store(build_meta(task_id, states.SUCCESS, 1))
            assert (await writer.get(task_id))["result"] == 1
            with pytest.raises(exceptions.ContentDisallowed):
                await reader.get(task_id)
            with pytest.raises(exceptions.ContentDisallowed):
                await reader.wait(task_id, timeout=1)

    asyncio.run(main())


def test_not_connected(store_url: str, open_store: Any) -> None:
    async def main() -> None:
        async with open_store(store_url) as backend:
            pass
        with pytest.raises(exceptions.ConnectionError, match="not connected"):
            await backend.get(new_id())

    asyncio.run(main())


# -- memory store --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["memory:/x", "redis://x", "memory://a/b", "memory://a?x=1"])
def test_memory_bad_urls(url: str) -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match="memory"):
        MemoryBackend(url, BackendOptions())


def test_memory_names_are_separate_and_default_name_works() -> None:
    async def main() -> None:
        a = MemoryBackend(f"memory://a-{uuid.uuid4().hex}", BackendOptions())
        b = MemoryBackend(f"memory://b-{uuid.uuid4().hex}", BackendOptions())
        default = MemoryBackend("memory://", BackendOptions())
        for backend in (a, b, default):
            await backend.connect()
        task_id = new_id()
        await a.store(build_meta(task_id, states.SUCCESS, 1))
        assert (await b.get(task_id))["status"] == states.PENDING
        await default.store(build_meta(task_id, states.SUCCESS, 2))
        assert (await default.get(task_id))["result"] == 2
        await default.forget(task_id)

    asyncio.run(main())


def test_memory_refuses_transport_options() -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match="no transport options"):
        MemoryBackend("memory://", BackendOptions(transport_options=(("x", 1),)))


def test_memory_write_survives_a_waiter_whose_loop_is_gone() -> None:
    url = f"memory://test-{uuid.uuid4().hex}"
    task_id = new_id()

    async def abandoned_wait() -> None:
        backend = MemoryBackend(url, BackendOptions())
        await backend.connect()
        with pytest.raises(exceptions.TimeoutError):
            await backend.wait(task_id, timeout=0.01)

    asyncio.run(abandoned_wait())

    async def write() -> None:
        backend = MemoryBackend(url, BackendOptions())
        await backend.connect()
        await backend.store(build_meta(task_id, states.SUCCESS, 1))
        assert (await backend.get(task_id))["result"] == 1

    asyncio.run(write())


def test_memory_really_serializes() -> None:
    async def main() -> None:
        backend = MemoryBackend(f"memory://test-{uuid.uuid4().hex}", BackendOptions())
        await backend.connect()
        with pytest.raises(exceptions.EncodeError):
            await backend.store(build_meta(new_id(), states.SUCCESS, object()))
        task_id = new_id()
        value = {"list": [1]}
        await backend.store(build_meta(task_id, states.SUCCESS, value))
        value["list"].append(2)  # the stored copy is bytes, not this dict
        assert (await backend.get(task_id))["result"] == {"list": [1]}

    asyncio.run(main())


# -- SQLite store --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("sqlite://", "expected"),
        ("sqlite:///", "names no file"),
        ("sqlite://host/file.db", "expected"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///x.db?mode=ro", "query"),
        ("sqlite:///dir/", "names no file"),
        ("postgres:///x", "expected"),
    ],
)
def test_sqlite_bad_urls(url: str, match: str) -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match=match):
        SQLiteBackend(url, BackendOptions())


def test_sqlite_url_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = SQLiteBackend("sqlite:///sub/results.sqlite3", BackendOptions())
    assert relative.path == str(tmp_path / "sub" / "results.sqlite3")
    absolute = SQLiteBackend("sqlite:////var/tmp/r.sqlite3", BackendOptions())
    assert absolute.path == "/var/tmp/r.sqlite3"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ((("busy_timeout", -1),), "busy_timeout"),
        ((("busy_timeout", "5"),), "busy_timeout"),
        ((("synchronous", "OFF"),), "synchronous"),
        ((("global_keyprefix", "x"),), "Known options: busy_timeout"),
    ],
)
def test_sqlite_bad_options(tmp_path: Path, options: Any, match: str) -> None:
    with pytest.raises(exceptions.ImproperlyConfigured, match=match):
        SQLiteBackend(f"sqlite:///{tmp_path}/r.sqlite3", BackendOptions(transport_options=options))


def test_sqlite_options_are_applied(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"

    async def main() -> None:
        options = BackendOptions(transport_options=(("synchronous", "full"), ("busy_timeout", 1)))
        backend = SQLiteBackend(f"sqlite:///{path}", options)
        await backend.connect()
        conn = backend._conn
        assert conn is not None

        def pragmas() -> tuple[Any, ...]:
            return (
                conn.execute("PRAGMA synchronous").fetchone()[0],
                conn.execute("PRAGMA busy_timeout").fetchone()[0],
                conn.execute("PRAGMA journal_mode").fetchone()[0],
            )

        assert backend._executor is not None
        values = await asyncio.get_running_loop().run_in_executor(backend._executor, pragmas)
        assert values == (2, 1000, "wal")  # 2 = FULL
        await backend.close()

    asyncio.run(main())


def test_sqlite_missing_directory(tmp_path: Path) -> None:
    backend = SQLiteBackend(f"sqlite:///{tmp_path}/nope/r.sqlite3", BackendOptions())
    with pytest.raises(exceptions.ImproperlyConfigured, match="does not exist"):
        asyncio.run(backend.connect())


def test_sqlite_driver_errors_become_connection_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    backend = SQLiteBackend(f"sqlite:///{path}", BackendOptions())
    with pytest.raises(exceptions.ConnectionError, match=str(path)) as info:
        asyncio.run(backend.connect())
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert backend._executor is None  # nothing left running


def _prepare_file(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


def test_sqlite_marks_its_file(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    asyncio.run(SQLiteBackend(f"sqlite:///{path}", BackendOptions()).connect())
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("statements", "match"),
    [
        (
            [
                f"PRAGMA application_id = {APPLICATION_ID}",
                f"PRAGMA user_version = {SCHEMA_VERSION + 1}",
            ],
            "newer celeriac",
        ),
        ([f"PRAGMA application_id = {APPLICATION_ID}", "PRAGMA user_version = 0"], "unknown"),
        # the SQLite broker's mark ("celb")
        (["PRAGMA application_id = 1667591266", "PRAGMA user_version = 1"], "file of its own"),
        (["CREATE TABLE notes (x)"], "holds tables"),
    ],
)
def test_sqlite_refuses_files_it_does_not_own(
    tmp_path: Path, statements: list[str], match: str
) -> None:
    path = tmp_path / "r.sqlite3"
    _prepare_file(path, *statements)
    backend = SQLiteBackend(f"sqlite:///{path}", BackendOptions())
    with pytest.raises(exceptions.ImproperlyConfigured, match=match):
        asyncio.run(backend.connect())
    assert backend._executor is None
    conn = sqlite3.connect(path)
    try:  # left as it was: no table added, journal mode untouched
        names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        assert "results" not in names
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        conn.close()


def test_sqlite_deletes_expired_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    url = f"sqlite:///{path}"

    async def main() -> None:
        short = SQLiteBackend(url, BackendOptions(expires=0.05))
        await short.connect()
        await short.store_many([build_meta(new_id(), states.SUCCESS, n) for n in range(20)])
        await short.store(build_meta(new_id(), states.SUCCESS, "x"))
        await short.close()
        await asyncio.sleep(0.1)
        kept = SQLiteBackend(url, BackendOptions(expires=None))
        await kept.connect()  # sweeps on connect
        await kept.store(build_meta(new_id(), states.SUCCESS, "forever"))
        await kept.close()

    asyncio.run(main())
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT status, expires_at FROM results").fetchall()
    conn.close()
    assert rows == [(states.SUCCESS, None)]


def test_sqlite_sweeps_every_n_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from celeriac.backends import sqlite as sqlite_module

    monkeypatch.setattr(sqlite_module, "SWEEP_EVERY", 10)
    path = tmp_path / "r.sqlite3"

    async def main() -> None:
        backend = SQLiteBackend(f"sqlite:///{path}", BackendOptions(expires=0.05))
        await backend.connect()
        for n in range(5):
            await backend.store(build_meta(new_id(), states.SUCCESS, n))
        await asyncio.sleep(0.1)
        for n in range(5):  # the 10th write sweeps the five expired ones
            await backend.store(build_meta(new_id(), states.SUCCESS, n))
        await backend.close()

    asyncio.run(main())
    with sqlite3.connect(path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM results").fetchone()
    conn.close()
    assert count == 5


_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from celeriac import states
    from celeriac.backends.base import BackendOptions
    from celeriac.backends.meta import build_meta
    from celeriac.backends.sqlite import SQLiteBackend

    url, prefix, count, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    async def main():
        backend = SQLiteBackend(url, BackendOptions())
        await backend.connect()
        time.sleep(max(0.0, start_at - time.time()))  # start together with the other writer
        for n in range(count):
            task_id = f"{prefix}-{n}"
            await backend.store(build_meta(task_id, states.STARTED, {"pid": n}))
            await backend.store(build_meta(task_id, states.SUCCESS, n))
            assert (await backend.get(task_id))["result"] == n
        await backend.close()

    asyncio.run(main())
    """
)


def test_sqlite_two_processes_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    url = f"sqlite:///{path}"
    count = 500
    start_at = time.time() + 1.0
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, prefix, str(count), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in ("a", "b")
    ]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err

    async def main() -> None:
        backend = SQLiteBackend(url, BackendOptions())
        await backend.connect()
        for prefix in ("a", "b"):
            for n in range(count):
                meta = await backend.get(f"{prefix}-{n}")
                assert (meta["status"], meta["result"]) == (states.SUCCESS, n)
        await backend.close()

    asyncio.run(main())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM results").fetchone() == (2 * count,)
    conn.close()


def test_memory_write_between_read_and_wait_is_not_missed() -> None:
    # ``wait`` reads, then waits for a change; a write landing in between must end the wait at once
    # instead of after the timeout.
    url = f"memory://test-{uuid.uuid4().hex}"

    async def main() -> None:
        reader = MemoryBackend(url, BackendOptions())
        writer = MemoryBackend(url, BackendOptions())
        await reader.connect()
        await writer.connect()
        task_id = new_id()
        assert (await reader.get(task_id))["status"] == states.PENDING
        await writer.store(build_meta(task_id, states.SUCCESS, 1))
        start = time.monotonic()
        await reader._wait_for_change(task_id, 5)
        assert time.monotonic() - start < 0.05

    asyncio.run(main())


def test_sqlite_store_connected_before_fork_works_in_the_child(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.sqlite3'}"

    async def connect() -> SQLiteBackend:
        backend = SQLiteBackend(url, BackendOptions())
        await backend.connect()
        return backend

    backend = asyncio.run(connect())
    task_id = new_id()

    async def use_in_child() -> None:
        await backend.store(build_meta(task_id, states.SUCCESS, "from child"))
        await backend.close()

    assert run_in_fork_child(use_in_child) == 0

    async def check() -> None:
        meta = await backend.get(task_id)
        assert meta["result"] == "from child"
        await backend.close()

    asyncio.run(check())


def test_memory_sweeps_expired_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    from celeriac.backends import memory as memory_module

    monkeypatch.setattr(memory_module, "_SWEEP_EVERY", 10)
    name = f"test-{uuid.uuid4().hex}"

    async def main() -> None:
        backend = MemoryBackend(f"memory://{name}", BackendOptions(expires=0.05))
        await backend.connect()
        await backend.store_many([build_meta(new_id(), states.SUCCESS, n) for n in range(5)])
        await asyncio.sleep(0.1)
        await backend.store_many([build_meta(new_id(), states.SUCCESS, n) for n in range(5)])

    asyncio.run(main())
    assert len(memory_module._namespaces[name].documents) == 5
