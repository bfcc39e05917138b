"""The network services some tests need (Redis, RabbitMQ), and what to do when one is down.

A test that needs a service calls :func:`require_redis` / :func:`require_rabbitmq` (or uses the
``redis_url`` / ``amqp_url`` fixtures of the conftest files). On a developer's machine without the
service the test is *skipped* with the reason; under ``CI=true`` it *fails*, so a CI machine whose
service is down cannot pass by skipping.

Isolation: every test gets keys of its own — a unique ``global_keyprefix`` on Redis (on the
database :data:`REDIS_DB`), unique queue and exchange names on RabbitMQ — so test runs on one
machine (a developer's and CI's) do not see each other's messages.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celeriac import Celery

REDIS_HOST = os.environ.get("CELERIAC_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CELERIAC_TEST_REDIS_PORT", "6379"))
#: The database number test runs use; kept away from 0, where real data usually lives.
REDIS_DB = int(os.environ.get("CELERIAC_TEST_REDIS_DB", "9"))

AMQP_HOST = os.environ.get("CELERIAC_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("CELERIAC_TEST_AMQP_PORT", "5672"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int, start_hint: str) -> None:
    """Skip (fail under CI) unless ``host:port`` accepts connections."""
    if _reachable(host, port):
        return
    reason = f"{name} is not running on {host}:{port} (start it with: {start_hint})"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def require_redis() -> None:
    require("Redis", REDIS_HOST, REDIS_PORT, "redis-server --daemonize yes")


def require_rabbitmq() -> None:
    require("RabbitMQ", AMQP_HOST, AMQP_PORT, "rabbitmq-server -detached")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (for private servers, or refusals)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unique(prefix: str = "t") -> str:
    """A short name no other test (or test run) uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def redis_url(db: int = REDIS_DB) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def amqp_url(vhost: str = "/") -> str:
    path = "" if vhost == "/" else vhost
    return f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{path}"


def wait_until(
    condition: Callable[[], Any],
    timeout: float = 5.0,
    what: str = "the condition",
    interval: float = 0.01,
) -> float:
    """Poll ``condition`` until it holds; the seconds it took. AssertionError on timeout."""
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - started


def app_on(kind: str, tmp_path: Path, main: str) -> Celery:
    """An app whose broker and results are ``kind`` (memory, sqlite, redis or amqp), all of its own:
    a unique memory name, files under ``tmp_path``, a unique Redis key prefix or AMQP queue (amqp
    keeps its results in SQLite). Skips, or fails in CI, when the service is not running."""
    from celeriac import Celery

    if kind == "memory":
        name = uuid.uuid4().hex
        return Celery(
            main, broker=f"memory://{name}", backend=f"memory://{name}", set_as_current=False
        )
    if kind == "sqlite":
        return Celery(
            main,
            broker=f"sqlite:///{tmp_path}/broker.sqlite3",
            backend=f"sqlite:///{tmp_path}/results.sqlite3",
            set_as_current=False,
        )
    if kind == "amqp":
        # RabbitMQ keeps no key-value data: the results (and revocations) live in SQLite.
        require_rabbitmq()
        return Celery(
            main,
            broker=amqp_url(),
            backend=f"sqlite:///{tmp_path}/results.sqlite3",
            task_default_queue=unique(main),
            set_as_current=False,
        )
    if kind == "redis":
        require_redis()
        prefix = unique(main) + ":"
        return Celery(
            main,
            broker=redis_url(),
            backend=redis_url(),
            broker_transport_options={"global_keyprefix": prefix},
            result_backend_transport_options={"global_keyprefix": prefix},
            set_as_current=False,
        )
    raise ValueError(f"no such kind of app: {kind!r}")
