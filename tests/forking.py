"""Run a coroutine in a fork() child, for tests of connections inherited across a fork."""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Callable, Coroutine
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
