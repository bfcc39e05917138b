"""Tasks of the revoke end-to-end tests. Each records in files of the working directory (the test's
own) that it started and that it ran, which proves in the test process what a worker process did.

The broker and result store come from CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND; on Redis,
REVOKE_KEYPREFIX gives the test's own key prefix.
"""

from __future__ import annotations

import asyncio
import os
import time

from celeriac import Celery

app = Celery("revoketasks")


def use_prefix(prefix: str | None) -> None:
    """Keep every Redis key of the app under ``prefix`` (None: no prefix)."""
    options = {"global_keyprefix": prefix} if prefix else {}
    app.conf.update(
        broker_transport_options=options, result_backend_transport_options=dict(options)
    )


use_prefix(os.environ.get("REVOKE_KEYPREFIX"))


def _record(name: str, tag: str) -> None:
    with open(name, "a", encoding="utf-8") as handle:
        handle.write(f"{tag}\n")


@app.task
def record(tag: str) -> str:
    _record("ran.log", tag)
    return tag


@app.task
async def nap(tag: str, seconds: float) -> str:
    _record("started.log", tag)
    await asyncio.sleep(seconds)
    _record("ran.log", tag)
    return tag


@app.task
def doze(tag: str, seconds: float) -> str:
    _record("started.log", tag)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # Python code between short sleeps: stoppable on threads
        time.sleep(0.01)
    _record("ran.log", tag)
    return tag
