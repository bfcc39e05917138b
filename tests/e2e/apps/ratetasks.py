"""Tasks of the rate-limit end-to-end tests, run by real worker processes.

The broker and result store come from CELERIAC_BROKER_URL / CELERIAC_RESULT_BACKEND; RATE_E2E_PREFIX
gives the Redis broker a key prefix of the test's own. Each task returns when it started and in
which process, so a test can check the starts against the limit and see that every worker took part.
"""

from __future__ import annotations

import os
import time

from celeriac import Celery

app = Celery("ratetasks")
if os.environ.get("RATE_E2E_PREFIX"):
    app.conf.broker_transport_options = {"global_keyprefix": os.environ["RATE_E2E_PREFIX"]}


@app.task(rate_limit="10/s")
def per_worker() -> tuple[float, int]:
    return time.time(), os.getpid()


@app.task(rate_limit="10/s", rate_limit_scope="cluster")
def cluster_wide() -> tuple[float, int]:
    return time.time(), os.getpid()


@app.task
def unlimited() -> float:
    return time.time()
