"""Tasks of the process pool and time limit tests: CPU loops, soft-limit handlers, dying bodies.

Used by real worker processes (``celeriac -A limittasks worker -P prefork``, SQLite from
CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND) and by workers embedded in the test process. With
LIMITTASKS_LOG set, ``worker_process_init`` and the task signals append a line (signal, pid, task)
to that file: the pool processes inherit the variable, so the file shows where each was sent.
LIMITTASKS_FAIL_IMPORT and LIMITTASKS_EXIT_IN_INIT make a pool process fail as it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from typing import Any

from celeriac import Celery
from celeriac.exceptions import SoftTimeLimitExceeded
from celeriac.signals import task_postrun, task_prerun, worker_process_init

if os.environ.get("LIMITTASKS_FAIL_IMPORT"):
    raise RuntimeError("limittasks refuses to load in this process")

app = Celery("limittasks")

#: Set by ``spin_until_cancelled`` when the thread running it sees the cancellation (threads pool).
cancelled_in_thread = threading.Event()


def _log(*values: object) -> None:
    path = os.environ.get("LIMITTASKS_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(" ".join(str(v) for v in values) + "\n")


@worker_process_init.connect
def _on_process_init(sender: Any = None, **kwargs: Any) -> None:
    _log("worker_process_init", os.getpid(), sender)
    if os.environ.get("LIMITTASKS_EXIT_IN_INIT"):
        os._exit(5)


@task_prerun.connect
def _on_prerun(sender: Any = None, task_id: Any = None, **kwargs: Any) -> None:
    if getattr(sender, "app", None) is app:
        _log("task_prerun", os.getpid(), task_id)


@task_postrun.connect
def _on_postrun(sender: Any = None, task_id: Any = None, state: Any = None, **kwargs: Any) -> None:
    if getattr(sender, "app", None) is app:
        _log("task_postrun", os.getpid(), task_id, state)


@app.task
def pid() -> int:
    return os.getpid()


@app.task
def spin() -> None:
    while True:
        pass


@app.task
def catch_soft(value: Any) -> Any:
    """Loop until the soft limit, then return ``value``: the caller sees it."""
    try:
        while True:
            pass
    except SoftTimeLimitExceeded:
        return value


@app.task
def sleep_catch_soft(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit"
    return "slept"


@app.task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(time_limit=0.5)
def spin_task_limit() -> None:
    while True:
        pass


@app.task(soft_time_limit=0.3)
def catch_soft_task_limit() -> str:
    try:
        while True:
            pass
    except SoftTimeLimitExceeded:
        return "task soft limit"


@app.task
def exit_now(code: int) -> None:
    os._exit(code)


@app.task
def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
def write_pid_then_sleep(path: str, seconds: float) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))
    time.sleep(seconds)


@app.task
def spin_until_cancelled() -> None:
    try:
        while True:
            pass
    except asyncio.CancelledError:
        cancelled_in_thread.set()
        raise


@app.task
def grow(megabytes: int) -> int:
    """Touch ``megabytes`` MiB, so the pool process's resident memory really grows."""
    data = bytearray(megabytes * 1024 * 1024)
    for offset in range(0, len(data), 4096):
        data[offset] = 1
    return os.getpid()


@app.task
def peak_kib() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class NeedsTwo(Exception):
    """Pickles, but does not unpickle: its __init__ takes other arguments than its args."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")


@app.task
def raise_needs_two() -> None:
    raise NeedsTwo(7, "seven")


@app.task
def return_lock() -> Any:
    return threading.Lock()


@app.task
async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.task
async def async_catch_soft(value: Any) -> Any:
    try:
        await asyncio.sleep(30)
    except SoftTimeLimitExceeded:
        return value
    return None


@app.task
async def async_group_under_soft_limit() -> None:
    """Soft limit while waiting for a TaskGroup: its tasks must be cancelled, not left behind."""

    async def child() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            _log("group_child_cancelled", os.getpid())
            raise

    async with asyncio.TaskGroup() as group:
        group.create_task(child())
        group.create_task(child())


@app.task
async def async_ignores_cancel() -> str:
    """Swallows every cancellation: the hard limit still ends it for the caller."""
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
    return "done"
