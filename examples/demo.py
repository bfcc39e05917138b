"""Quick-start demo: start a worker, send tasks, print results, stop the worker.

Everything runs on the embedded SQLite default, in a fresh temporary directory, so nothing but
Python is needed. Run it with ``bash scripts/demo.sh`` (or ``python examples/demo.py`` in an
environment where celeriac is installed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent


def main() -> int:
    workdir = tempfile.mkdtemp(prefix="celeriac-demo-")
    os.chdir(workdir)
    sys.path.insert(0, str(EXAMPLES))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "celeriac",
        "-A",
        "tasks",
        "worker",
        "-Q",
        "celery",
        "--loglevel=info",
    ]
    print(f"$ {' '.join(command[2:])}    (in {workdir})")
    # The worker logs to a file: a pipe nobody reads while tasks run would fill up and block it.
    log_path = Path(workdir) / "worker.log"
    log_file = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(command, env=env, stderr=log_file, stdout=log_file)
    try:
        from tasks import add, divide, fetch_greeting, whoami

        started = time.perf_counter()
        result = add.delay(30, 42)
        print(f"add.delay(30, 42).get(timeout=10) -> {result.get(timeout=10)}")
        print(
            f"  (sent to result in {time.perf_counter() - started:.2f}s, worker start-up overlapping)"
        )
        print(
            f"fetch_greeting.delay('world') (async def) -> {fetch_greeting.delay('world').get(timeout=10)!r}"
        )
        info = whoami.delay().get(timeout=10)
        print(f"whoami.delay() (bind=True) -> ran as {info['id']} on {info['worker']}")
        try:
            divide.delay(1, 0).get(timeout=10)
        except ZeroDivisionError as exc:
            print(f"divide.delay(1, 0) -> raised {exc!r} in the caller")
        later = add.apply_async((1, 1), countdown=1)
        print(
            f"add.apply_async((1, 1), countdown=1) -> {later.get(timeout=10)} (state {later.state})"
        )

        count = 1000
        started = time.perf_counter()
        results = [add.delay(i, i) for i in range(count)]
        sent = time.perf_counter() - started
        total = sum(r.get(timeout=60) for r in results)
        elapsed = time.perf_counter() - started
        print(
            f"{count} x add.delay(i, i): sum {total}, sent in {sent:.2f}s, all done in {elapsed:.2f}s "
            f"({count / elapsed:.0f} tasks/s end to end)"
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log_file.close()
    lines = log_path.read_text(encoding="utf-8").splitlines()
    print(
        f"worker stopped with exit status {worker.returncode}; a few of its {len(lines)} log lines:"
    )
    for line in [*lines[:19], "  ...", *lines[-3:]]:
        print(f"  | {line}")
    return 0 if worker.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
