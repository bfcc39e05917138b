"""Child processes for tests: a coroutine in a fork() child (connections inherited across a fork),
and a spawned process talking to the test over a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import warnings
from collections.abc import Callable, Coroutine, Iterator
from multiprocessing.connection import Connection
from typing import Any


def run_in_fork_child(make: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Fork, run ``make()`` to completion in the child, return the child's exit code (0: ok)."""
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() with threads running; these tests are about exactly that.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            asyncio.run(make())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def spawned_with_pipe(target: Callable[..., None], *args: Any) -> Iterator[Connection]:
    """Start ``target(*args, pipe)`` in a spawned process and yield this end of its pipe; on the
    way out wait for the process (killed after 30 s) and require that it exited with 0."""
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    child = spawn.Process(target=target, args=(*args, theirs))
    child.start()
    try:
        yield ours
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
