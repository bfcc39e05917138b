"""Interop harness: a real Celery worker and a celeriac worker on one broker, clients of both kinds.

One :class:`Matrix` is a broker + result store pairing with two worker processes started once per
test module (a real ``celery worker`` and a ``celeriac worker``), each consuming queues of its own
with names no other run uses, and two client apps in this process:

* the **Celery client** sends to the celeriac worker's queues (direction ``celery-to-celeriac``);
* the **celeriac client** sends to the Celery worker's queues (direction ``celeriac-to-celery``).

Each result is read back through the *sending* side's own ``AsyncResult``. On Redis every key of a
matrix carries one unique ``global_keyprefix`` (broker and result store alike, database
:data:`tests.services.REDIS_DB`); on RabbitMQ the queues and their exchanges are unique. What a
matrix created is deleted when it is torn down; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import pytest
from celery.backends.redis import RedisBackend
from celery.backends.rpc import RPCBackend

from tests import services

APPS = Path(__file__).parent / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))

import celeriac_interop  # noqa: E402 - found through APPS, put on sys.path just above
import celery_interop  # noqa: E402
from interop_config import settings  # noqa: E402

#: Seconds a worker gets to print "ready." (a Celery worker imports a lot on 2 busy cores).
READY_TIMEOUT = 30.0


class WorkerProcess:
    """A worker subprocess whose output goes to a log file; stopped by its own pid only."""

    def __init__(self, name: str, command: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=dict(env), stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        """Wait until ``text`` is in the log; fail with the log if the worker exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) before logging {text!r}:\n"
                    f"{self.log()}"
                )
            time.sleep(0.02)
        raise AssertionError(
            f"{text!r} not in the log of {self.name} after {timeout}s:\n{self.log()}"
        )

    def stop(self, timeout: float = 10.0) -> int:
        """Warm shutdown (SIGTERM); SIGKILL if the worker is still there after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


def _worker_env(interop: Mapping[str, str]) -> dict[str, str]:
    env = {**os.environ, **interop}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(APPS), str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")] if p
    )
    # Celery refuses to run as root with pickle in accept_content unless told it may: the tests
    # accept pickle on purpose, and CI containers run as root.
    env["C_FORCE_ROOT"] = "1"
    return env


def celery_worker_command(queues: list[str], hostname: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_interop:app",
        "worker",
        "-P",
        "threads",
        "-c",
        "4",
        "--loglevel=info",
        "-Q",
        ",".join(queues),
        "-n",
        f"{hostname}@%h",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
    ]


def celeriac_worker_command(queues: list[str], hostname: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celeriac",
        "-A",
        "celeriac_interop:app",
        "worker",
        "-P",
        "threads",
        "-c",
        "4",
        "--loglevel=info",
        "-Q",
        ",".join(queues),
        "-n",
        f"{hostname}@%h",
    ]


@dataclass
class Direction:
    """Who sends, who runs: the sending app and the queues of the worker on the other side."""

    name: str
    sender: str
    receiver: str
    client: Any
    queue: str
    named_queue: str
    worker: WorkerProcess

    def task(self, short_name: str) -> Any:
        """The sending app's task object ``interop.<short_name>``."""
        return self.client.tasks[f"interop.{short_name}"]

    def __str__(self) -> str:
        return self.name


