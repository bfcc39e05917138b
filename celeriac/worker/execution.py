"""Running a task body and describing how it ended.

``async def`` bodies run on the worker's event loop; sync bodies on the pool. Either way the
request context is set for the body (``self.request``), and the outcome is one of SUCCESS,
FAILURE or RETRY with the value or exception, the traceback text and the run time.
"""

from __future__ import annotations

import inspect
import time
import traceback as tb
from dataclasses import dataclass
from typing import Any

from celeriac import states
from celeriac.app.context import current_request
from celeriac.exceptions import Retry
from celeriac.worker.pools import ThreadPool
from celeriac.worker.request import Request


@dataclass(slots=True)
class Outcome:
    """How one run of a task ended."""

    state: str
    value: Any
    runtime: float
    traceback: str | None = None

    @property
    def retry(self) -> Retry | None:
        """The Retry request, when the task asked to be retried."""
        return self.value if isinstance(self.value, Retry) else None


async def run(request: Request, pool: ThreadPool) -> Outcome:
    """Run the task of ``request`` once."""
    task = request.task
    context = request.context()
    args, kwargs = request.message.args, request.message.kwargs
    started = time.perf_counter()
    token = current_request.set(context)
    try:
        if task.is_async:
            value = await task(*args, **kwargs)
        else:

            def call() -> Any:
                current_request.set(context)
                result = task(*args, **kwargs)
                if inspect.iscoroutine(result):
                    # A sync function that returned a coroutine: refuse rather than drop it.
                    result.close()
                    raise TypeError(f"{task.name} returned a coroutine; declare it async def")
                return result

            value = await pool.run(call)
    except Retry as retry:
        return Outcome(states.RETRY, retry, time.perf_counter() - started, tb.format_exc())
    except Exception as exc:
        return Outcome(states.FAILURE, exc, time.perf_counter() - started, tb.format_exc())
    finally:
        current_request.reset(token)
    return Outcome(states.SUCCESS, value, time.perf_counter() - started)
