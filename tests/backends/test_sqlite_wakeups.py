"""Cross-process wake-ups of the SQLite result store (celeriac.utils.file_wakeups).

Waits here poll every 5 s at most (``interval``) and have waited long enough for their pause to be
half a second or more, so only a wake-up explains a result seen within 0.1 s.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from celeriac import exceptions, states
from celeriac.backends.base import BackendOptions
from celeriac.backends.sqlite import SQLiteBackend
from celeriac.utils import file_wakeups
from celeriac.utils.file_wakeups import wake_directory
from tests.brokers.test_sqlite_wakeups import (
    IDLE,
    SLOW_POLL,
    WOKEN_WITHIN,
    read_only_directory,
    sockets_in,
    url_of,
)
from tests.forking import spawned_with_pipe

spawn = multiprocessing.get_context("spawn")


def document(task_id: str, status: str = states.SUCCESS, result: Any = 3) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "status": status,
        "result": result,
        "traceback": None,
        "children": [],
        "date_done": None,
    }


async def connected(path: Path) -> SQLiteBackend:
    backend = SQLiteBackend(url_of(path), BackendOptions())
    await backend.connect()
    return backend


def wait_in_child(url: str, task_ids: list[str], pipe: Connection) -> None:
    """In a spawned process: wait for each task (one ``wait``, or ``wait_many`` for several)."""

    async def main() -> None:
        backend = SQLiteBackend(url, BackendOptions())
        await backend.connect()
        try:
            pipe.send("waiting")
            if len(task_ids) == 1:
                meta = await backend.wait(task_ids[0], timeout=30, interval=SLOW_POLL)
                pipe.send((task_ids[0], meta["result"], time.time()))
            else:
                finished = backend.wait_many(task_ids, timeout=30, interval=SLOW_POLL)
                async for task_id, meta in finished:
                    pipe.send((task_id, meta["result"], time.time()))
        finally:
            await backend.close()

    asyncio.run(main())


def store_and_time(db: Path, task_ids: list[str]) -> list[float]:
    """Store each task's result here while a child process waits; seconds until it saw each."""
    latencies = []

    async def store(ours: Connection) -> None:
        backend = await connected(db)
        try:
            assert ours.poll(30), "the waiting process did not start"
            assert ours.recv() == "waiting"
            for number, task_id in enumerate(task_ids):
                await asyncio.sleep(IDLE)
                sent = time.time()
                await backend.store(document(task_id, result=number))
                assert ours.poll(30), "the waiting process never saw the result"
                seen_id, value, seen_at = ours.recv()
                assert (seen_id, value) == (task_id, number)
                latencies.append(seen_at - sent)
        finally:
            await backend.close()

    with spawned_with_pipe(wait_in_child, url_of(db), task_ids) as ours:
        asyncio.run(store(ours))
    return latencies


def test_a_stored_result_wakes_a_wait_in_another_process(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite3"
    latencies = store_and_time(db, ["t-1"])
    assert max(latencies) < WOKEN_WITHIN, latencies
    assert sockets_in(f"{db}.wake") == []


def test_stored_results_wake_wait_many_in_another_process(tmp_path: Path) -> None:
    latencies = store_and_time(tmp_path / "results.sqlite3", ["a", "b", "c"])
    assert max(latencies) < WOKEN_WITHIN, latencies


def test_a_write_from_another_thread_wakes_a_wait_at_once(tmp_path: Path) -> None:
    db = tmp_path / "results.sqlite3"

    def write_later() -> None:
        async def main() -> None:
            await asyncio.sleep(IDLE)
            backend = await connected(db)
            try:
                await backend.store(document("t", result=time.monotonic()))
            finally:
                await backend.close()

        asyncio.run(main())

    async def scenario() -> None:
        backend = await connected(db)
        writer = threading.Thread(target=write_later)
        writer.start()
        try:
            meta = await backend.wait("t", timeout=10, interval=SLOW_POLL)
            assert time.monotonic() - meta["result"] < WOKEN_WITHIN
        finally:
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
            await backend.close()

    asyncio.run(scenario())


def store_once(url: str, task_id: str) -> None:
    async def main() -> None:
        backend = SQLiteBackend(url, BackendOptions())
        await backend.connect()
        try:
            await backend.store(document(task_id))
        finally:
            await backend.close()

    asyncio.run(main())


def test_waits_poll_when_the_directory_is_read_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "results.sqlite3"
    directory, _ = wake_directory(str(db))
    caplog.set_level(logging.INFO, logger=file_wakeups.__name__)
    with read_only_directory(Path(directory)):

        async def scenario() -> None:
            backend = await connected(db)
            try:
                with pytest.raises(exceptions.TimeoutError):
                    await backend.wait("t", timeout=0.05, interval=0.01)
                writer = spawn.Process(target=store_once, args=(url_of(db), "t"))
                writer.start()
                meta = await backend.wait("t", timeout=30, interval=0.05)
                assert meta["status"] == states.SUCCESS
                finished = [task_id async for task_id, _ in backend.wait_many(["t"], timeout=1)]
                assert finished == ["t"]
                await asyncio.get_running_loop().run_in_executor(None, writer.join, 30)
            finally:
                await backend.close()

        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == file_wakeups.__name__]
    assert len(lines) == 1, lines
    assert "SQLite result store" in lines[0] and "found by polling only" in lines[0]
    assert not os.listdir(tmp_path / "results.sqlite3.wake")
