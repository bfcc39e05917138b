"""The command line, and the new user's first steps exactly as the README tells them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from celeriac import __version__

from .conftest import WorkerProcess

pytestmark = pytest.mark.e2e

TASKS_PY = textwrap.dedent(
    """
    import asyncio
    from celeriac import Celery
    app = Celery("tasks")          # no broker or backend given: the embedded SQLite default

    @app.task
    def add(x, y):
        return x + y

    @app.task
    async def slow_add(x, y):
        await asyncio.sleep(0.05)
        return x + y
    """
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERIAC_")}
    env.update(extra)
    return env


def _run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_new_user_add_30_42_on_the_embedded_default(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(TASKS_PY)
    env = _clean_env()
    worker = WorkerProcess(
        tmp_path, env, ["-A", "tasks", "worker", "-Q", "celery", "--loglevel=info"], "w"
    )
    try:
        worker.wait_for("ready.")
        client = _run(
            [
                "-c",
                "from tasks import add, slow_add\n"
                "print(add.delay(30, 42).get(timeout=10))\n"
                "print(slow_add.delay(30, 42).get(timeout=10))",
            ],
            tmp_path,
            env,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == ["72", "72"]
    finally:
        assert worker.stop() == 0
    assert (tmp_path / "celeriac-broker.sqlite3").exists()
    assert (tmp_path / "celeriac-results.sqlite3").exists()
    log = worker.log()
    assert "Task tasks.add[" in log and "succeeded in" in log and ": 72" in log


def test_call_result_and_purge(tmp_path: Path, start_worker: Any) -> None:
    env = _clean_env(
        CELERIAC_BROKER_URL=os.environ["CELERIAC_BROKER_URL"],
        CELERIAC_RESULT_BACKEND=os.environ["CELERIAC_RESULT_BACKEND"],
        PYTHONPATH=str(Path(__file__).parent / "apps"),
    )
    purge_first = _run(
        ["-m", "celeriac", "-A", "e2etasks", "call", "e2etasks.add", "--args", "[1, 2]"],
        tmp_path,
        env,
    )
    assert purge_first.returncode == 0, purge_first.stderr
    purged = _run(["-m", "celeriac", "-A", "e2etasks", "purge", "-f"], tmp_path, env)
    assert purged.stdout.strip() == "Purged 1 message from celery."
    start_worker()
    sent = _run(
        ["-m", "celeriac", "-A", "e2etasks", "call", "e2etasks.add", "--args", "[30, 42]"],
        tmp_path,
        env,
    )
    task_id = sent.stdout.strip()
    assert len(task_id) == 36, sent.stderr
    got = _run(
        ["-m", "celeriac", "-A", "e2etasks", "result", task_id, "--timeout", "10"], tmp_path, env
    )
    assert got.returncode == 0 and got.stdout.strip() == "72", got.stderr
    failing = _run(
        ["-m", "celeriac", "-A", "e2etasks", "call", "e2etasks.fail", "-a", '["nope"]'],
        tmp_path,
        env,
    )
    err = _run(
        ["-m", "celeriac", "-A", "e2etasks", "result", failing.stdout.strip(), "--timeout", "10"],
        tmp_path,
        env,
    )
    assert err.returncode == 1 and "FAILURE: ValueError: nope" in err.stderr
    bad_json = _run(
        ["-m", "celeriac", "-A", "e2etasks", "call", "e2etasks.add", "--args", "[1,"], tmp_path, env
    )
    assert bad_json.returncode == 2 and "--args must be JSON" in bad_json.stderr


def test_wrong_app_is_one_clear_line(tmp_path: Path) -> None:
    env = _clean_env()
    missing = _run(["-m", "celeriac", "-A", "no_such_module", "worker"], tmp_path, env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "Error: Unable to load the celeriac app: The module 'no_such_module' was not found."
    )
    (tmp_path / "notanapp.py").write_text("x = 1\n")
    noapp = _run(["-m", "celeriac", "-A", "notanapp", "worker"], tmp_path, env)
    assert "No celeriac app found in module 'notanapp'" in noapp.stderr
    assert "Traceback" not in noapp.stderr
    (tmp_path / "broken.py").write_text("import does_not_exist_either\n")
    broken = _run(["-m", "celeriac", "-A", "broken", "worker"], tmp_path, env)
    assert "Importing 'broken' failed" in broken.stderr and "Traceback" not in broken.stderr


def test_version_and_module_entry_point(tmp_path: Path) -> None:
    out = _run(["-m", "celeriac", "--version"], tmp_path, _clean_env())
    assert out.returncode == 0 and __version__ in out.stdout


def test_worker_refuses_unknown_pool(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(TASKS_PY)
    out = _run(["-m", "celeriac", "-A", "tasks", "worker", "-P", "gevent"], tmp_path, _clean_env())
    assert out.returncode == 1 and "pool 'gevent' is not available" in out.stderr