@dataclass
class Matrix:
    """One broker + result store pairing, both workers, both clients."""

    name: str
    broker_url: str
    result_backend: str
    workdir: Path
    keyprefix: str | None = None
    #: ``broker_transport_options`` of the celeriac client (what a mixed fleet configures).
    celeriac_client_broker_options: dict[str, Any] = field(default_factory=dict)
    #: Bind the celeriac worker's default queue to this exchange/routing key (the design
    #: notes' ``celery``/``celery``); ``None``: the queue's own name, as usual.
    legacy_binding: str | None = None
    directions: dict[str, Direction] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = services.unique("iop")
        self.celeriac_queues = [f"{tag}.celeriac", f"{tag}.celeriac.named"]
        self.celery_queues = [f"{tag}.celery", f"{tag}.celery.named"]
        self.legacy_queue = f"{tag}.celeriac.legacy"
        self.queues = [*self.celeriac_queues, *self.celery_queues, self.legacy_queue]
        self.tag = tag

    def _interop_env(self, queue: str, legacy: bool = False) -> dict[str, str]:
        env = {
            "INTEROP_BROKER_URL": self.broker_url,
            "INTEROP_RESULT_BACKEND": self.result_backend,
            "INTEROP_QUEUE": queue,
            "INTEROP_KEYPREFIX": self.keyprefix or "",
        }
        if legacy and self.legacy_binding:
            env["INTEROP_DEFAULT_EXCHANGE"] = self.legacy_binding
            env["INTEROP_DEFAULT_ROUTING_KEY"] = self.legacy_binding
        return env

    def start(self) -> None:
        celeriac_consumes = list(self.celeriac_queues)
        celeriac_default = self.celeriac_queues[0]
        if self.legacy_binding:
            # The default queue is the one bound to the legacy exchange/routing key; the clients
            # still send to the other queues by name.
            celeriac_consumes.append(self.legacy_queue)
            celeriac_default = self.legacy_queue
        # Both workers start at once: their start-up times overlap instead of adding up.
        celery_worker = WorkerProcess(
            f"celery-worker-{self.name}",
            celery_worker_command(self.celery_queues, f"celery-{self.tag}"),
            _worker_env(self._interop_env(self.celery_queues[0])),
            self.workdir,
        )
        self.workers.append(celery_worker)
        celeriac_worker = WorkerProcess(
            f"celeriac-worker-{self.name}",
            celeriac_worker_command(celeriac_consumes, f"celeriac-{self.tag}"),
            _worker_env(self._interop_env(celeriac_default, legacy=True)),
            self.workdir,
        )
        self.workers.append(celeriac_worker)
        celeriac_worker.wait_for("ready.", READY_TIMEOUT)
        celery_worker.wait_for("ready.", READY_TIMEOUT)

        celery_client = celery_interop.build_app(
            f"celery-client-{self.name}",
            settings(
                self.broker_url,
                self.result_backend,
                queue=self.celeriac_queues[0],
                keyprefix=self.keyprefix,
            ),
        )
        self.clients.append(celery_client)
        celeriac_client = celeriac_interop.build_app(
            f"celeriac-client-{self.name}",
            settings(
                self.broker_url,
                self.result_backend,
                queue=self.celery_queues[0],
                keyprefix=self.keyprefix,
                broker_options=self.celeriac_client_broker_options,
            ),
        )
        self.clients.append(celeriac_client)
        self.directions = {
            "celery-to-celeriac": Direction(
                "celery-to-celeriac",
                "celery",
                "celeriac",
                celery_client,
                self.celeriac_queues[0],
                self.celeriac_queues[1],
                celeriac_worker,
            ),
            "celeriac-to-celery": Direction(
                "celeriac-to-celery",
                "celeriac",
                "celery",
                celeriac_client,
                self.celery_queues[0],
                self.celery_queues[1],
                celery_worker,
            ),
        }

    @property
    def celery_client(self) -> Any:
        return self.directions["celery-to-celeriac"].client

    @property
    def celeriac_client(self) -> Any:
        return self.directions["celeriac-to-celery"].client

    def stop(self) -> None:
        """Close the clients, stop the workers, delete what this matrix created.

        Each step runs even if one before it failed; the first failure is raised at the end.
        """
        with contextlib.ExitStack() as cleanup:
            # Callbacks run last-registered first: clients, then workers, then the names.
            if self.broker_url.startswith("amqp"):
                cleanup.callback(delete_amqp_names, self.broker_url, self.queues)
            if self.keyprefix:
                cleanup.callback(delete_redis_prefix, self.keyprefix)
            for worker in self.workers:
                cleanup.callback(worker.stop)
            for client in self.clients:
                if isinstance(client, celery.Celery):
                    cleanup.callback(close_celery_client, client)
                else:
                    cleanup.callback(client.close)


def close_celery_client(app: Any) -> None:
    """Close every connection of a real Celery client app.

    ``Celery.close()`` only forgets its connection pool, and the result consumer (the rpc reply
    queue's consumer, the Redis pub/sub connection) keeps its socket: both are closed here.
    """
    backend = app.backend
    if isinstance(backend, RPCBackend):
        if backend.result_consumer._connection is not None:  # the reply consumer was started
            backend.result_consumer.stop()
    elif isinstance(backend, RedisBackend):
        backend.result_consumer.stop()  # the pub/sub connection
        backend.client.connection_pool.disconnect()
    if app._pool is not None:
        app._pool.force_close_all()
    app.close()


def delete_redis_prefix(prefix: str) -> int:
    """Delete the keys under ``prefix`` (a run's own) in the test database."""
    import redis

    client = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=services.REDIS_DB)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def delete_amqp_names(url: str, names: list[str]) -> None:
    """Delete the queues and same-named exchanges this run declared (missing ones are fine)."""
    import kombu

    with kombu.Connection(url, connect_timeout=5) as conn:
        for name in names:
            for kind in ("queue", "exchange"):
                channel = conn.channel()
                try:
                    if kind == "queue":
                        channel.queue_delete(name)
                    else:
                        channel.exchange_delete(name)
                except Exception:  # a name that was never declared: nothing to delete
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        channel.close()


@contextlib.contextmanager
def running_matrix(matrix: Matrix) -> Iterator[Matrix]:
    """Start ``matrix``; whatever happens, stop its workers and delete what it created."""
    try:
        matrix.start()
        yield matrix
    finally:
        matrix.stop()


# -- helpers used by the test modules ------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """When a test fails, show the end of the log of the worker it sent to, under the failure."""
    report = yield
    if report.when == "call" and report.failed and isinstance(item, pytest.Function):
        for fixture in ("direction", "to_celeriac"):
            direction = item.funcargs.get(fixture)
            if isinstance(direction, Direction):
                tail = "\n".join(direction.worker.log().splitlines()[-60:])
                report.sections.append((f"end of {direction.worker.log_path}", tail))
    return report


def golden(name: str) -> dict[str, Any]:
    path = Path(__file__).parents[1] / "golden" / name
    value: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return value


@pytest.fixture(scope="module")
def interop_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")
