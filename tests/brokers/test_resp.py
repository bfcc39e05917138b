"""The pipelined Redis connection of the Redis transport and result store (celeriac.utils.resp).

Against the shared Redis (database 9, keys of the test's own) and, for what needs a server of its
own (a password, TLS, Sentinel, a server that goes away), private ``redis-server`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac.brokers.base import BrokerOptions
from celeriac.brokers.redis import RedisBroker
from celeriac.exceptions import ConnectionError
from celeriac.protocol.envelope import TransportMessage
from celeriac.utils.redis_url import parse_redis_url
from celeriac.utils.resp import ConnectionLost, PyReader, RedisPipe, ReplyError, pack
from tests.services import free_port, in_ci, redis_url, require_redis, unique


def pipe_for(url: str, **options: Any) -> RedisPipe:
    target, _ = parse_redis_url(url, options)
    return RedisPipe(target)


# -- encoding and decoding, no server ----------------------------------------------------------


def test_pack_writes_resp_arrays_of_bulk_strings() -> None:
    assert pack([("SET", "k", b"v\r\n", 3, 1.5)]) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n3\r\n$3\r\n1.5\r\n"
    )
    assert (
        pack([("PING",), ("GET", "é")])
        == b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"
    )


@pytest.mark.parametrize("bad", [True, None, ["x"]])
def test_pack_refuses_what_redis_cannot_take(bad: Any) -> None:
    with pytest.raises(TypeError, match="Redis argument"):
        pack([("SET", "k", bad)])


REPLIES = (
    b"+OK\r\n"
    b"-NOSCRIPT No matching script\r\n"
    b":-42\r\n"
    b"$5\r\nhe\r\nl\r\n"
    b"$-1\r\n"
    b"*3\r\n$1\r\na\r\n*-1\r\n*2\r\n:1\r\n$0\r\n\r\n"
    b"*0\r\n"
)


def read_all(reader: Any, data: bytes, step: int) -> list[Any]:
    """Feed ``data`` ``step`` bytes at a time; every reply read."""
    replies: list[Any] = []
    for start in range(0, len(data), step):
        reader.feed(data[start : start + step])
        while (reply := reader.gets()) is not False:
            replies.append(reply)
    return replies


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_python_reader_reads_every_reply_type_however_the_bytes_arrive(step: int) -> None:
    replies = read_all(PyReader(), REPLIES, step)
    assert replies[0] == b"OK"
    assert isinstance(replies[1], ReplyError) and replies[1].code == "NOSCRIPT"
    assert replies[2:] == [-42, b"he\r\nl", None, [b"a", None, [1, b""]], []]


def test_python_reader_reads_as_hiredis_does() -> None:
    hiredis = pytest.importorskip("hiredis")
    ours = read_all(PyReader(), REPLIES, 5)
    theirs = read_all(hiredis.Reader(replyError=ReplyError), REPLIES, 5)
    assert [type(r) for r in ours] == [type(r) for r in theirs]
    assert [r for r in ours if not isinstance(r, ReplyError)] == [
        r for r in theirs if not isinstance(r, ReplyError)
    ]


# -- against the shared Redis ------------------------------------------------------------------


@pytest.fixture
def url() -> str:
    require_redis()
    return redis_url()


def test_commands_of_one_batch_get_their_replies_in_order(url: str) -> None:
    key = unique("resp")

    async def main() -> None:
        pipe = pipe_for(url)
        try:
            replies = await pipe.execute(
                [("SET", key, "1"), ("INCR", key), ("HSET", key, "f", "v"), ("GET", key)]
            )
            assert replies[:2] == [b"OK", 2]
            # An error reply takes its place; the commands after it ran (not a transaction).
            assert isinstance(replies[2], ReplyError) and replies[2].code == "WRONGTYPE"
            assert replies[3] == b"2"
            with pytest.raises(ReplyError, match="WRONGTYPE"):
                await pipe.call("HGET", key, "f")
            assert await pipe.call("DEL", key) == 1
        finally:
            pipe.close()

    asyncio.run(main())


def test_concurrent_callers_share_the_connection_and_each_gets_its_own_replies(url: str) -> None:
    key = unique("resp")

    async def one(pipe: RedisPipe, n: int) -> None:
        value = f"{n}-" + "x" * (n * 37 % 5000)
        reply = await pipe.execute([("SET", f"{key}:{n}", value), ("GET", f"{key}:{n}")])
        assert reply == [b"OK", value.encode()]

    async def main() -> None:
        pipe = pipe_for(url)
        try:
            await asyncio.gather(*(one(pipe, n) for n in range(300)))
            assert await pipe.call("DEL", *(f"{key}:{n}" for n in range(300))) == 300
        finally:
            pipe.close()

    asyncio.run(main())


def test_a_cancelled_caller_does_not_shift_the_replies_of_the_next(url: str) -> None:
    async def main() -> None:
        pipe = pipe_for(url)
        try:
            await pipe.connect()
            slow = asyncio.ensure_future(pipe.call("BLPOP", unique("resp"), "0.2"))
            await asyncio.sleep(0.05)
            slow.cancel()
            assert await pipe.call("ECHO", "after") == b"after"
        finally:
            pipe.close()

    asyncio.run(main())


def test_evalsha_loads_a_script_the_server_does_not_know(url: str) -> None:
    source = f"return '{unique('script')}'"  # never loaded before: the first EVALSHA is NOSCRIPT
    sha = __import__("hashlib").sha1(source.encode()).hexdigest()

    async def main() -> None:
        pipe = pipe_for(url)
        try:
            assert await pipe.evalsha(sha, source, (), ()) == source[8:-1].encode()
        finally:
            pipe.close()

    asyncio.run(main())


def test_send_now_writes_its_command_before_it_is_awaited(url: str) -> None:
    """What a fetch relies on to go out ahead of the writes queued later in the same turn."""
    import redis

    key, token = unique("resp"), unique("script")
    source = f"redis.call('SET', ARGV[1], 'ran') return '{token}'"
    sha = __import__("hashlib").sha1(source.encode()).hexdigest()
    watcher = redis.Redis.from_url(url)

    async def main() -> None:
        pipe = pipe_for(url)
        try:
            await pipe.call("SCRIPT", "LOAD", source)
            future = pipe.send_now(("EVALSHA", sha, 0, key))
            assert future is not None
            # No await, so the loop has not run: the server can only have the command if it was
            # written by send_now itself.
            deadline = time.monotonic() + 5
            while watcher.get(key) is None:
                assert time.monotonic() < deadline, "the script was not sent"
                time.sleep(0.001)
            assert await future == [token.encode()]
            [error] = await pipe.send_now(("EVALSHA", "0" * 40, 0))  # type: ignore[misc]
            assert isinstance(error, ReplyError) and error.code == "NOSCRIPT"  # a value, not raised
        finally:
            pipe.close()
            watcher.delete(key)
            watcher.close()

    asyncio.run(main())


def test_send_now_declines_what_cannot_go_out_at_once(url: str) -> None:
    """No connection yet, or a socket_timeout to enforce: None, and call() does it instead."""

    async def main() -> None:
        pipe = pipe_for(url)
        timed = pipe_for(url, socket_timeout=5)
        try:
            assert pipe.send_now(("PING",)) is None
            assert not pipe.connected  # nothing was attempted
            assert await pipe.call("PING") == b"PONG"
            assert await timed.call("PING") == b"PONG"
            assert timed.send_now(("PING",)) is None
            future = pipe.send_now(("PING",))
            assert future is not None and await future == [b"PONG"]
        finally:
            pipe.close()
            timed.close()

    asyncio.run(main())


def test_the_replies_of_a_cancelled_send_now_go_to_its_orphan(url: str) -> None:
    """A caller cancelled while it waits: the replies, when they come, go to ``orphan`` (a fetch
    gives back what it leased), and the connection goes on with the next commands."""
    key = unique("resp")

    async def main() -> None:
        pipe = pipe_for(url)
        orphaned: list[list[Any]] = []
        try:
            await pipe.call("PING")
            future = pipe.send_now(("INCR", key), orphan=orphaned.append)
            assert future is not None
            waiter = asyncio.ensure_future(future)
            await asyncio.sleep(0)
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            assert future.cancelled()
            assert await pipe.call("GET", key) == b"1"  # the reply of INCR came first
            assert orphaned == [[1]]
            failing = pipe.send_now(("INCR", key), orphan=lambda replies: 1 / 0)
            assert failing is not None
            failing.cancel()
            assert await pipe.call("GET", key) == b"2"  # an orphan's error is logged, no more
        finally:
            await pipe.call("DEL", key)
            pipe.close()

    asyncio.run(main())


def test_the_connection_is_made_again_after_the_server_closed_it(url: str) -> None:
    name = unique("resp")
    import redis

    async def main() -> None:
        pipe = pipe_for(url, client_name=name)
        try:
            assert await pipe.call("PING") == b"PONG"
            killer = redis.Redis.from_url(url)
            (mine,) = [c for c in killer.client_list() if c.get("name") == name]
            assert killer.client_kill_filter(_id=mine["id"]) == 1
            killer.close()
            await asyncio.sleep(0.05)  # the loop sees the connection close
            assert await pipe.call("PING") == b"PONG"  # a fresh connection, nothing lost
        finally:
            pipe.close()

    asyncio.run(main())


def test_a_server_that_answers_nothing_is_given_up_after_socket_timeout() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    async def main() -> None:
        pipe = pipe_for(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match=r"0\.3s"):
            await pipe.call("PING")
        assert time.monotonic() - started < 2

    try:
        asyncio.run(main())
    finally:
        server.close()


def test_nothing_listening_is_connection_lost() -> None:
    async def main() -> None:
        pipe = pipe_for(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(ConnectionLost, match="cannot connect"):
            await pipe.call("PING")

    asyncio.run(main())


# -- private servers ---------------------------------------------------------------------------


def redis_server() -> str:
    program = shutil.which("redis-server")
    if program is None:
        if in_ci():
            pytest.fail("CI=true and redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    return program


@contextlib.contextmanager
def private_redis(
    directory: Path, *args: str, config: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    first = [str(config)] if config is not None else []  # a configuration file comes first
    proc = subprocess.Popen(
        [
            redis_server(),
            *first,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(directory),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the private redis-server exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


def test_password_database_and_client_name_are_sent_on_connect(tmp_path: Path) -> None:
    port = free_port()
    with private_redis(tmp_path, "--port", str(port), "--requirepass", "s3cret") as proc:
        wait_for_port(port, proc)

        async def main() -> None:
            good = pipe_for(f"redis://:s3cret@127.0.0.1:{port}/5", client_name="resp-test")
            try:
                await good.call("SET", "k", "in five")
                assert await good.call("CLIENT", "GETNAME") == b"resp-test"
                assert (await good.call("CLIENT", "INFO")).split(b" db=")[1][:1] == b"5"
            finally:
                good.close()
            bad = pipe_for(f"redis://:wrong@127.0.0.1:{port}/0")
            with pytest.raises(ReplyError) as refused:
                await bad.call("PING")
            assert refused.value.refused

        asyncio.run(main())


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_server_args(port: int, cert: Path, key: Path) -> list[str]:
    """redis-server options: TLS only, on ``port``, with this certificate; clients unchecked."""
    return [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    ]


def test_tls_with_certificate_checks_for_the_broker_and_its_pipe(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = make_certificate(tmp_path)
    port = free_port()
    tls = tls_server_args(port, cert, key)
    with private_redis(tmp_path, *tls) as proc:
        wait_for_port(port, proc)
        url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"

        async def main() -> None:
            broker = RedisBroker(url, BrokerOptions())
            await broker.connect()
            try:
                await broker.publish(
                    TransportMessage(b"{}", "application/json", "utf-8", {"id": "x"}),
                    exchange="",
                    routing_key="q",
                )
                (delivery,) = await broker.fetch(["q"], 10, 1.0)
                assert delivery.message.headers == {"id": "x"}
                await broker.ack([delivery])
            finally:
                await broker.close()
            untrusted = RedisBroker(f"rediss://127.0.0.1:{port}/0", BrokerOptions())
            with pytest.raises(ConnectionError, match=r"(?i)certificate"):
                await untrusted.connect()
            with pytest.raises(ConnectionLost, match=r"(?i)certificate"):
                await pipe_for(f"rediss://127.0.0.1:{port}/0").call("PING")
            # Without checks (ssl_cert_reqs=none) the same server is reachable.
            unchecked = pipe_for(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
            assert await unchecked.call("PING") == b"PONG"
            unchecked.close()

        asyncio.run(main())


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

        async def main() -> None:
            pipe = pipe_for(f"sentinel://127.0.0.1:{sentinel_port}/2", master_name="celeriac-test")
            try:
                await pipe.call("SET", "k", "v")
                info = await pipe.call("CLIENT", "INFO")
                assert f"laddr=127.0.0.1:{master_port}".encode() in info
                assert b" db=2 " in info
            finally:
                pipe.close()

        asyncio.run(main())
