"""celeriac on uvloop's event loop: the loop uvicorn and other ASGI servers run when it is installed.

An ``async def`` endpoint calls ``await add.adelay(...)`` and ``await result.aget()`` on that loop,
and an app that sets uvloop's policy has its worker run on it too. uvloop's transports have the
methods of asyncio's but are not instances of its classes, and its timers and errors differ: every
transport is exercised here with both sides on uvloop, against a real worker process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import services
from tests.e2e.conftest import WorkerProcess

APP = """
import asyncio
import os

import uvloop

from celeriac import Celery

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

options = {"global_keyprefix": os.environ["UV_PREFIX"]} if os.environ["UV_PREFIX"] else {}
app = Celery(
    "uvapp",
    broker=os.environ["UV_BROKER"],
    backend=os.environ["UV_BACKEND"],
    task_default_queue=os.environ["UV_QUEUE"],
    broker_transport_options=options,
    result_backend_transport_options=options,
)


@app.task(name="uv.add")
def add(x, y):
    return x + y


@app.task(name="uv.loop")
async def loop_module():
    return type(asyncio.get_running_loop()).__module__
"""


CLIENT = """
import asyncio
import json

import uvloop

import uvapp


async def endpoint():
    loop = type(asyncio.get_running_loop()).__module__
    sent = await uvapp.add.adelay(30, 42)
    many = [await uvapp.add.adelay(n, n) for n in range(20)]
    where = await uvapp.loop_module.adelay()
    return {
        "client_loop": loop,
        "value": await sent.aget(timeout=20),
        "values": [await result.aget(timeout=20) for result in many],
        "worker_loop": await where.aget(timeout=20),
    }


print(json.dumps(uvloop.run(endpoint())))
"""


def _uvloop() -> Any:
    if sys.platform == "win32":
        pytest.skip("uvloop has no Windows build")
    try:
        import uvloop
    except ImportError:
        if services.in_ci():
            pytest.fail("uvloop is not installed; the dev extra installs it")
        pytest.skip("uvloop is not installed (pip install -e '.[dev]')")
    return uvloop


def _redis(tmp_path: Path) -> tuple[str, str, str, Callable[[], None]]:
    services.require_redis()
    prefix = f"{services.unique('uv')}:"

    def cleanup() -> None:
        import redis

        client = redis.Redis.from_url(services.redis_url())
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    return services.redis_url(), services.redis_url(), prefix, cleanup


def _amqp(tmp_path: Path) -> tuple[str, str, str, Callable[[], None]]:
    services.require_rabbitmq()
    services.require_redis()
    # Results on Redis, unprefixed (the AMQP broker takes no key prefix); they expire.
    return services.amqp_url(), services.redis_url(), "", lambda: None


def _sqlite(tmp_path: Path) -> tuple[str, str, str, Callable[[], None]]:
    return (
        f"sqlite:///{tmp_path / 'broker.sqlite3'}",
        f"sqlite:///{tmp_path / 'results.sqlite3'}",
        "",
        lambda: None,
    )


STORES = {"redis": _redis, "amqp": _amqp, "sqlite": _sqlite}


@pytest.fixture(params=sorted(STORES))
def uv_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of an app that sets uvloop's policy, its worker process running."""
    _uvloop()
    broker, backend, prefix, cleanup = STORES[request.param](tmp_path)
    queue = services.unique("uvq")
    (tmp_path / "uvapp.py").write_text(textwrap.dedent(APP), encoding="utf-8")
    (tmp_path / "client.py").write_text(textwrap.dedent(CLIENT), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "UV_BROKER": broker,
        "UV_BACKEND": backend,
        "UV_QUEUE": queue,
        "UV_PREFIX": prefix,
    }
    worker = WorkerProcess(tmp_path, env, ["-A", "uvapp", "worker", "-Q", queue], "worker")
    try:
        worker.wait_for("ready.")
        yield env
    finally:
        code = worker.stop()
        if request.param == "amqp":
            _delete_queue(queue)
        cleanup()
    assert code == 0, worker.log()


def _delete_queue(queue: str) -> None:
    import kombu

    with kombu.Connection(services.amqp_url()) as connection:
        connection.default_channel.queue_delete(queue)


def test_an_async_client_and_a_worker_both_on_uvloop(
    uv_app: dict[str, str], tmp_path: Path
) -> None:
    # The client runs in a process of its own, as an ASGI server's would: in pytest's, uvloop's
    # loop.close() waits forever once pytest-timeout is active.
    client = subprocess.run(
        [sys.executable, "client.py"],
        cwd=tmp_path,
        env=uv_app,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert client.returncode == 0, client.stderr
    seen = json.loads(client.stdout.splitlines()[-1])
    assert seen["client_loop"].startswith("uvloop")
    assert seen["value"] == 72
    assert seen["values"] == [n + n for n in range(20)]
    assert seen["worker_loop"].startswith("uvloop")
