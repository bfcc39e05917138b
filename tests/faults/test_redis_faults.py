"""Faults on Redis: a worker SIGKILLed mid-task, a task longer than its lease, a Redis restart
during 1,000 tasks, the worker's connections killed with CLIENT KILL.

The restart runs on a private ``redis-server`` (append-only file, fsync always); the other tests
use the shared Redis under a unique ``global_keyprefix``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (
    Client,
    RedisServer,
    Setup,
    Workers,
    broker_restart_during_run,
    connections_killed_mid_run,
    kill_clients,
    long_task_runs_once,
    sigkill_mid_task,
)
from tests.services import unique

pytestmark = pytest.mark.e2e


@pytest.fixture
def shared(
    shared_redis: tuple[str, str],
    workers: Workers,
    clients: Callable[..., Client],
    tmp_path: Path,
) -> Setup:
    """Broker and results on the shared Redis, every key under this test's prefix."""
    url, token = shared_redis
    prefix = {"global_keyprefix": f"{token}:"}
    return Setup(
        broker=url,
        backend=url,
        token=token,
        workdir=tmp_path,
        workers=workers,
        clients=clients,
        broker_options=dict(prefix),
        backend_options=dict(prefix),
    )


def _report(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items()))


def test_sigkill_mid_task_is_redelivered_and_completes_once(shared: Setup) -> None:
    _report("redis sigkill", sigkill_mid_task(shared, visibility=2.0))


def test_task_longer_than_visibility_timeout_runs_once(shared: Setup) -> None:
    long_task_runs_once(shared, visibility=1.0, seconds=4.0)


def test_redis_restart_during_1000_tasks(
    private_redis: RedisServer,
    workers: Workers,
    clients: Callable[..., Client],
    tmp_path: Path,
) -> None:
    setup = Setup(
        broker=private_redis.url(0),
        backend=private_redis.url(1),
        token=unique("restart"),
        workdir=tmp_path,
        workers=workers,
        clients=clients,
    )
    figures = broker_restart_during_run(setup, private_redis.stop, private_redis.start)
    _report("redis restart", figures)


def test_client_kill_of_the_worker_connections(
    shared: Setup, shared_redis: tuple[str, str]
) -> None:
    url, token = shared_redis
    name = f"{token}-worker"
    named = {"client_name": name}
    figures = connections_killed_mid_run(
        shared, lambda: kill_clients(url, name), broker_extra=named, backend_extra=named
    )
    _report("redis client kill", figures)
