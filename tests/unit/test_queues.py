"""``task_queues``: Celery's Queue/Exchange declarations, shared by workers and clients."""

from __future__ import annotations

import pytest

from celeriac import Celery, Exchange, Queue
from celeriac.app.queues import queue_spec
from celeriac.brokers.base import QueueSpec
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import ImproperlyConfigured


def _app(name: str, **settings: object) -> Celery:
    return Celery(name, broker=f"memory://{name}", backend=f"memory://{name}", **settings)


def test_unlisted_queues_are_declared_as_celery_declares_missing_ones() -> None:
    app = _app("q-defaults", task_default_queue_type="quorum", task_queue_max_priority=5)
    assert queue_spec(app.conf, "celery") == QueueSpec(
        "celery", "celery", "celery", "direct", True, 5, "quorum"
    )
    assert queue_spec(app.conf, "other") == QueueSpec(
        "other", "other", "other", "direct", True, 5, "quorum"
    )


def test_listed_queues_keep_their_exchange_binding_and_arguments() -> None:
    app = _app(
        "q-listed",
        task_queues=[
            Queue("images", Exchange("media", type="topic"), routing_key="media.#"),
            Queue("alerts", Exchange("broadcast", type="fanout")),
            Queue("urgent", "urgent", queue_arguments={"x-max-priority": 9}),
            Queue("votes", queue_arguments={"x-queue-type": "quorum"}),
            "plain",
        ],
    )
    conf = app.conf
    assert queue_spec(conf, "images") == QueueSpec("images", "media", "media.#", "topic")
    assert queue_spec(conf, "alerts") == QueueSpec("alerts", "broadcast", "", "fanout")
    assert queue_spec(conf, "urgent").max_priority == 9
    assert queue_spec(conf, "votes").queue_type == "quorum"
    assert queue_spec(conf, "plain") == QueueSpec("plain", "plain", "plain")


def test_bad_declarations_are_refused_by_name() -> None:
    with pytest.raises(ImproperlyConfigured, match="x-message-ttl"):
        Queue("q", queue_arguments={"x-message-ttl": 1000})
    with pytest.raises(ImproperlyConfigured, match="more than once"):
        _app("q-twice", task_queues=[Queue("a"), Queue("a")])
    with pytest.raises(ImproperlyConfigured, match=r"celeriac\.Queue objects"):
        _app("q-bad", task_queues=[{"name": "a"}])
    with pytest.raises(ImproperlyConfigured, match="classic' or 'quorum"):
        _app("q-type", task_default_queue_type="stream")


def test_a_task_routed_to_a_topic_queue_reaches_its_worker() -> None:
    app = _app(
        "q-topic",
        task_queues=[Queue("images", Exchange("media", type="topic"), routing_key="media.#")],
        task_routes={"q-topic.resize": {"queue": "images"}},
    )

    @app.task(name="q-topic.resize")
    def resize(size: int) -> int:
        return size * 2

    with start_worker(app, queues=["images"]):
        assert resize.delay(21).get(timeout=5) == 42
