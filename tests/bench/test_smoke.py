"""The side-by-side benchmark keeps working: a ``--quick`` run on SQLite and Redis, end to end.

This runs ``python -m benchmarks --quick`` as a user would (real celeriac and Celery workers, real
SQLite and Redis) with tiny counts, and checks the printed table and the JSON document: every
scenario has its rows, every figure that must be there is a positive number. The figures themselves
are not checked: the full benchmark is run by hand, on a quiet machine, never in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import services

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

#: (metric, broker) of every row a quick run on SQLite and Redis prints, scenario by scenario.
EXPECTED = [
    (metric, broker)
    for metrics in (
        ["drain"],
        ["delay", "group"],
        ["roundtrip_p50", "roundtrip_p99"],
        ["io_share", "io_rss"],
        ["idle_rss", "rss_growth"],
    )
    for broker in ("sqlite", "redis")
    for metric in metrics
]
#: Rows whose figure is a rate, a latency or a size: positive for both projects.
POSITIVE = {
    "drain",
    "delay",
    "group",
    "roundtrip_p50",
    "roundtrip_p99",
    "io_share",
    "io_rss",
    "idle_rss",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    services.require_redis()
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {**os.environ, "BENCH_REDIS_URL": services.redis_url()}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--brokers",
            "sqlite,redis",
            "--json",
            str(out),
        ],
        check=False,  # the exit code is asserted with the output, below
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, json.loads(out.read_text(encoding="utf-8"))


def _group_missing(row: dict[str, Any]) -> bool:
    """celeriac's group() may not exist yet: then its figure is N/A, and the note says why."""
    return row["metric"] == "group" and any("no group()" in note for note in row["notes"])


def test_every_scenario_has_its_rows_in_order(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, document = quick_run
    assert [(row["metric"], row["broker"]) for row in document["rows"]] == EXPECTED


def test_figures_are_positive_where_both_projects_run(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    _, document = quick_run
    for row in document["rows"]:
        name = (row["metric"], row["broker"])
        if not _group_missing(row):
            assert isinstance(row["celeriac"], float), name
        if row["metric"] in POSITIVE and row["celeriac"] is not None:
            assert row["celeriac"] > 0, name
        if row["broker"] == "sqlite":
            # Celery has no SQLite broker: no figure, and the note says so.
            assert row["celery"] is None, name
        else:
            assert isinstance(row["celery"], float), name
            if row["metric"] in POSITIVE:
                assert row["celery"] > 0, name
        if row["metric"] in POSITIVE and row["celeriac"] is not None and row["celery"] is not None:
            assert row["ratio"] > 0, name
        assert row["target"] is None or row["passed"] in (True, False), name


def test_json_records_the_machine_and_the_options(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, document = quick_run
    machine = document["machine"]
    for key in ("date", "cpu", "cores", "ram_gib", "python", "celeriac", "celery", "kombu"):
        assert machine[key], key
    assert set(machine["servers"]) == {"sqlite", "redis"}
    assert machine["servers"]["redis"][0].isdigit()
    assert document["options"]["quick"] is True
    assert document["options"]["brokers"] == ["sqlite", "redis"]


def test_the_table_is_printed(quick_run: tuple[str, dict[str, Any]]) -> None:
    stdout, document = quick_run
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:6] == ["scenario", "broker", "unit", "celeriac", "Celery (best pool)", "ratio"]
    assert set(lines[1]) <= {"|", "-"}
    assert len(lines) == 2 + len(document["rows"])
    assert "Celery has no sqlite broker" in stdout
