"""Faults on RabbitMQ: a worker SIGKILLed mid-task, a task longer than ``visibility_timeout``, a
restart of the node during 1,000 tasks, every connection closed by the server mid-run.

The broker is a private RabbitMQ node started once for the module (so it can be restarted);
results go to the shared Redis under a unique ``global_keyprefix``, which the restart does not
touch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import (
    Client,
    RabbitNode,
    Setup,
    Workers,
    broker_restart_during_run,
    connections_killed_mid_run,
    long_task_runs_once,
    sigkill_mid_task,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def setup(
    private_rabbit: RabbitNode,
    shared_redis: tuple[str, str],
    workers: Workers,
    clients: Callable[..., Client],
    tmp_path: Path,
) -> Setup:
    url, token = shared_redis
    return Setup(
        broker=private_rabbit.url,
        backend=url,
        token=token,
        workdir=tmp_path,
        workers=workers,
        clients=clients,
        backend_options={"global_keyprefix": f"{token}:"},
    )


def _report(title: str, figures: dict[str, Any]) -> None:
    print(f"\n{title}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items()))


def test_sigkill_mid_task_is_redelivered_and_completes_once(setup: Setup) -> None:
    # RabbitMQ gives a dead connection's messages back at once; the lease is only the worker's.
    _report("amqp sigkill", sigkill_mid_task(setup, visibility=1.0))


def test_task_longer_than_visibility_timeout_runs_once(setup: Setup) -> None:
    long_task_runs_once(setup, visibility=1.0, seconds=4.0)


def test_node_restart_during_1000_tasks(setup: Setup, private_rabbit: RabbitNode) -> None:
    figures = broker_restart_during_run(setup, private_rabbit.stop_app, private_rabbit.start_app)
    _report("amqp restart", figures)


def test_server_closing_every_connection_mid_run(setup: Setup, private_rabbit: RabbitNode) -> None:
    _report(
        "amqp close connections",
        connections_killed_mid_run(setup, private_rabbit.close_connections),
    )
