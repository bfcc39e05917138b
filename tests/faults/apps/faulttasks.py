"""Tasks run by the fault tests in real worker processes.

The broker and result store come from CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND; the transport
options (``visibility_timeout``, ``global_keyprefix``, ``client_name``, …) from the JSON objects in
FAULT_BROKER_OPTIONS and FAULT_BACKEND_OPTIONS, so every test tunes its workers without a module of
its own.

Every task appends a line to a file in the worker's working directory *before* it does anything
else: the file is the ground truth of how often a task really started, whatever the broker or the
result store say.
"""

from __future__ import annotations

import json
import os
import time

from celeriac import Celery


def _options(variable: str) -> dict[str, object]:
    raw = os.environ.get(variable, "{}")
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{variable} must hold a JSON object, got {raw!r}")
    return value


app = Celery("faulttasks")
app.conf.update(
    broker_transport_options=_options("FAULT_BROKER_OPTIONS"),
    result_backend_transport_options=_options("FAULT_BACKEND_OPTIONS"),
)


def _record(name: str, value: object) -> None:
    # One short write to a file opened for appending: concurrent writers' lines do not interleave.
    with open(name, "a", encoding="utf-8") as handle:
        handle.write(f"{value}\n")


@app.task
def slow(tag: str, seconds: float) -> str:
    """Record the start in ``started.log``, sleep, return ``tag``."""
    _record("started.log", tag)
    time.sleep(seconds)
    return tag


@app.task
def double(number: int, pause: float = 0.0) -> int:
    """Record the run in ``ran.log``, sleep ``pause``; ``number * 2``."""
    _record("ran.log", number)
    time.sleep(pause)
    return number * 2


@app.task
def gated(tag: str, gate: str, patience: float = 30.0) -> str:
    """Record the start in ``started.log``, wait until the file ``gate`` exists; ``tag``.

    Holds a concurrency slot for exactly as long as the test wants, however slow the machine.
    """
    _record("started.log", tag)
    deadline = time.monotonic() + patience
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate!r} was not opened within {patience}s")
        time.sleep(0.01)
    return tag
