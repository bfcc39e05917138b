"""celeriac.utils.file_wakeups inside one process: datagrams, the directory listing, the listener.

Datagrams are sent here from a plain socket, as another process would send them (a process never
sends to its own socket: its waiters are woken directly).
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from celeriac.utils import file_wakeups
from celeriac.utils.file_wakeups import MAX_DATAGRAM, FileWakeups, decode, encode
from celeriac.utils.wakeup import WakeupRegistry


class CountingRegistry(WakeupRegistry):
    """A registry that also counts the notifies it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.notifies = 0

    def notify(self, key: str, channels: Iterable[str]) -> None:
        self.notifies += 1
        super().notify(key, channels)

    def notify_all(self, key: str) -> None:
        self.notifies += 1
        super().notify_all(key)


def test_datagrams_carry_many_names_in_pieces() -> None:
    names = [f"task-{number:06d}-{'é' * 10}" for number in range(2000)]
    datagrams = encode(names)
    assert len(datagrams) > 1
    assert all(len(datagram) <= MAX_DATAGRAM for datagram in datagrams)
    assert [name for datagram in datagrams for name in decode(datagram)] == names
    assert decode(b"\x02future format") == []
    assert decode(b"") == []


def test_the_directory_listing_is_read_again_when_a_socket_is_bound(tmp_path: Path) -> None:
    directory = tmp_path / "x.wake"
    directory.mkdir()
    peers = file_wakeups._Peers(str(directory), private=False)
    long_ago = time.time_ns() - 60 * 10**9
    os.utime(directory, ns=(long_ago, long_ago))
    assert peers.current() == ()
    assert peers.current() is peers.current()  # trusted: the directory is old and unchanged
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        path = str(directory / "1-0123abcd")
        listener.bind(path)
        assert peers.current() == (path,)
        # Names that are not sockets of this layout are left alone.
        (directory / "notes.txt").write_text("x")
        assert peers.current() == (path,)


def own_socket(directory: str) -> str:
    [name] = [n for n in os.listdir(directory) if n.startswith(f"{os.getpid()}-")]
    return os.path.join(directory, name)


def test_a_stream_of_changes_wakes_the_process_less_often_than_it_changes(tmp_path: Path) -> None:
    registry = CountingRegistry()
    wake = FileWakeups(str(tmp_path / "x.sqlite3"), registry, "k", "test store")

    async def scenario() -> None:
        assert wake.listen()
        path = own_socket(wake.directory)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            # One change after a quiet spell is handed on at once.
            with registry.waiting("k", ["q"]) as waiter:
                sender.sendto(encode(["q"])[0], path)
                assert await waiter.wait(1)
            assert registry.notifies == 1

            # 400 changes in bursts of 4 from another thread: fewer notifies, and the last change
            # is not lost.
            def stream() -> None:
                for number in range(400):
                    sender.sendto(encode([f"q{number}"])[0], path)
                    if number % 4 == 3:  # bursts, so that even a slowed thread makes a stream
                        time.sleep(0.001)
                sender.sendto(encode(["last"])[0], path)

            with registry.waiting("k", ["last"]) as waiter:
                await asyncio.get_running_loop().run_in_executor(None, stream)
                assert await waiter.wait(1)
            # Typically 40 to 100 (one per gap, or two per burst when the bursts come slower
            # than the gap); one per change without the gap.
            assert registry.notifies < 200, registry.notifies
            # After a quiet spell the listener hands news on at once again.
            await asyncio.sleep(0.1)
            before = registry.notifies
            with registry.waiting("k", ["again"]) as waiter:
                started = time.monotonic()
                sender.sendto(encode(["again"])[0], path)
                assert await waiter.wait(1)
                assert time.monotonic() - started < 0.05
            assert registry.notifies == before + 1
        wake.close()

    asyncio.run(scenario())
    assert not os.path.exists(wake.directory)  # the last socket gone, the directory too


def test_a_full_queue_wakes_every_waiter(tmp_path: Path) -> None:
    registry = WakeupRegistry()
    wake = FileWakeups(str(tmp_path / "x.sqlite3"), registry, "k", "test store")

    async def scenario() -> None:
        assert wake.listen()
        path = own_socket(wake.directory)
        with (
            registry.waiting("k", ["dropped"]) as waiter,
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
        ):
            sender.setblocking(False)
            # The loop reads nothing meanwhile: the queue fills and the last datagram is refused.
            sent = 0
            try:
                while sent < 100_000:
                    sender.sendto(encode([f"other{sent}"])[0], path)
                    sent += 1
            except BlockingIOError:
                pass
            assert sent < 100_000
            try:
                sender.sendto(encode(["dropped"])[0], path)
            except BlockingIOError:
                pass
            else:
                raise AssertionError("the queue took one datagram more than it had room for")
            assert await waiter.wait(1)
        wake.close()

    asyncio.run(scenario())


def test_a_long_path_listens_in_a_private_directory_of_the_temp_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    wake = FileWakeups(str(deep / "x.sqlite3"), WakeupRegistry(), "k", "test store")
    assert os.path.dirname(wake.directory) == tempfile.gettempdir()
    assert wake.directory == file_wakeups.wake_directory(str(deep / "x.sqlite3"))[0]

    async def scenario() -> None:
        assert wake.listen()
        found = os.stat(wake.directory)
        assert found.st_mode & 0o777 == 0o700
        assert found.st_uid == os.geteuid()
        own_socket(wake.directory)
        wake.close()

    asyncio.run(scenario())
    assert not os.path.exists(wake.directory)
