"""Tasks of the poison-message tests: one that kills the worker process running it, and healthy ones.

The broker and result store come from CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND (SQLite files
in the test's temporary directory). A short visibility timeout (E2E_VISIBILITY, default 1 s) lets
the leases of a dead worker run out quickly; E2E_MAX_DELIVERIES sets task_max_deliveries.
"""

from __future__ import annotations

import os
from typing import Any

from celeriac import Celery

app = Celery("poisontasks")
app.conf.update(
    task_max_deliveries=int(os.environ.get("E2E_MAX_DELIVERIES", "3")),
    broker_transport_options={"visibility_timeout": float(os.environ.get("E2E_VISIBILITY", "1"))},
)

#: Where ``crash`` notes each run, in the worker's working directory.
RUNS_FILE = "crash-runs.log"


@app.task
def add(x: int, y: int) -> int:
    return x + y


def _note_run_and_die(request: Any) -> None:
    """Note the run (and the delivery it came with), then end the whole process at once.

    ``os._exit`` skips every cleanup, as an OOM kill or a segfault in a C extension would: the
    process acks nothing and stores nothing more.
    """
    with open(RUNS_FILE, "a", encoding="utf-8") as handle:
        handle.write(f"{request.id} {request.delivery_count}\n")
    os._exit(17)


@app.task(bind=True)
def crash(self: Any) -> None:
    """Kills the process running it, every time."""
    _note_run_and_die(self.request)


@app.task(bind=True, reject_on_worker_lost=False)
def crash_once(self: Any) -> None:
    """``crash`` with Celery's choice when its pool process dies: fail at once."""
    _note_run_and_die(self.request)
