"""Harness of the fault tests: private servers to restart, worker processes to kill, a client.

* :class:`RedisServer` — a ``redis-server`` of the test's own on a free port, with the append-only
  file fsynced on every write, so stopping it (SIGTERM) and starting it again on the same directory
  keeps everything it acknowledged: a broker restart, not a broker wipe.
* :class:`RabbitNode` — a RabbitMQ node of the module's own (its own node name, ports, database
  and Erlang cookie), restarted with ``rabbitmqctl stop_app`` / ``start_app``: every connection is
  closed, the listener goes away, queues are recovered from disk when it comes back.
* :class:`WorkerProcess` — ``python -m celeriac -A faulttasks worker`` in a subprocess, which the
  tests SIGKILL or leave running through an outage.
* :class:`Client` — a celeriac app in the test process that sends tasks by name and reads results.

The shared servers (Redis on 6379, RabbitMQ on 5672) are never restarted or reconfigured; tests
that use the shared Redis work under a unique ``global_keyprefix`` and delete only their own keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery
from celeriac.exceptions import CeleriacError
from tests.services import (
    REDIS_DB,
    free_port,
    in_ci,
    redis_url,
    require_redis,
    unique,
    wait_until,
)

APPS = Path(__file__).parent / "apps"

#: Where Debian and Ubuntu keep RabbitMQ's own scripts; /usr/sbin/rabbitmq-server is a wrapper
#: that switches to the ``rabbitmq`` user (and so to the system node's Erlang cookie).
RABBITMQ_SCRIPTS = Path(os.environ.get("CELERIAC_TEST_RABBITMQ_SCRIPTS", "/usr/lib/rabbitmq/bin"))


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def need_program(path: str | None, what: str) -> str:
    """``path`` if it names a program; skip the test otherwise (fail under CI=true)."""
    if path and os.access(path, os.X_OK):
        return path
    reason = f"{what} is not installed; the fault tests start a private one"
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


def lines(path: Path) -> list[str]:
    """The lines of a record file the tasks append to; [] before the first one."""
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").split()


# -- private Redis ------------------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` of this test alone, restartable on the same port and data directory."""

    def __init__(self, directory: Path) -> None:
        self.program = need_program(shutil.which("redis-server"), "redis-server")
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [
                self.program,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.directory / "redis.log").read_text(errors="replace")
            raise AssertionError(f"redis-server exited ({self.proc.returncode}):\n{log}")
        import redis

        try:
            with redis.Redis(port=self.port, socket_timeout=0.5) as probe:
                return bool(probe.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SIGTERM (Redis shuts down cleanly, the append-only file is complete) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    yield server
    server.stop()


# -- shared Redis under a unique prefix ---------------------------------------------------------


@pytest.fixture
def shared_redis() -> Iterator[tuple[str, str]]:
    """``(url, token)``: the shared Redis (db :data:`REDIS_DB`) and a token unique to this test.

    Tests use ``token + ":"`` as ``global_keyprefix`` and put the token into their queue names and
    task ids. At teardown every key holding the token is deleted — and a key holding it *without*
    the prefix fails the test: the transport wrote outside its ``global_keyprefix``.
    """
    require_redis()
    import redis

    token = unique("faults")
    yield redis_url(), token
    client = redis.Redis.from_url(redis_url(REDIS_DB))
    try:
        ours = [key.decode() for key in client.scan_iter(match=f"*{token}*", count=1000)]
        if ours:
            client.delete(*ours)
    finally:
        client.close()
    escaped = sorted(key for key in ours if not key.startswith(f"{token}:"))
    assert not escaped, f"keys written outside global_keyprefix {token + ':'!r}: {escaped}"


def kill_clients(url: str, name: str) -> int:
    """CLIENT KILL every connection named ``name`` on the Redis at ``url``; how many."""
    import redis

    admin = redis.Redis.from_url(url)
    try:
        killed = 0
        for client in admin.client_list():
            if client.get("name") == name:
                killed += int(admin.client_kill_filter(_id=client["id"]))
        return killed
    finally:
        admin.close()


# -- private RabbitMQ ---------------------------------------------------------------------------


class RabbitNode:
    """A RabbitMQ node of this test module alone: own name, ports, database and Erlang cookie."""

    def __init__(self, base: Path) -> None:
        self.server = need_program(str(RABBITMQ_SCRIPTS / "rabbitmq-server"), "rabbitmq-server")
        self.ctl_program = need_program(str(RABBITMQ_SCRIPTS / "rabbitmqctl"), "rabbitmqctl")
        self.base = base
        self.node = f"celeriac-{uuid.uuid4().hex[:10]}@localhost"
        self.port = free_port()
        (base / "enabled_plugins").write_text("[].\n")
        # Our own config file and env file: the system ones name the system node and port 5672.
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            # The Erlang cookie is read from $HOME: a fresh one for this node and its rabbitmqctl.
            "HOME": str(base),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        }
        self._output = open(base / "server.out", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [self.server], env=self.env, stdout=self._output, stderr=subprocess.STDOUT
        )
        self.startup_seconds = wait_until(self._listening, 90, f"RabbitMQ node {self.node}", 0.1)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            output = (self.base / "server.out").read_text(errors="replace")
            raise AssertionError(f"rabbitmq-server exited ({self.proc.returncode}):\n{output}")
        return port_open(self.port)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            [self.ctl_program, "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def stop_app(self) -> None:
        """Stop the broker application: every connection closes, then the port."""
        self.ctl("stop_app")
        wait_until(lambda: not port_open(self.port), 10, "the AMQP port to close")

    def start_app(self) -> None:
        """Start it again: queues are recovered from disk, the port opens."""
        self.ctl("start_app")
        wait_until(self._listening, 30, "the AMQP port to open again")

    def close_connections(self) -> int:
        """Close every client connection (all of them are this module's own); how many."""
        listed = self.ctl("list_connections", "--silent", "name")
        count = sum(1 for line in listed.splitlines() if line.strip())
        self.ctl("close_all_connections", "fault test")
        return count

    def stop(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pid_file = self.base / "rabbitmq.pid"
            if pid_file.exists():  # the Erlang VM, a child of the script we started
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        self._output.close()


@pytest.fixture(scope="module")
def private_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    node = RabbitNode(tmp_path_factory.mktemp("rabbit"))
    print(
        f"\nprivate RabbitMQ node {node.node} on port {node.port} up in {node.startup_seconds:.1f}s"
    )
    yield node
    node.stop()


# -- worker processes ---------------------------------------------------------------------------


class WorkerProcess:
    """``celeriac -A faulttasks worker`` in a subprocess, its log in a file."""

    def __init__(self, workdir: Path, env: dict[str, str], args: Sequence[str], name: str) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celeriac", *args],
            cwd=workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if text in self.log():
                return True
            if not self.alive():
                raise AssertionError(
                    f"worker {self.name} exited ({self.proc.returncode}):\n{self.log()}"
                )
            return False

        wait_until(seen, timeout, f"{text!r} in the log of worker {self.name}")

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no give-back, leases left to run out."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


class Workers:
    """Starts worker processes for one test; all are stopped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[WorkerProcess] = []

    def start(
        self,
        *,
        broker: str,
        backend: str,
        queue: str,
        broker_options: dict[str, Any] | None = None,
        backend_options: dict[str, Any] | None = None,
        args: Sequence[str] = ("-c", "2"),
        count: int = 1,
    ) -> list[WorkerProcess]:
        """Start ``count`` workers consuming ``queue``; return once every one logged ``ready.``."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(APPS), os.environ.get("PYTHONPATH", "")]),
            "CELERIAC_BROKER_URL": broker,
            "CELERIAC_RESULT_BACKEND": backend,
            "FAULT_BROKER_OPTIONS": json.dumps(broker_options or {}),
            "FAULT_BACKEND_OPTIONS": json.dumps(backend_options or {}),
        }
        batch = []
        for _ in range(count):
            name = f"worker{len(self.started)}"
            command = ["-A", "faulttasks", "worker", "-l", "info", "-Q", queue, "-n", f"{name}@%h"]
            worker = WorkerProcess(self.workdir, env, [*command, *args], name)
            self.started.append(worker)
            batch.append(worker)
        for worker in batch:
            worker.wait_for("ready.")
        return batch

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.stop_all()


# -- the client side -----------------------------------------------------------------------------


class Client:
    """A celeriac app in the test process: sends tasks by name, reads results."""

    def __init__(
        self,
        *,
        broker: str,
        backend: str,
        broker_options: dict[str, Any] | None = None,
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        self.app = Celery(
            "faultclient",
            broker=broker,
            backend=backend,
            set_as_current=False,
            broker_transport_options=broker_options or {},
            result_backend_transport_options=backend_options or {},
        )
        #: Publishes that raised (the task was sent again under the same id).
        self.failed_publishes = 0

    def send(self, name: str, args: Sequence[Any], *, queue: str, task_id: str) -> None:
        self.app.send_task(name, list(args), queue=queue, task_id=task_id)

    def send_until_accepted(
        self, name: str, args: Sequence[Any], *, queue: str, task_id: str, patience: float = 30
    ) -> None:
        """Send; while the broker refuses, count the failure and send again (same id)."""
        deadline = time.monotonic() + patience
        while True:
            try:
                self.send(name, args, queue=queue, task_id=task_id)
                return
            except CeleriacError:
                self.failed_publishes += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def get(self, task_id: str, timeout: float) -> Any:
        return self.app.AsyncResult(task_id).get(timeout=timeout)

    def states(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The stored state of every task in ``task_ids`` (PENDING when none is stored)."""

        async def read() -> dict[str, str]:
            store = await self.app.aresult_store()
            found: dict[str, str] = {}
            for task_id in task_ids:
                meta = await store.get(task_id)
                found[task_id] = meta["status"]
            return found

        return self.app.run_sync(read())

    def queue_size(self, queue: str) -> int:
        async def size() -> int:
            broker = await self.app.abroker()
            return await broker.size(queue)

        return self.app.run_sync(size())

    def close(self) -> None:
        with contextlib.suppress(CeleriacError):  # a server already gone at teardown
            self.app.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """``clients(broker=..., backend=..., ...)``: a :class:`Client`, closed at teardown."""
    made: list[Client] = []

    def make(**kwargs: Any) -> Client:
        client = Client(**kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# -- the scenarios, shared by the Redis and the RabbitMQ tests -----------------------------------


@dataclass
class Setup:
    """Where one test's broker, result store, workers and records are."""

    broker: str
    backend: str
    token: str
    workdir: Path
    workers: Workers
    clients: Callable[..., Client]
    broker_options: dict[str, Any] = field(default_factory=dict)
    backend_options: dict[str, Any] = field(default_factory=dict)

    @property
    def queue(self) -> str:
        return f"{self.token}.q"

    @property
    def started(self) -> list[str]:
        """Tags of the ``slow`` tasks, once per start."""
        return lines(self.workdir / "started.log")

    @property
    def ran(self) -> list[str]:
        """Numbers of the ``double`` tasks, once per run."""
        return lines(self.workdir / "ran.log")

    def client(self) -> Client:
        return self.clients(
            broker=self.broker,
            backend=self.backend,
            broker_options=self.broker_options,
            backend_options=self.backend_options,
        )

    def start_workers(
        self,
        *,
        count: int = 1,
        args: Sequence[str] = ("-c", "2"),
        broker_extra: dict[str, Any] | None = None,
        backend_extra: dict[str, Any] | None = None,
    ) -> list[WorkerProcess]:
        return self.workers.start(
            broker=self.broker,
            backend=self.backend,
            queue=self.queue,
            broker_options={**self.broker_options, **(broker_extra or {})},
            backend_options={**self.backend_options, **(backend_extra or {})},
            args=args,
            count=count,
        )


def wait_for_results(client: Client, task_ids: Sequence[str], timeout: float) -> float:
    """Wait until every task of ``task_ids`` has a SUCCESS result; the seconds it took."""
    pending = set(task_ids)
    other: dict[str, str] = {}

    def all_done() -> bool:
        states = client.states(sorted(pending))
        for task_id, state in states.items():
            if state == "SUCCESS":
                pending.discard(task_id)
            elif state != "PENDING":
                other[task_id] = state
        assert not other, f"tasks ended in another state than SUCCESS: {other}"
        return not pending

    try:
        return wait_until(all_done, timeout, "results", interval=0.1)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: {len(pending)} of {len(task_ids)} tasks have no result, e.g. "
            f"{sorted(pending)[:5]}"
        ) from None


def settle(setup: Setup, client: Client, visibility: float) -> None:
    """Wait out one more lease, then until the queue is empty and no task starts any more.

    A delivery whose ack was lost (its connection died) stays leased; once the lease runs out it
    is given out again and runs a second time. Counting runs before that would miss it, and a
    queue that looks empty while such a lease is pending would hide a message left behind.
    """
    time.sleep(visibility + 0.5)

    def quiet() -> bool:
        before = (len(setup.started), len(setup.ran))
        time.sleep(0.3)
        after = (len(setup.started), len(setup.ran))
        return after == before and client.queue_size(setup.queue) == 0

    wait_until(quiet, 10 + visibility, "the queue to stay empty and no task to start")


def worker_troubles(worker: WorkerProcess) -> dict[str, float]:
    """How often the worker logged a failed fetch, an unfinished message, a failed renewal."""
    log = worker.log()
    return {
        "log_fetch_errors": float(log.count("Cannot fetch from the broker")),
        "log_unfinished": float(log.count("not finished")),
        "log_renew_errors": float(log.count("Could not renew")),
    }


def sigkill_mid_task(setup: Setup, visibility: float) -> dict[str, float]:
    """SIGKILL a worker running two tasks and holding six more; a second worker runs everything:
    each running task started exactly twice, each held one ran exactly once.

    The two running tasks wait for the file ``gate``, opened only after the kill: they are
    certainly running when the worker dies, however slow the machine.
    """
    client = setup.client()
    gated_ids = [f"{setup.token}-gated{i}" for i in range(2)]
    quick_ids = [f"{setup.token}-quick{i}" for i in range(6)]
    for i, task_id in enumerate(gated_ids):
        client.send("faulttasks.gated", [f"s{i}", "gate"], queue=setup.queue, task_id=task_id)
    for i, task_id in enumerate(quick_ids):
        client.send("faulttasks.double", [i], queue=setup.queue, task_id=task_id)
    lease = {"visibility_timeout": visibility}
    # -c 2, prefetch 2 x 4: both slots run the gated tasks, the quick ones are held, not started.
    [victim] = setup.start_workers(args=("-c", "2"), broker_extra=lease)
    wait_until(
        lambda: sorted(setup.started) == ["s0", "s1"] and client.queue_size(setup.queue) == 0,
        10,
        "both gated tasks to run and all 8 messages to be held",
    )
    victim.kill()
    killed = time.monotonic()
    (setup.workdir / "gate").touch()
    assert setup.ran == [], "the quick tasks ran although both slots were busy"
    states = client.states([*gated_ids, *quick_ids])
    assert set(states.values()) == {"PENDING"}, states
    setup.start_workers(args=("-c", "2"), broker_extra=lease)
    wait_for_results(client, [*gated_ids, *quick_ids], timeout=15 + 2 * visibility)
    recovered_at = time.monotonic()
    assert [client.get(task_id, timeout=1) for task_id in gated_ids] == ["s0", "s1"]
    assert [client.get(task_id, timeout=1) for task_id in quick_ids] == [0, 2, 4, 6, 8, 10]
    assert sorted(setup.started) == ["s0", "s0", "s1", "s1"]
    assert sorted(setup.ran, key=int) == [str(i) for i in range(6)]
    # A lost ack would show as one more delivery once another lease has run out.
    settle(setup, client, visibility)
    assert sorted(setup.started) == ["s0", "s0", "s1", "s1"]
    assert len(setup.ran) == 6
    return {"kill_to_all_results_s": recovered_at - killed}


def long_task_runs_once(setup: Setup, visibility: float, seconds: float) -> None:
    """A task ``seconds`` long, ``visibility`` lease, a second idle worker on the same queue: the
    task starts once, because its worker renews the lease while it runs."""
    client = setup.client()
    lease = {"visibility_timeout": visibility}
    pair = setup.start_workers(count=2, args=("-c", "2"), broker_extra=lease)
    task_id = f"{setup.token}-long"
    client.send("faulttasks.slow", ["long", seconds], queue=setup.queue, task_id=task_id)
    assert client.get(task_id, timeout=seconds + 15) == "long"
    assert setup.started == ["long"]
    # No late second delivery either, once a lease more has passed.
    settle(setup, client, visibility)
    assert setup.started == ["long"]
    # Read after the wait: INFO lines reach the log in batches, up to 50 ms late.
    ran_on = [w.name for w in pair if f"faulttasks.slow[{task_id}] succeeded" in w.log()]
    assert len(ran_on) == 1, ran_on


def broker_restart_during_run(
    setup: Setup,
    stop: Callable[[], None],
    start: Callable[[], None],
    *,
    total: int = 1000,
    restart_at: int = 400,
    down_for: float = 0.5,
    visibility: float = 2.0,
) -> dict[str, float]:
    """Publish ``total`` tasks while one worker runs them; stop the broker once ``restart_at``
    were published, keep publishing through the outage (each publish retried until it returns),
    start the broker again. Every publish that returned must end in a result, run by the same
    worker process, which reconnects by itself.

    The publisher waits for the broker to be down before it goes on, so the outage always falls
    in the middle of the publishing; the tasks take a few milliseconds each, so the worker has a
    backlog (running and prefetched tasks) when the broker goes away.
    """
    [worker] = setup.start_workers(
        args=("-c", "4"), broker_extra={"visibility_timeout": visibility}
    )
    client = setup.client()
    ids = [f"{setup.token}-{i}" for i in range(total)]
    published: list[str] = []
    errors: list[BaseException] = []
    reached, down = threading.Event(), threading.Event()

    def publish() -> None:
        try:
            for number, task_id in enumerate(ids):
                if number == restart_at:
                    reached.set()
                    down.wait(timeout=30)
                client.send_until_accepted(
                    "faulttasks.double", [number, 0.004], queue=setup.queue, task_id=task_id
                )
                published.append(task_id)
        except BaseException as exc:
            errors.append(exc)
            reached.set()

    began = time.monotonic()
    publisher = threading.Thread(target=publish, name="fault-publisher")
    publisher.start()
    assert reached.wait(timeout=60), "the first publishes did not finish within 60s"
    assert not errors, f"publishing raised before the restart: {errors[0]!r}"
    ran_before = len(setup.ran)
    stopping = time.monotonic()
    stop()
    stopped = time.monotonic()
    down.set()
    time.sleep(down_for)
    starting = time.monotonic()
    start()
    up = time.monotonic()
    publisher.join(timeout=60)
    assert not publisher.is_alive(), "publishing did not finish within 60s of the restart"
    assert not errors, f"publishing raised: {errors[0]!r}"
    published_at = time.monotonic()
    assert len(published) == total
    wait_for_results(client, published, timeout=60)
    finished = time.monotonic()
    settle(setup, client, visibility)
    assert worker.alive(), f"the worker died:\n{worker.log()}"
    ran = setup.ran
    assert set(ran) == {str(i) for i in range(total)}
    return {
        "runs_before_stop": float(ran_before),
        "stop_s": stopped - stopping,
        "down_s": up - stopped,
        "start_s": up - starting,
        "failed_publish_calls": float(client.failed_publishes),
        "publish_run_s": published_at - began,
        "broker_up_to_last_result_s": finished - up,
        "total_s": finished - began,
        "duplicate_runs": float(len(ran) - total),
        **worker_troubles(worker),
    }


def connections_killed_mid_run(
    setup: Setup,
    kill: Callable[[], int],
    *,
    broker_extra: dict[str, Any] | None = None,
    backend_extra: dict[str, Any] | None = None,
    visibility: float = 2.0,
) -> dict[str, float]:
    """Kill the worker's connections twice while it runs two tasks and holds six more, then send
    20 more tasks: the same worker process completes all 60.

    The first 20 tasks wait for the file ``gate1``, the next 20 for ``gate2``: each kill happens
    while both slots are busy with tasks that cannot finish yet, however long the kill takes.
    """
    client = setup.client()
    [worker] = setup.start_workers(
        args=("-c", "2"),
        broker_extra={"visibility_timeout": visibility, **(broker_extra or {})},
        backend_extra=backend_extra,
    )
    gated = 40
    gated_ids = [f"{setup.token}-g{i}" for i in range(gated)]
    for i, task_id in enumerate(gated_ids):
        gate = "gate1" if i < gated // 2 else "gate2"
        client.send("faulttasks.gated", [f"t{i}", gate], queue=setup.queue, task_id=task_id)
    began = time.monotonic()
    # Both slots blocked on gate1, six more prefetched (2 x prefetch 4 = 8 held, 32 waiting).
    wait_until(
        lambda: sorted(setup.started) == ["t0", "t1"] and client.queue_size(setup.queue) <= 32,
        15,
        "t0 and t1 to run and 8 messages to be held",
    )
    first = kill()
    (setup.workdir / "gate1").touch()
    # Both slots blocked on gate2: every gate1 task has run (FIFO), the worker holds more.
    wait_until(lambda: {"t20", "t21"} <= set(setup.started), 15 + visibility, "t20 and t21")
    second = kill()
    assert first >= 1 and second >= 1, (first, second)
    (setup.workdir / "gate2").touch()
    quick_ids = [f"{setup.token}-d{i}" for i in range(20)]
    for i, task_id in enumerate(quick_ids):
        client.send_until_accepted("faulttasks.double", [i], queue=setup.queue, task_id=task_id)
    wait_for_results(client, [*gated_ids, *quick_ids], timeout=30)
    finished = time.monotonic()
    settle(setup, client, visibility)
    assert worker.alive(), f"the worker died:\n{worker.log()}"
    assert [client.get(task_id, timeout=1) for task_id in gated_ids] == [
        f"t{i}" for i in range(gated)
    ]
    assert set(setup.started) == {f"t{i}" for i in range(gated)}
    assert set(setup.ran) == {str(i) for i in range(20)}
    duplicates = len(setup.started) - gated + len(setup.ran) - 20
    # At-least-once: only the tasks running at a kill (2 slots x 2 kills) may run twice; a held
    # message the broker took back with the connection is not started again.
    assert duplicates <= 4, duplicates
    return {
        "connections_killed": float(first + second),
        "total_s": finished - began,
        "duplicate_runs": float(duplicates),
        **worker_troubles(worker),
    }
