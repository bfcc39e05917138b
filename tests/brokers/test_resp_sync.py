"""The blocking Redis connections of synchronous callers (celeriac.utils.resp_sync).

Against the shared Redis (database 9, keys of the test's own) and, for what needs a server of its
own (a password, TLS, Sentinel, a unix socket, a server without RESP3), private ``redis-server``
processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from celeriac.utils.redis_url import parse_redis_url
from celeriac.utils.resp import ConnectionLost, RedisPipe, ReplyError
from celeriac.utils.resp_sync import (
    ConnectFailed,
    PushNotification,
    Resp3Refused,
    SyncPool,
)
from tests.brokers.test_resp import (
    make_certificate,
    private_redis,
    tls_server_args,
    wait_for_port,
)
from tests.forking import run_in_fork_child
from tests.services import free_port, redis_url, require_redis, unique


def pool_for(url: str, **options: Any) -> SyncPool:
    resp3 = options.pop("resp3", False)
    target, _ = parse_redis_url(url, options)
    return SyncPool(target, resp3=resp3)


@pytest.fixture
def url() -> str:
    require_redis()
    return redis_url()


def client_id(pool: SyncPool) -> int:
    return int(pool.call("CLIENT", "ID"))


def test_commands_of_one_batch_get_their_replies_in_order(url: str) -> None:
    pool = pool_for(url)
    key = unique("k")
    try:
        replies = pool.execute(
            [("SET", key, "v"), ("GET", key), ("INCR", key), ("DEL", key), ("GET", key)]
        )
        assert replies[:2] == [b"OK", b"v"]
        assert isinstance(replies[2], ReplyError)  # in its place; the others ran
        assert replies[3:] == [1, None]
        with pytest.raises(ReplyError):
            pool.call("INCR", "a", "b", "c")
    finally:
        pool.close()


def test_a_connection_is_kept_for_the_next_call(url: str) -> None:
    pool = pool_for(url)
    try:
        assert client_id(pool) == client_id(pool)
    finally:
        pool.close()


def test_threads_each_get_their_own_replies(url: str) -> None:
    pool = pool_for(url)
    key = unique("k")
    problems: list[str] = []

    def work(n: int) -> None:
        for i in range(100):
            value = f"{n}-{i}"
            if pool.call("ECHO", value) != value.encode():
                problems.append(value)
            pool.call("INCR", key)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert problems == []
        assert int(pool.call("GET", key)) == 800
    finally:
        pool.call("DEL", key)
        pool.close()


def test_evalsha_loads_a_script_the_server_does_not_know(url: str) -> None:
    pool = pool_for(url)
    source = f"return '{unique()}'"
    sha = hashlib.sha1(source.encode()).hexdigest()
    try:
        pool.call("SCRIPT", "FLUSH")
        assert pool.evalsha(sha, source, (), ()) == source[8:-1].encode()
    finally:
        pool.close()


def test_a_lost_connection_fails_the_call_unless_it_may_run_again(url: str) -> None:
    pool = pool_for(url)
    killer = pool_for(url)
    try:
        first = client_id(pool)
        killer.call("CLIENT", "KILL", "ID", first)
        with pytest.raises(ConnectionLost):
            pool.call("PING")
        second = client_id(pool)  # the next call connects again
        assert second != first
        killer.call("CLIENT", "KILL", "ID", second)
        assert pool.call("PING", retries=1) == b"PONG"
    finally:
        pool.close()
        killer.close()


def test_an_idle_connection_is_checked_before_use(url: str) -> None:
    pool = pool_for(url, health_check_interval=1)
    killer = pool_for(url)
    try:
        first = client_id(pool)
        killer.call("CLIENT", "KILL", "ID", first)
        time.sleep(1.1)
        # Not a retry: the health check found the dead connection before the command went out.
        assert client_id(pool) != first
    finally:
        pool.close()
        killer.close()


def test_a_server_that_answers_nothing_is_given_up_after_socket_timeout() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        pool = pool_for(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(ConnectFailed, match=r"no reply within 0\.2s"):
            pool.call("PING")
        assert time.monotonic() - started < 2


def test_nothing_listening_reads_as_the_asyncio_connection_says_it() -> None:
    port = free_port()
    pool = pool_for(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(ConnectFailed) as blocking:
        pool.call("PING")
    assert pool.ever_connected is False

    async def asyncio_error() -> str:
        target, _ = parse_redis_url(f"redis://127.0.0.1:{port}/0", {})
        with pytest.raises(ConnectionLost) as lost:
            await RedisPipe(target).call("PING")
        return str(lost.value)

    assert str(blocking.value) == asyncio.run(asyncio_error())
    assert "Connect call failed ('127.0.0.1'" in str(blocking.value)


def test_a_forked_child_opens_its_own_connection_and_leaves_the_parents(url: str) -> None:
    pool = pool_for(url)
    key = unique("k")
    try:
        parent = client_id(pool)

        async def child() -> None:
            assert client_id(pool) != parent
            pool.call("SET", key, "child")
            pool.close()  # closes the child's connections only

        assert run_in_fork_child(child) == 0
        assert client_id(pool) == parent  # the parent's connection was neither used nor closed
        assert pool.call("GET", key) == b"child"
    finally:
        pool.call("DEL", key)
        pool.close()


def test_resp3_subscribe_and_read_in_one_round_trip(url: str) -> None:
    pool = pool_for(url, resp3=True)
    other = pool_for(url)
    channel = unique("ch").encode()
    try:
        connection = pool.acquire()
        connection.write(b"".join(_packed(("SUBSCRIBE", channel), ("GET", channel))))
        frames = [connection.read(), connection.read()]
        assert isinstance(frames[0], PushNotification)
        assert list(frames[0]) == [b"subscribe", channel, 1]
        assert frames[1] is None  # the GET's reply, after the subscription took effect
        other.call("PUBLISH", channel, "hello")
        message = connection.read_within(2.0)
        assert isinstance(message, PushNotification)
        assert list(message) == [b"message", channel, b"hello"]
        assert connection.read_within(0.01) is False  # nothing more
        connection.stale_channels.append(channel)
        pool.release(connection)
        # The next user's commands unsubscribe the channel left behind; its replies are not
        # mixed with the pushed confirmation.
        assert pool.call("ECHO", "x") == b"x"
        assert other.call("PUBSUB", "NUMSUB", channel) == [channel, 0]
    finally:
        pool.close()
        other.close()


def _packed(*commands: tuple[Any, ...]) -> list[bytes]:
    from celeriac.utils.resp import pack

    return [pack([command]) for command in commands]


# -- private servers ---------------------------------------------------------------------------


def test_password_database_and_client_name_are_sent_on_connect(tmp_path: Path) -> None:
    port = free_port()
    with private_redis(tmp_path, "--port", str(port), "--requirepass", "s3cret") as proc:
        wait_for_port(port, proc)
        good = pool_for(f"redis://:s3cret@127.0.0.1:{port}/5", client_name="sync-test")
        try:
            good.call("SET", "k", "in five")
            assert good.call("CLIENT", "GETNAME") == b"sync-test"
            assert good.call("CLIENT", "INFO").split(b" db=")[1][:1] == b"5"
        finally:
            good.close()
        bad = pool_for(f"redis://:wrong@127.0.0.1:{port}/0")
        with pytest.raises(ReplyError) as refused:
            bad.call("PING")
        assert refused.value.refused


def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "redis.sock"
    with private_redis(tmp_path, "--port", "0", "--unixsocket", str(path)) as proc:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        pool = pool_for(f"redis+socket://{path}?virtual_host=3")
        try:
            assert pool.call("PING") == b"PONG"
            assert b" db=3 " in pool.call("CLIENT", "INFO")
        finally:
            pool.close()
    missing = pool_for(f"redis+socket://{tmp_path}/nothing.sock")
    with pytest.raises(ConnectFailed, match="No such file"):
        missing.call("PING")


def test_tls_with_certificate_checks(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = make_certificate(tmp_path)
    port = free_port()
    tls = tls_server_args(port, cert, key)
    with private_redis(tmp_path, *tls) as proc:
        wait_for_port(port, proc)
        checked = pool_for(
            f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}", resp3=True
        )
        try:
            assert checked.call("PING") == b"PONG"
            # A large reply arrives in many TLS records: read whole.
            checked.call("SET", "big", b"x" * 300_000)
            assert checked.call("GET", "big") == b"x" * 300_000
        finally:
            checked.close()
        with pytest.raises(ConnectFailed, match=r"(?i)certificate"):
            pool_for(f"rediss://127.0.0.1:{port}/0").call("PING")


def test_sentinel_names_the_master_to_connect_to(tmp_path: Path) -> None:
    master_port, sentinel_port = free_port(), free_port()
    (tmp_path / "m").mkdir()
    (tmp_path / "s").mkdir()
    config = tmp_path / "s" / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nsentinel monitor celeriac-test 127.0.0.1 {master_port} 1\n"
    )
    with (
        private_redis(tmp_path / "m", "--port", str(master_port)) as master,
        private_redis(tmp_path / "s", "--sentinel", config=config) as sentinel,
    ):
        wait_for_port(master_port, master)
        wait_for_port(sentinel_port, sentinel)
        pool = pool_for(f"sentinel://127.0.0.1:{sentinel_port}/2", master_name="celeriac-test")
        try:
            info = pool.call("CLIENT", "INFO")
            assert f"laddr=127.0.0.1:{master_port}".encode() in info
            assert b" db=2 " in info
        finally:
            pool.close()


def test_a_server_without_resp3_is_told_apart(tmp_path: Path) -> None:
    port = free_port()
    with private_redis(tmp_path, "--port", str(port), "--rename-command", "HELLO", '""') as proc:
        wait_for_port(port, proc)
        with pytest.raises(Resp3Refused):
            pool_for(f"redis://127.0.0.1:{port}/0", resp3=True).call("PING")
        plain = pool_for(f"redis://127.0.0.1:{port}/0")
        assert plain.call("PING") == b"PONG"
        plain.close()
