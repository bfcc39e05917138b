"""Real Celery and celeriac on one RabbitMQ, both directions, with two result stores.

* RabbitMQ broker + ``rpc://`` results (replies published to the sender's own reply queue);
* RabbitMQ broker + Redis results — the pairing of the original design notes.

Countdowns need no setting here: celeriac's AMQP transport keeps delayed messages in Celery 5.5's
delayed-delivery topology (``celery_delayed_delivery``), from which RabbitMQ routes them to the
target queue when due, so a Celery worker receives them like any other message.

Plus the design notes' protocol-1 message with a pickle body, published by an AMQP client to the
``celery`` exchange with routing key ``celery``: the celeriac worker runs it and real Celery reads
its result from Redis.
"""

from __future__ import annotations

import base64
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services
from tests.interop.cases import TIMEOUT, InteropCases
from tests.interop.conftest import Direction, Matrix, golden, running_matrix

pytestmark = pytest.mark.e2e

DIRECTIONS = ["celery-to-celeriac", "celeriac-to-celery"]


@pytest.fixture(scope="module")
def rpc_matrix(interop_workdir: Path) -> Iterator[Matrix]:
    services.require_rabbitmq()
    matrix = Matrix("amqp-rpc", services.amqp_url(), "rpc://", interop_workdir)
    with running_matrix(matrix):
        yield matrix


@pytest.fixture(scope="module")
def redis_results_matrix(interop_workdir: Path) -> Iterator[Matrix]:
    services.require_rabbitmq()
    services.require_redis()
    matrix = Matrix(
        "amqp-redis",
        services.amqp_url(),
        services.redis_url(),
        interop_workdir,
        # Only the result keys live in Redis; the prefix keeps them this run's own.
        keyprefix=f"{services.unique('iop')}:",
        # The celeriac worker's default queue is bound as Celery's default queue is: exchange
        # ``celery``, routing key ``celery`` (the queue itself has a name of this run's own).
        legacy_binding="celery",
    )
    with running_matrix(matrix):
        yield matrix


@pytest.fixture(
    params=[(results, d) for results in ("rpc", "redis") for d in DIRECTIONS],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def direction(request: pytest.FixtureRequest) -> Direction:
    results, name = request.param
    matrix: Matrix = request.getfixturevalue(
        "rpc_matrix" if results == "rpc" else "redis_results_matrix"
    )
    return matrix.directions[name]


@pytest.fixture(params=["rpc", "redis"])
def to_celeriac(request: pytest.FixtureRequest) -> Direction:
    matrix: Matrix = request.getfixturevalue(
        "rpc_matrix" if request.param == "rpc" else "redis_results_matrix"
    )
    return matrix.directions["celery-to-celeriac"]


class TestAMQPInterop(InteropCases):
    """RabbitMQ broker; rpc:// or Redis results."""


def test_design_notes_v1_pickle_message_runs_and_celery_reads_51(
    redis_results_matrix: Matrix,
) -> None:
    """The notes' protocol-1 pickle message, published as an AMQP client publishes it."""
    import amqp

    message = golden("v1_legacy_pickle.json")
    body = base64.b64decode(message["body_base64"])
    task_id = message["expected"]["id"]
    assert pickle.loads(body)["task"] == "test_celery.add_together"
    with amqp.Connection(
        f"{services.AMQP_HOST}:{services.AMQP_PORT}", userid="guest", password="guest"
    ) as conn:
        conn.connect()
        channel = conn.channel()
        channel.basic_publish(
            amqp.Message(
                body,
                content_type=message["content_type"],
                content_encoding=message["content_encoding"],
                application_headers=message["headers"],
                delivery_mode=message["expected"]["delivery_mode"],
            ),
            exchange="celery",
            routing_key="celery",
            mandatory=True,
        )
        channel.close()
    result = redis_results_matrix.celery_client.AsyncResult(task_id)
    assert result.get(timeout=TIMEOUT) == 51
    assert result.state == "SUCCESS"
    redis_results_matrix.directions["celery-to-celeriac"].worker.wait_for(
        f"test_celery.add_together[{task_id}] succeeded"
    )
