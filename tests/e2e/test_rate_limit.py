"""Rate limits in real worker processes: per worker as Celery's, and across the cluster.

Each task returns the time it started and its process id. Per worker, one worker must space the
starts of a limited task while an unlimited task sent after them runs at once. Cluster-wide, two
worker processes together must stay within the limit (which per-worker limits would let through
twice over), on the embedded SQLite broker and on Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ratetasks

from tests.services import redis_url, require_redis, unique

pytestmark = pytest.mark.e2e

RATE = 10.0


@pytest.fixture
def client(workdir: Path) -> Iterator[Path]:
    """The test's directory; the client's connections are closed afterwards."""
    yield workdir
    ratetasks.app.close()


def most_in_one_second(starts: list[float]) -> int:
    """The largest number of starts in any window of one second."""
    starts = sorted(starts)
    return max(sum(1 for t in starts[i:] if t < start + 1.0) for i, start in enumerate(starts))


def test_per_worker_limit_spaces_starts_and_other_tasks_do_not_wait(
    start_worker: Any, client: Path
) -> None:
    worker = start_worker("-c", "2", app="ratetasks")
    assert "Rate limit of ratetasks.per_worker: 10/s per worker" in worker.log()
    sent = time.time()
    limited = [ratetasks.per_worker.delay() for _ in range(30)]
    unlimited = ratetasks.unlimited.delay()
    unlimited_started = unlimited.get(timeout=10)
    starts = sorted(start for start, _ in (r.get(timeout=20) for r in limited))
    # 30 starts at 10/s: the first at once, then one every 0.1 s.
    assert starts[-1] - starts[0] >= 2.85
    assert most_in_one_second(starts) <= RATE + 1
    # The unlimited task was not queued behind them: it ran while most of them still waited.
    assert unlimited_started - sent < 1.0
    assert sum(1 for start in starts if start > unlimited_started) >= 20


def _cluster_run(start_worker: Any) -> list[tuple[float, int]]:
    first = start_worker("-c", "2", app="ratetasks")
    start_worker("-c", "2", app="ratetasks")
    assert "Rate limit of ratetasks.cluster_wide: 10/s for all workers together" in first.log()
    results = [ratetasks.cluster_wide.delay() for _ in range(40)]
    return [tuple(r.get(timeout=30)) for r in results]  # type: ignore[misc]


def _check_cluster(runs: list[tuple[float, int]]) -> None:
    starts = sorted(start for start, _ in runs)
    # Both processes ran some, and together they kept to 10/s (+ the burst of one): per-worker
    # limits alone would have let 20 a second through.
    assert len({pid for _, pid in runs}) == 2
    assert most_in_one_second(starts) <= RATE + 1
    assert starts[-1] - starts[0] >= 3.5


def test_cluster_limit_holds_across_two_workers_on_sqlite(start_worker: Any, client: Path) -> None:
    runs = _cluster_run(start_worker)
    _check_cluster(runs)
    import sqlite3

    with sqlite3.connect(client / "broker.sqlite3") as conn:
        keys = [key for (key,) in conn.execute("SELECT key FROM rate_limits")]
    assert keys == ["ratetasks.cluster_wide"]


def test_cluster_limit_holds_across_two_workers_on_redis(
    start_worker: Any, client: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_redis()
    import redis

    prefix = unique("rate") + ":"
    monkeypatch.setenv("CELERIAC_BROKER_URL", redis_url())
    monkeypatch.setenv("RATE_E2E_PREFIX", prefix)
    ratetasks.app.conf.broker_transport_options = {"global_keyprefix": prefix}
    server = redis.Redis.from_url(redis_url())
    try:
        runs = _cluster_run(start_worker)
        _check_cluster(runs)
        key = f"{prefix}_celeriac.rate_limit.ratetasks.cluster_wide"
        assert server.exists(key)
        assert 0 < server.pttl(key) <= 2000  # expires about a second after its last grant
    finally:
        ratetasks.app.conf.broker_transport_options = {}
        keys = list(server.scan_iter(match=f"{prefix}*"))
        if keys:
            server.delete(*keys)
        server.close()
