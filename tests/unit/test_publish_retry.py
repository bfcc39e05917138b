"""Publishing while the broker is unreachable: retried per Celery's policy, then a clear error."""

from __future__ import annotations

import asyncio
import time

import pytest

from celeriac import Celery
from celeriac.app.publishing import RetryPolicy, parse_retry_policy, publish_with_retry
from celeriac.exceptions import ConnectionError, ImproperlyConfigured, PublishError, RoutingError
from tests.services import free_port


def test_policy_pauses_follow_celery_arithmetic() -> None:
    policy = RetryPolicy(max_retries=4, interval_start=0.1, interval_step=0.3, interval_max=0.5)
    assert list(policy.pauses()) == pytest.approx([0.1, 0.4, 0.5, 0.5])
    assert list(RetryPolicy(max_retries=0).pauses()) == []


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ImproperlyConfigured, match="unknown key"):
        parse_retry_policy({"max_retry": 3}, "task_publish_retry_policy")
    with pytest.raises(ImproperlyConfigured, match="seconds >= 0"):
        parse_retry_policy({"interval_step": -1}, "task_publish_retry_policy")
    app = Celery("retry-settings", broker="memory://", backend="memory://")
    with pytest.raises(ImproperlyConfigured, match="max_retries"):
        app.conf.task_publish_retry_policy = {"max_retries": "3"}


def test_unreachable_broker_is_retried_then_raises_publish_error() -> None:
    app = Celery("retry-down", broker=f"redis://127.0.0.1:{free_port()}/0", backend="memory://")
    app.conf.task_publish_retry_policy = {
        "max_retries": 3,
        "interval_start": 0.05,
        "interval_step": 0.05,
        "interval_max": 0.1,
    }
    started = time.monotonic()
    with pytest.raises(PublishError, match="after 4 attempts; it was not sent"):
        app.send_task("proj.add", (1, 2))
    # Pauses 0.05 + 0.1 + 0.1 between four attempts.
    assert time.monotonic() - started >= 0.25

    started = time.monotonic()
    with pytest.raises(PublishError, match="it was not sent"):
        app.send_task("proj.add", (1, 2), retry=False)
    assert time.monotonic() - started < 2.0
    app.close()


def test_a_routing_error_is_not_retried_and_transient_errors_are() -> None:
    calls: list[str] = []

    async def unroutable() -> None:
        calls.append("unroutable")
        raise RoutingError("no queue bound")

    async def flaky() -> None:
        calls.append("flaky")
        if calls.count("flaky") < 3:
            raise ConnectionError("connection refused")

    policy = RetryPolicy(max_retries=5, interval_start=0.0, interval_step=0.01, interval_max=0.01)
    with pytest.raises(RoutingError):
        asyncio.run(publish_with_retry(unroutable, policy, "task x"))
    asyncio.run(publish_with_retry(flaky, policy, "task y"))
    assert calls == ["unroutable", "flaky", "flaky", "flaky"]
