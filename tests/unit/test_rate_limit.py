"""Rate limits: Celery's rate strings, the grant rule, clear errors, and limits in a real worker.

The worker tests run the production worker in a thread (``start_worker``) on ``memory://``; each
task returns when it started, so the tests check the starts against the limit. Stores are tested
in ``test_rate_limit_stores.py``; two worker processes in ``tests/e2e/test_rate_limit.py``.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celery
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import ImproperlyConfigured, UnknownOptionError
from celeriac.utils.rates import check_scope, gcra, parse_rate
from celeriac.worker.ratelimit import RateLimits
from tests.services import amqp_url, require_rabbitmq, unique


def make_app(**settings: Any) -> Celery:
    name = uuid.uuid4().hex
    return Celery(
        "ratelimits",
        broker=f"memory://{name}",
        backend=f"memory://{name}",
        set_as_current=False,
        **settings,
    )


def spread(starts: list[float]) -> float:
    return max(starts) - min(starts)


# -- Celery's rate strings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "per_second"),
    [
        (None, None),
        ("", None),
        (0, None),
        ("0/m", None),
        (10, 10.0),
        (2.5, 2.5),
        ("10", 10.0),
        ("10/s", 10.0),
        ("120/m", 2.0),
        ("7200/h", 2.0),
        ("0.5/s", 0.5),
        (" 30 / m ", 0.5),
        ("1e2/s", 100.0),
    ],
)
def test_rates_read_as_celery_reads_them(value: Any, per_second: float | None) -> None:
    assert parse_rate(value, "rate_limit") == per_second


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10/d", "unknown unit 'd'"),
        ("10/min", "unknown unit 'min'"),
        ("10/", "unknown unit ''"),
        ("ten/s", "must be a number of tasks per second, or a string 'N/s'"),
        ("/s", "must be a number"),
        ("-1/s", "must be finite and not negative"),
        (-3, "must be finite and not negative"),
        ("inf/s", "must be finite and not negative"),
        ("nan", "must be finite and not negative"),
        (True, "not True"),
        ([10, "s"], "not [10, 's']"),
    ],
)
def test_bad_rates_are_clear_errors(value: Any, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="rate_limit of task t") as info:
        parse_rate(value, "rate_limit of task t")
    assert message in str(info.value)


def test_scopes() -> None:
    assert check_scope("worker", "s") == "worker"
    assert check_scope("cluster", "s") == "cluster"
    with pytest.raises(ImproperlyConfigured, match=r"'worker' .* or 'cluster'"):
        check_scope("global", "s")


# -- the grant rule --------------------------------------------------------------------------------


def test_gcra_with_burst_one_is_celerys_bucket() -> None:
    # The first grant is immediate (kombu's bucket starts full), the next ones an interval apart.
    tat, wait = gcra(None, 100.0, 0.1, 1)
    assert (tat, wait) == (pytest.approx(100.1), 0.0)
    refused, wait = gcra(tat, 100.04, 0.1, 1)
    assert refused is None and wait == pytest.approx(0.06)
    tat, wait = gcra(tat, 100.1, 0.1, 1)
    assert (tat, wait) == (pytest.approx(100.2), 0.0)
    # After a pause no credit builds up beyond the burst.
    tat, _ = gcra(tat, 500.0, 0.1, 1)
    assert gcra(tat, 500.0, 0.1, 1)[0] is None


def test_gcra_burst_and_a_clock_that_went_back() -> None:
    tat = None
    granted = 0
    for _ in range(5):
        new, wait = gcra(tat, 10.0, 1.0, 3)
        if new is None:
            break
        tat, granted = new, granted + 1
    assert granted == 3
    # A stored time far ahead of the clock (the clock stepped back an hour) costs one burst at
    # most, not the hour.
    _, wait = gcra(3600.0, 0.0, 1.0, 1)
    assert wait == pytest.approx(1.0)


# -- declaring limits -------------------------------------------------------------------------------


def test_bad_rate_limit_is_an_error_when_the_task_is_declared() -> None:
    app = make_app()
    with pytest.raises(ImproperlyConfigured, match=r"rate_limit of task .*: unknown unit 'x'"):

        @app.task(rate_limit="10/x")
        def bad() -> None: ...

    with pytest.raises(ImproperlyConfigured, match=r"rate_limit_scope of task .* 'everywhere'"):

        @app.task(rate_limit="10/s", rate_limit_scope="everywhere")
        def wide() -> None: ...

    with pytest.raises(UnknownOptionError, match="rate_limit"):

        @app.task(ratelimit="10/s")
        def typo() -> None: ...


def test_settings_are_checked_and_are_the_defaults() -> None:
    app = make_app()
    with pytest.raises(ImproperlyConfigured, match="task_default_rate_limit: unknown unit 'y'"):
        app.conf.task_default_rate_limit = "5/y"
    with pytest.raises(ImproperlyConfigured, match="task_default_rate_limit_scope must be"):
        app.conf.task_default_rate_limit_scope = "planet"
    with pytest.raises(ImproperlyConfigured, match="worker_disable_rate_limits must be True"):
        app.conf.worker_disable_rate_limits = "yes"
    app.conf.update(task_default_rate_limit="30/m", task_default_rate_limit_scope="cluster")

    @app.task
    def plain() -> None: ...

    @app.task(rate_limit=0)
    def unlimited() -> None: ...

    @app.task(rate_limit=4, rate_limit_scope="worker")
    def own() -> None: ...

    assert (plain.resolved_rate_limit(), plain.resolved_rate_limit_scope()) == (0.5, "cluster")
    assert unlimited.resolved_rate_limit() is None  # Celery's way to opt out of the default
    assert (own.resolved_rate_limit(), own.resolved_rate_limit_scope()) == (4.0, "worker")


# -- in a worker ----------------------------------------------------------------------------------


def test_limited_messages_wait_without_blocking_other_tasks() -> None:
    app = make_app()

    @app.task(rate_limit="20/s")
    def limited() -> float:
        return time.time()

    @app.task
    def other() -> float:
        return time.time()

    with start_worker(app, concurrency=2):
        sent = time.time()
        results = [limited.delay() for _ in range(12)]
        quick = other.delay().get(timeout=5)
        starts = sorted(r.get(timeout=10) for r in results)
    assert spread(starts) >= 11 * 0.05 * 0.95
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.04
    assert quick - sent < 0.3
    assert sum(1 for start in starts if start > quick) >= 8


def test_long_waits_are_spent_in_the_broker_and_leases_are_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Leases of 0.3 s: a message waiting in memory for up to a second must be renewed, and the
    # waits beyond the bound go back to the broker; every task still runs exactly once.
    app = make_app(broker_transport_options={"visibility_timeout": 0.3})
    runs: Counter[int] = Counter()
    lock = threading.Lock()

    @app.task(rate_limit="8/s")
    def limited(i: int) -> float:
        with lock:
            runs[i] += 1
        return time.time()

    caplog.set_level(logging.DEBUG, logger="celeriac.worker")
    with start_worker(app, concurrency=1):
        results = [limited.delay(i) for i in range(10)]
        starts = sorted(r.get(timeout=10) for r in results)
    assert spread(starts) >= 9 * 0.125 * 0.95
    assert runs == Counter(range(10))
    assert "rate limited (8/s): waits" in caplog.text


def test_cluster_limit_is_shared_by_workers_of_one_memory_broker() -> None:
    app = make_app()

    @app.task(rate_limit="20/s", rate_limit_scope="cluster")
    def shared() -> tuple[float, str]:
        return time.time(), threading.current_thread().name

    with start_worker(app, concurrency=2), start_worker(app, concurrency=2):
        results = [shared.delay() for _ in range(12)]
        starts = sorted(start for start, _ in (r.get(timeout=10) for r in results))
    # Two workers with per-worker limits would take about half as long.
    assert spread(starts) >= 11 * 0.05 * 0.95


def test_disabled_rate_limits_are_not_applied(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(worker_disable_rate_limits=True)

    @app.task(rate_limit="1/s")
    def slow_if_limited() -> float:
        return time.time()

    with caplog.at_level(logging.INFO, logger="celeriac.worker"), start_worker(app):
        starts = [r.get(timeout=5) for r in [slow_if_limited.delay() for _ in range(5)]]
    assert spread(starts) < 1.0
    assert "worker_disable_rate_limits is set: not applying the rate limits of" in caplog.text
    assert f"{__name__}.slow_if_limited (1/s)" in caplog.text


def test_start_log_says_which_tasks_are_limited_and_how(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    app = Celery(
        "ratelimits",
        broker="amqp://guest:secret@127.0.0.1:1/",
        backend=f"sqlite:///{tmp_path}/results.sqlite3",
        set_as_current=False,
    )

    @app.task(rate_limit="10/m")
    def mailer() -> None: ...

    @app.task(rate_limit=100, rate_limit_scope="cluster")
    def api_call() -> None: ...

    @app.task
    def free() -> None: ...

    caplog.set_level(logging.INFO, logger="celeriac.worker")
    limits = RateLimits.for_worker(app, app.create_broker(), app.create_result_store(), 8)
    assert limits is not None
    lines = [r.getMessage() for r in caplog.records]
    # RabbitMQ keeps no counters: the cluster-wide limit is kept in the result store.
    assert lines == [
        f"Rate limit of {__name__}.api_call: 100/s for all workers together (one start every "
        f"0.01s), kept in the SQLite result store {tmp_path}/results.sqlite3.",
        f"Rate limit of {__name__}.mailer: 10/m per worker (one start every 6s).",
    ]
    assert RateLimits.for_worker(make_app(), *_unconnected(make_app()), 8) is None


def _unconnected(app: Celery) -> tuple[Any, Any]:
    return app.create_broker(), app.create_result_store()


def test_cluster_limit_without_a_shared_store_refuses_to_start() -> None:
    app = Celery(
        "ratelimits",
        broker="amqp://guest:secret@127.0.0.1:1/",
        backend="rpc://",
        set_as_current=False,
    )

    @app.task(rate_limit="5/s", rate_limit_scope="cluster")
    def api_call() -> None: ...

    with pytest.raises(ImproperlyConfigured) as info, start_worker(app, ready_timeout=5):
        pass
    message = str(info.value)
    assert f"cluster-wide rate limits ({__name__}.api_call) need a store" in message
    assert "Use a Redis or SQLite result_backend" in message
    assert "secret" not in message


def test_on_rabbitmq_cluster_limits_are_kept_in_the_result_store(tmp_path: Path) -> None:
    require_rabbitmq()
    import kombu

    queue = unique("celeriac-rl-")
    app = Celery(
        "ratelimits",
        broker=amqp_url(),
        backend=f"sqlite:///{tmp_path}/results.sqlite3",
        task_default_queue=queue,
        set_as_current=False,
    )

    @app.task(rate_limit="20/s", rate_limit_scope="cluster")
    def api_call() -> float:
        return time.time()

    try:
        with start_worker(app, concurrency=2, queues=[queue]):
            starts = [r.get(timeout=10) for r in [api_call.delay() for _ in range(6)]]
        app.close()
        assert spread(starts) >= 5 * 0.05 * 0.95
        with sqlite3.connect(tmp_path / "results.sqlite3") as conn:
            keys = [key for (key,) in conn.execute("SELECT key FROM rate_limits")]
        assert keys == [api_call.name]
    finally:
        with kombu.Connection(amqp_url()) as connection:
            connection.default_channel.queue_delete(queue)
