"""Cross-process wake-ups of the SQLite broker (celeriac.utils.file_wakeups) with real processes.

Every consumer here polls every 5 s at most (``polling_interval``) and has been waiting long enough
for its pause to have grown past half a second, so only a wake-up explains a fetch within 0.1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from celeriac.brokers.base import BrokerOptions, PublishRequest
from celeriac.brokers.sqlite import SQLiteBroker
from celeriac.utils import file_wakeups
from celeriac.utils.file_wakeups import encode, wake_directory
from tests.brokers.conftest import message
from tests.forking import run_in_fork_child, spawned_with_pipe
from tests.services import wait_until

spawn = multiprocessing.get_context("spawn")

#: Polling this slow cannot explain a fetch within :data:`WOKEN_WITHIN`.
SLOW_POLL = 5.0
#: How long the consumer waits before each publish: its poll pause is 0.5 s or more by then.
IDLE = 0.6
#: A fetch this soon after the publish was woken (typically 1-3 ms; slack for a busy machine).
WOKEN_WITHIN = 0.1


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def sockets_in(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []


async def connected(path: Path, **options: float) -> SQLiteBroker:
    broker = SQLiteBroker(url_of(path), BrokerOptions(**options))
    await broker.connect()
    return broker


async def publish(broker: SQLiteBroker, body: str, queue: str = "q") -> None:
    await broker.publish_many([PublishRequest(message(body), "", queue)])


def consume(url: str, rounds: int, pipe: Connection) -> None:
    """In a spawned process: fetch ``rounds`` messages with slow polling; send when each came."""

    async def main() -> None:
        broker = SQLiteBroker(url, BrokerOptions(polling_interval=SLOW_POLL))
        await broker.connect()
        try:
            for _ in range(rounds):
                pipe.send("waiting")
                deliveries = await broker.fetch(["q"], 1, 30)
                pipe.send(time.time())
                await broker.ack(deliveries)
        finally:
            await broker.close()

    asyncio.run(main())


def wake_latencies(db: Path, rounds: int = 3) -> list[float]:
    """Seconds from each publish here to the fetch in a consumer process."""
    latencies = []

    async def produce(ours: Connection) -> None:
        broker = await connected(db)
        try:
            for number in range(rounds):
                assert ours.poll(30), "the consumer did not start"
                assert ours.recv() == "waiting"
                await asyncio.sleep(IDLE)
                sent = time.time()
                await publish(broker, str(number))
                assert ours.poll(30), "the consumer never got the message"
                latencies.append(ours.recv() - sent)
        finally:
            await broker.close()

    with spawned_with_pipe(consume, url_of(db), rounds) as ours:
        asyncio.run(produce(ours))
    return latencies


def test_a_publish_wakes_an_idle_fetch_in_another_process(tmp_path: Path) -> None:
    db = tmp_path / "broker.sqlite3"
    latencies = wake_latencies(db)
    assert max(latencies) < WOKEN_WITHIN, latencies
    assert statistics.median(latencies) < 0.02, latencies
    # Both processes closed their brokers: no socket is left behind.
    assert sockets_in(f"{db}.wake") == []


def test_a_long_path_listens_in_the_temp_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    db = deep / "broker.sqlite3"
    directory, private = wake_directory(str(db))
    assert private
    assert os.path.dirname(directory) == tempfile.gettempdir()
    latencies = wake_latencies(db, rounds=1)
    assert max(latencies) < WOKEN_WITHIN, latencies
    assert not os.path.exists(f"{db}.wake")
    assert not os.path.exists(directory)  # removed by the last process to leave


def listen_forever(url: str, pipe: Connection) -> None:
    """In a spawned process: wait on the broker until killed."""

    async def main() -> None:
        broker = SQLiteBroker(url, BrokerOptions(polling_interval=SLOW_POLL))
        await broker.connect()
        pipe.send("waiting")
        await broker.fetch(["q"], 1, 60)

    asyncio.run(main())


def test_the_socket_of_a_killed_process_is_removed_by_the_next_publish(tmp_path: Path) -> None:
    db = tmp_path / "broker.sqlite3"
    directory, _ = wake_directory(str(db))
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=listen_forever, args=(url_of(db), theirs))
    child.start()
    try:
        assert ours.poll(30)
        wait_until(lambda: sockets_in(directory), what="the listener's socket")
        [name] = sockets_in(directory)
        assert name.startswith(f"{child.pid}-")
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert sockets_in(directory) == [name]  # SIGKILL leaves it behind

    async def scenario() -> None:
        broker = await connected(db)
        try:
            await publish(broker, "after the kill")
            assert sockets_in(directory) == []
            [delivery] = await broker.fetch(["q"], 1, 1)
            assert delivery.message.body == b"after the kill"
        finally:
            await broker.close()

    asyncio.run(scenario())


def test_a_forked_child_binds_a_socket_of_its_own(tmp_path: Path) -> None:
    db = tmp_path / "broker.sqlite3"
    directory, _ = wake_directory(str(db))
    broker = SQLiteBroker(url_of(db), BrokerOptions(polling_interval=SLOW_POLL))

    async def listen() -> None:
        await broker.connect()
        assert await broker.fetch(["q"], 1, 0.01) == []

    asyncio.run(listen())
    [parents] = sockets_in(directory)
    assert parents.startswith(f"{os.getpid()}-")

    async def in_child() -> None:
        # The inherited broker: its fetch binds a socket of the child, not the parent's.
        await broker.connect()
        assert await broker.fetch(["q"], 1, 0.01) == []
        names = sockets_in(directory)
        assert parents in names
        assert any(name.startswith(f"{os.getpid()}-") for name in names), names
        await broker.close()
        assert sockets_in(directory) == [parents]

    assert run_in_fork_child(in_child) == 0
    assert sockets_in(directory) == [parents]
    # Still bound in this process: a datagram is taken, not refused.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        probe.sendto(encode(["nothing"])[0], os.path.join(directory, parents))

    async def close() -> None:
        await broker.close()

    asyncio.run(close())
    assert sockets_in(directory) == []


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[None]:
    """``path`` as a directory nobody can create anything in (a read-only mount for root)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root without the right to mount a read-only file system")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_directory_falls_back_to_polling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "broker.sqlite3"
    caplog.set_level(logging.INFO, logger=file_wakeups.__name__)
    with read_only_directory(tmp_path / "broker.sqlite3.wake"):

        async def scenario() -> None:
            first = await connected(db, polling_interval=0.01)
            second = await connected(db, polling_interval=0.01)
            try:
                for broker in (first, second, first):
                    assert await broker.fetch(["q"], 1, 0.02) == []
                # Everything still works, and another process's publish is found by polling.
                await publish(first, "local")
                [local] = await second.fetch(["q"], 1, 1)
                await second.ack([local])
                waiting = asyncio.ensure_future(first.fetch(["q"], 1, 5))
                await asyncio.sleep(0.05)
                publisher = spawn.Process(target=publish_once, args=(url_of(db), "remote"))
                publisher.start()
                [remote] = await waiting
                assert remote.message.body == b"remote"
                await first.ack([remote])
                await asyncio.get_running_loop().run_in_executor(None, publisher.join, 30)
            finally:
                await first.close()
                await second.close()

        asyncio.run(scenario())
    lines = [r for r in caplog.records if r.name == file_wakeups.__name__]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.INFO
    assert "found by polling only" in lines[0].getMessage()
    assert str(db) in lines[0].getMessage()


def publish_once(url: str, body: str) -> None:
    async def main() -> None:
        broker = SQLiteBroker(url, BrokerOptions())
        await broker.connect()
        try:
            await publish(broker, body)
        finally:
            await broker.close()

    asyncio.run(main())
