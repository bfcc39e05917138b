"""Real Celery and celeriac on one Redis: broker and result store, both directions.

The celeriac client sets ``broker_transport_options={"delayed_delivery": False}``: it sends to
queues that real Celery workers consume, and a Celery worker only reads the queue list, not the
sorted set in which celeriac's Redis transport otherwise keeps countdown/eta messages until due.
With the option off, a delayed message goes straight to the list with its ``eta`` header, as Celery
sends it, and the Celery worker that takes it waits for the eta itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import celeriac_interop
import pytest
from interop_config import settings

from tests import services
from tests.interop.cases import TIMEOUT, InteropCases
from tests.interop.conftest import Direction, Matrix, running_matrix

pytestmark = pytest.mark.e2e

#: What a celeriac client configures when Celery workers consume the queues it sends to.
MIXED_FLEET_CLIENT_OPTIONS = {"delayed_delivery": False}


@pytest.fixture(scope="module")
def redis_matrix(interop_workdir: Path) -> Iterator[Matrix]:
    services.require_redis()
    matrix = Matrix(
        "redis",
        services.redis_url(),
        services.redis_url(),
        interop_workdir,
        keyprefix=f"{services.unique('iop')}:",
        celeriac_client_broker_options=dict(MIXED_FLEET_CLIENT_OPTIONS),
    )
    with running_matrix(matrix):
        yield matrix


@pytest.fixture(params=["celery-to-celeriac", "celeriac-to-celery"])
def direction(request: pytest.FixtureRequest, redis_matrix: Matrix) -> Direction:
    return redis_matrix.directions[request.param]


@pytest.fixture
def to_celeriac(redis_matrix: Matrix) -> Direction:
    return redis_matrix.directions["celery-to-celeriac"]


class TestRedisInterop(InteropCases):
    """Redis broker + Redis results."""


def test_default_delayed_delivery_hides_countdowns_from_celery_workers(
    redis_matrix: Matrix,
) -> None:
    """Why a celeriac client of Celery workers sets ``delayed_delivery: False``.

    With celeriac's default a countdown message waits in celeriac's own sorted set until a
    celeriac consumer of its queue moves it; a Celery worker only reads the list, so it never sees
    the task. (The message is not lost: it stays there for a celeriac worker.)
    """
    client = celeriac_interop.build_app(
        "celeriac-default-client",
        settings(
            redis_matrix.broker_url,
            redis_matrix.result_backend,
            queue=redis_matrix.celery_queues[0],
            keyprefix=redis_matrix.keyprefix,
        ),
    )
    try:
        countdown = 0.2
        delayed = client.tasks["interop.add"].apply_async((1, 1), countdown=countdown)
        time.sleep(countdown + 0.1)
        # The Celery worker is consuming that queue: a task sent now is answered ...
        assert client.tasks["interop.add"].delay(2, 2).get(timeout=TIMEOUT) == 4
        # ... while the due countdown task was never handed to it.
        assert delayed.state == "PENDING"
        assert delayed.id not in redis_matrix.directions["celeriac-to-celery"].worker.log()
    finally:
        client.close()
