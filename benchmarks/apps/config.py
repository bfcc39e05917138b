"""Settings shared by both benchmark apps, and how a worker process is told them.

Both projects take Celery's setting names, so one dictionary configures either side. The worker
subprocesses read it from ``BENCH_*`` environment variables (:func:`settings_from_env`); the
benchmark process calls :func:`settings` for its client apps.

Readiness: a worker logs nothing at ``--loglevel=warning`` when it is ready, so both apps connect a
receiver to Celery's ``worker_ready`` signal (celeriac sends it with the same name and meaning)
that writes the worker's pid to the file named by ``BENCH_READY_FILE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Environment variables a worker process reads.
BROKER_VAR = "BENCH_BROKER_URL"
BACKEND_VAR = "BENCH_RESULT_BACKEND"
QUEUE_VAR = "BENCH_QUEUE"
READY_VAR = "BENCH_READY_FILE"

#: Task names, the same on both sides.
ADD = "bench.add"
SLEEP = "bench.sleep"


def settings(broker_url: str, result_backend: str, queue: str) -> dict[str, Any]:
    """Celery-named settings for either side: results stored, json, one queue of the run's own."""
    return {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "task_default_queue": queue,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
    }


def settings_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """:func:`settings` from the ``BENCH_*`` variables a worker subprocess is started with."""
    try:
        return settings(environ[BROKER_VAR], environ[BACKEND_VAR], environ[QUEUE_VAR])
    except KeyError as exc:
        raise RuntimeError(f"benchmark app: environment variable {exc} is not set") from None


def mark_ready(environ: Mapping[str, str] = os.environ) -> None:
    """Write this process's pid to ``BENCH_READY_FILE`` (when set): the worker is consuming."""
    path = environ.get(READY_VAR)
    if path:
        Path(path).write_text(str(os.getpid()), encoding="utf-8")
