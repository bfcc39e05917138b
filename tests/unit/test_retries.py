"""Retries as Celery's: ``self.retry``, ``autoretry_for`` with backoff, limits, eager retries.

Worker tests run the production worker in-process on ``memory://`` (every retry is a real message
that waits in the broker); a real worker process on SQLite is in tests/e2e/test_retries_e2e.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.utils.time import get_exponential_backoff_interval as celery_backoff

from celeriac import Celery, states
from celeriac.app.task import get_exponential_backoff_interval
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import (
    EncodeError,
    ImproperlyConfigured,
    MaxRetriesExceededError,
    Retry,
    UnknownOptionError,
)
from celeriac.signals import task_retry


class Seen:
    """What the runs of a task saw, appended from worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Any] = []

    def add(self, item: Any) -> None:
        with self.lock:
            self.items.append(item)


def memory_app() -> Celery:
    name = uuid.uuid4().hex
    return Celery(
        "retries", broker=f"memory://{name}", backend=f"memory://{name}", set_as_current=False
    )


@pytest.fixture
def app() -> Iterator[Celery]:
    app = memory_app()
    yield app
    app.close()


# -- the backoff interval ---------------------------------------------------------------------------


def test_backoff_interval_without_jitter_doubles_up_to_the_maximum() -> None:
    assert [get_exponential_backoff_interval(1, n, 600) for n in range(12)] == [
        1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600,
    ]  # fmt: skip
    assert [get_exponential_backoff_interval(3, n, 20) for n in range(4)] == [3, 6, 12, 20]
    assert get_exponential_backoff_interval(0, 5, 600) == 0
    assert get_exponential_backoff_interval(1, 5, 0) == 0
    assert get_exponential_backoff_interval(1, 5, -3) == 0


def test_backoff_interval_is_celerys_with_and_without_jitter() -> None:
    """Same inputs and the same random state give the very numbers Celery's function gives."""
    cases = [
        (factor, retries, maximum, jitter)
        for factor in (0, 1, 2, 5)
        for retries in range(0, 12)
        for maximum in (0, 1, 7, 600)
        for jitter in (False, True)
    ]
    for seed in range(5):
        random.seed(seed)
        ours = [get_exponential_backoff_interval(*case) for case in cases]
        random.seed(seed)
        theirs = [celery_backoff(*case) for case in cases]
        assert ours == theirs
    random.seed()


def test_jittered_interval_covers_zero_to_the_cap() -> None:
    values = {get_exponential_backoff_interval(1, 2, 600, full_jitter=True) for _ in range(400)}
    assert values == {0, 1, 2, 3, 4}


# -- self.retry in a worker ---------------------------------------------------------------------------


def test_retry_twice_then_success_keeps_the_id_and_counts_retries(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True, default_retry_delay=10)
    def flaky(self: Any, x: int) -> int:
        seen.add((self.request.id, self.request.retries, x))
        if self.request.retries < 2:
            raise self.retry(countdown=0.05)
        return x * 10

    with start_worker(app):
        result = flaky.delay(4)
        assert result.get(timeout=5) == 40
    assert result.state == states.SUCCESS
    assert [r for _, r, _ in seen.items] == [0, 1, 2]
    assert {i for i, _, _ in seen.items} == {result.id}
    assert {x for _, _, x in seen.items} == {4}


def test_retry_waits_its_countdown_in_the_broker(app: Celery) -> None:
    times = Seen()

    @app.task(bind=True)
    def later(self: Any) -> int:
        times.add(datetime.now(UTC))
        if self.request.retries == 0:
            raise self.retry(countdown=0.3)
        return self.request.retries

    with start_worker(app):
        assert later.delay().get(timeout=5) == 1
    first, second = times.items
    assert second - first >= timedelta(seconds=0.28)


def test_retry_past_max_retries_raises_the_original_exception(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True, max_retries=2)
    def doomed(self: Any) -> None:
        seen.add(self.request.retries)
        raise self.retry(exc=ValueError("boom"), countdown=0.01)

    with start_worker(app):
        result = doomed.delay()
        with pytest.raises(ValueError, match="boom"):
            result.get(timeout=5)
    assert result.state == states.FAILURE
    assert seen.items == [0, 1, 2]


def test_retry_past_max_retries_without_exc_is_max_retries_exceeded(app: Celery) -> None:
    @app.task(bind=True, max_retries=1, default_retry_delay=0.01)
    def doomed(self: Any, x: int) -> None:
        raise self.retry()

    with start_worker(app):
        result = doomed.delay(7)
        with pytest.raises(MaxRetriesExceededError, match=r"Can't retry .*doomed\[.*args:\[7\]"):
            result.get(timeout=5)


def test_max_retries_given_to_retry_overrides_the_task_for_that_call(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True, max_retries=10)
    def capped(self: Any) -> None:
        seen.add(self.request.retries)
        raise self.retry(exc=KeyError("k"), countdown=0, max_retries=1)

    with start_worker(app), pytest.raises(KeyError):
        capped.delay().get(timeout=5)
    assert seen.items == [0, 1]


def test_max_retries_none_retries_until_it_works(app: Celery) -> None:
    @app.task(bind=True, max_retries=None)
    def patient(self: Any) -> int:
        if self.request.retries < 6:
            raise self.retry(countdown=0)
        return self.request.retries

    with start_worker(app):
        assert patient.delay().get(timeout=5) == 6


def test_retry_in_progress_is_stored_as_retry_with_its_cause(app: Celery) -> None:
    gate = threading.Event()

    @app.task(bind=True)
    def slow_retry(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(exc=OSError("disk"), countdown=0.5)
        return "done"

    with start_worker(app):
        result = slow_retry.delay()
        deadline = datetime.now(UTC) + timedelta(seconds=3)
        while result.state != states.RETRY and datetime.now(UTC) < deadline:
            gate.wait(0.01)
        assert result.state == states.RETRY
        assert isinstance(result.result, OSError)
        assert result.get(timeout=5) == "done"


def test_retry_with_new_arguments(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True)
    def step(self: Any, n: int, label: str = "a") -> str:
        seen.add((n, label))
        if n < 2:
            raise self.retry(args=(n + 1,), countdown=0)
        return f"{n}{label}"

    @app.task(bind=True)
    def rename(self: Any, n: int, label: str = "a") -> str:
        seen.add((n, label))
        if label == "a":
            raise self.retry(kwargs={"label": "b"}, countdown=0)
        return f"{n}{label}"

    with start_worker(app):
        assert step.apply_async((0,), {"label": "z"}).get(timeout=5) == "2z"
        assert rename.delay(5).get(timeout=5) == "5b"
    assert seen.items == [(0, "z"), (1, "z"), (2, "z"), (5, "a"), (5, "b")]


def test_unbound_task_may_retry_through_its_module_level_object(app: Celery) -> None:
    seen = Seen()

    @app.task(default_retry_delay=0.01)
    def plain(x: int) -> int:
        request = plain.request
        seen.add(request.retries)
        if request.retries == 0:
            raise plain.retry()
        return x

    with start_worker(app):
        assert plain.delay(3).get(timeout=5) == 3
    assert seen.items == [0, 1]


def test_retry_with_throw_false_still_sends_the_retry(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True)
    def soft(self: Any) -> str:
        seen.add(self.request.retries)
        if self.request.retries == 0:
            returned = self.retry(countdown=0.2, throw=False)
            assert isinstance(returned, Retry)
            return "first"
        return "second"

    with start_worker(app):
        result = soft.delay()
        assert result.get(timeout=5) == "first"  # the body returned: its success is stored
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while len(seen.items) < 2 and datetime.now(UTC) < deadline:
            threading.Event().wait(0.02)
        # The retry ran; a stored success is final (as in Celery's result stores).
        assert app.AsyncResult(result.id).result == "first"
    assert seen.items == [0, 1]


def test_retry_to_another_queue_with_options(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True)
    def move(self: Any) -> str:
        seen.add((self.request.retries, self.request.delivery_info["routing_key"]))
        if self.request.retries == 0:
            raise self.retry(countdown=0, queue="elsewhere", priority=7)
        return self.request.delivery_info["routing_key"]

    with start_worker(app, queues=["celery", "elsewhere"]):
        assert move.delay().get(timeout=5) == "elsewhere"
    assert seen.items == [(0, "celery"), (1, "elsewhere")]


def test_retry_of_a_message_from_another_queue_goes_back_to_that_queue(app: Celery) -> None:
    @app.task(bind=True, queue="special")
    def routed(self: Any) -> str:
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return str(self.request.delivery_info["routing_key"])

    with start_worker(app, queues=["special"]):
        assert routed.delay().get(timeout=5) == "special"


def test_retry_keeps_parent_root_and_links(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True)
    def child(self: Any) -> int:
        seen.add((self.request.parent_id, self.request.root_id))
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return 5

    @app.task
    def after(value: int) -> int:
        seen.add(("after", value))
        return value + 1

    with start_worker(app):
        result = child.apply_async(parent_id="p-1", root_id="r-1", link=after.s())
        assert result.get(timeout=5) == 5
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while ("after", 5) not in seen.items and datetime.now(UTC) < deadline:
            threading.Event().wait(0.02)
    assert seen.items.count(("p-1", "r-1")) == 2
    assert ("after", 5) in seen.items


def test_retry_with_bad_input_fails_the_task_clearly(app: Celery) -> None:
    @app.task(bind=True)
    def bad_countdown(self: Any) -> None:
        raise self.retry(countdown="soon")

    @app.task(bind=True)
    def bad_option(self: Any) -> None:
        raise self.retry(countdwn=1)

    @app.task(bind=True)
    def bad_priority(self: Any) -> None:
        raise self.retry(priority=42)

    @app.task(bind=True)
    def own_option(self: Any) -> None:
        raise self.retry(task_id="other")

    @app.task(bind=True)
    def unserializable(self: Any) -> None:
        if self.request.retries == 0:
            raise self.retry(args=({1, 2},), countdown=0)

    with start_worker(app):
        with pytest.raises(ImproperlyConfigured, match="countdown must be a number"):
            bad_countdown.delay().get(timeout=5)
        with pytest.raises(UnknownOptionError, match="Did you mean 'countdown'"):
            bad_option.delay().get(timeout=5)
        with pytest.raises(ImproperlyConfigured, match="priority must be an integer from 0 to 9"):
            bad_priority.delay().get(timeout=5)
        with pytest.raises(ImproperlyConfigured, match="keeps the task id"):
            own_option.delay().get(timeout=5)
        # The new arguments do not serialize: nothing is sent, the task fails with that error.
        result = unserializable.delay()
        with pytest.raises(EncodeError, match="set"):
            result.get(timeout=5)


def test_retry_outside_a_running_task_is_improperly_configured(app: Celery) -> None:
    @app.task(bind=True)
    def alone(self: Any) -> None:
        raise self.retry()

    @app.task(bind=True)
    def other(self: Any) -> None:
        # A plain call of another task inside this one: that task is not the one running.
        alone.retry()

    with pytest.raises(ImproperlyConfigured, match="outside a running"):
        alone()
    with pytest.raises(ImproperlyConfigured, match="outside a running") as info:
        alone.retry(exc=ValueError("x"))
    assert isinstance(info.value.__cause__, ValueError)
    with start_worker(app), pytest.raises(ImproperlyConfigured, match="outside a running"):
        other.delay().get(timeout=5)


def test_retry_message_reads_as_celerys(app: Celery) -> None:
    reasons = Seen()

    def receiver(sender: Any = None, reason: Any = None, **kwargs: Any) -> None:
        reasons.add(str(reason))

    @app.task(bind=True)
    def once(self: Any) -> None:
        if self.request.retries == 0:
            raise self.retry(exc=ValueError("boom"), countdown=0)

    task_retry.connect(receiver, sender=once)
    try:
        with start_worker(app):
            once.delay().get(timeout=5)
    finally:
        task_retry.disconnect(receiver, sender=once)
    assert reasons.items == ["Retry in 0s: ValueError('boom')"]


# -- autoretry_for ----------------------------------------------------------------------------------


def test_autoretry_for_retries_listed_exceptions_then_raises_the_original(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True, autoretry_for=(KeyError,), retry_kwargs={"max_retries": 2, "countdown": 0})
    def lookup(self: Any) -> None:
        seen.add(self.request.retries)
        raise KeyError("missing")

    with start_worker(app):
        result = lookup.delay()
        with pytest.raises(KeyError, match="missing"):
            result.get(timeout=5)
    assert seen.items == [0, 1, 2]


def test_autoretry_with_backoff_uses_celerys_delays(app: Celery) -> None:
    """No jitter: 1 s, then the limit is reached (max_retries=1); the delay is really waited."""
    whens = Seen()
    times = Seen()

    def receiver(sender: Any = None, reason: Any = None, **kwargs: Any) -> None:
        whens.add(reason.when)

    @app.task(
        bind=True,
        autoretry_for=(ConnectionError,),
        retry_backoff=True,
        retry_jitter=False,
        max_retries=1,
    )
    def call_api(self: Any) -> None:
        times.add(datetime.now(UTC))
        raise ConnectionError("down")

    task_retry.connect(receiver, sender=call_api)
    try:
        with start_worker(app), pytest.raises(ConnectionError, match="down"):
            call_api.delay().get(timeout=5)
    finally:
        task_retry.disconnect(receiver, sender=call_api)
    assert whens.items == [1]
    assert times.items[1] - times.items[0] >= timedelta(seconds=0.95)


def test_autoretry_backoff_with_jitter_and_a_cap(app: Celery) -> None:
    """Factor 5 capped at 1 s, with full jitter: every delay is 0 or 1 second."""
    whens = Seen()

    def receiver(sender: Any = None, reason: Any = None, **kwargs: Any) -> None:
        whens.add(reason.when)

    @app.task(
        autoretry_for=(ValueError,),
        retry_backoff=5,
        retry_backoff_max=1,
        max_retries=2,
    )
    def jittery() -> None:
        raise ValueError("again")

    task_retry.connect(receiver, sender=jittery)
    try:
        with start_worker(app), pytest.raises(ValueError, match="again"):
            jittery.delay().get(timeout=6)
    finally:
        task_retry.disconnect(receiver, sender=jittery)
    assert len(whens.items) == 2
    assert set(whens.items) <= {0, 1}


def test_autoretry_for_async_tasks(app: Celery) -> None:
    seen = Seen()

    @app.task(bind=True, autoretry_for=(TimeoutError,), retry_kwargs={"countdown": 0})
    async def fetch(self: Any, url: str) -> str:
        await asyncio.sleep(0)
        seen.add(self.request.retries)
        if self.request.retries < 2:
            raise TimeoutError(url)
        return f"got {url}"

    assert fetch.is_async
    with start_worker(app):
        assert fetch.delay("u").get(timeout=5) == "got u"
    assert seen.items == [0, 1, 2]


def test_dont_autoretry_for_wins(app: Celery) -> None:
    seen = Seen()

    @app.task(
        bind=True,
        autoretry_for=(Exception,),
        dont_autoretry_for=(KeyError,),
        retry_kwargs={"countdown": 0},
    )
    def picky(self: Any, kind: str) -> None:
        seen.add((kind, self.request.retries))
        raise KeyError(kind) if kind == "key" else ValueError(kind)

    with start_worker(app):
        with pytest.raises(KeyError):
            picky.delay("key").get(timeout=5)
        with pytest.raises(ValueError):
            picky.delay("value").get(timeout=5)
    assert [s for s in seen.items if s[0] == "key"] == [("key", 0)]
    assert [s for s in seen.items if s[0] == "value"] == [("value", n) for n in range(4)]


def test_autoretry_keeps_the_signature_and_plain_calls_raise_the_original(app: Celery) -> None:
    @app.task(autoretry_for=(ValueError,))
    def parse(text: str, base: int = 10) -> int:
        return int(text, base)

    with pytest.raises(ValueError, match="invalid literal"):
        parse("x")  # a plain call: the function's own error, not a retry
    with pytest.raises(TypeError, match="parse"):
        parse.delay(1, 2, 3)  # argument checking still sees the real signature
    assert parse("ff", 16) == 255


# -- eager (apply) -------------------------------------------------------------------------------------


def test_apply_runs_retries_at_once(app: Celery) -> None:
    seen: list[int] = []

    @app.task(bind=True, default_retry_delay=600)
    def flaky(self: Any) -> int:
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry()
        return self.request.retries

    result = flaky.apply()
    assert result.get() == 2
    assert seen == [0, 1, 2]


def test_apply_with_autoretry_ends_with_the_original_exception(app: Celery) -> None:
    @app.task(autoretry_for=(ValueError,), max_retries=2)
    def never() -> None:
        raise ValueError("no")

    result = never.apply()
    assert result.state == states.FAILURE
    with pytest.raises(ValueError, match="no"):
        result.get()


def test_apply_retry_merges_arguments_as_celery(app: Celery) -> None:
    calls: list[tuple[Any, ...]] = []

    @app.task(bind=True)
    def work(self: Any, a: int, b: int = 0, *, c: int = 0) -> int:
        calls.append((a, b, c))
        if self.request.retries == 0:
            # Only kwargs: "a" replaces the request's first positional argument in place.
            raise self.retry(kwargs={"a": 10, "c": 3})
        if self.request.retries == 1:
            # Only args: they replace all positional arguments; the request's kwargs stay.
            raise self.retry(args=(20,))
        return a + b + c

    assert work.apply((1, 2)).get() == 23
    assert calls == [(1, 2, 0), (10, 2, 3), (20, 0, 3)]

    @app.task(bind=True)
    def named(self: Any, a: int, b: int = 0) -> int:
        calls.append((a, b))
        if self.request.retries == 0:
            # Only args, where the request gave "a" by keyword: the new positional one replaces it
            # instead of passing "a" twice.
            raise self.retry(args=(7,))
        return a * 100 + b

    calls.clear()
    assert named.apply((), {"a": 1, "b": 2}).get() == 702
    assert calls == [(1, 2), (7, 2)]


# -- declaring the options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"autoretry_for": "ValueError"}, "autoretry_for .* must be an exception class"),
        ({"autoretry_for": (ValueError, int)}, "autoretry_for .* must be an exception class"),
        ({"dont_autoretry_for": [object]}, "dont_autoretry_for .* must be an exception class"),
        ({"retry_backoff": "fast"}, "retry_backoff .* must be a number"),
        ({"retry_backoff": -1}, "retry_backoff .* must not be negative"),
        ({"retry_backoff_max": None}, "retry_backoff_max .* must be a number"),
        ({"retry_jitter": 1}, "retry_jitter .* must be True or False"),
        ({"retry_kwargs": [("countdown", 1)]}, "retry_kwargs .* must be a dict"),
        ({"retry_kwargs": {"eta": 1}}, "'eta' is not allowed"),
        ({"retry_kwargs": {"countdwn": 1}}, "Did you mean 'countdown'"),
        ({"retry_kwargs": {"max_retries": "3"}}, "max_retries'] .* must be an integer"),
        ({"retry_kwargs": {"countdown": -2}}, "countdown'] .* must not be negative"),
        ({"max_retries": -1}, "max_retries .* must be an integer >= 0"),
        ({"max_retries": 2.5}, "max_retries .* must be an integer >= 0"),
        ({"default_retry_delay": "soon"}, "default_retry_delay .* must be a number"),
        ({"default_retry_delay": float("inf")}, "default_retry_delay .* must be a number"),
    ],
)
def test_bad_retry_options_are_refused_at_declaration(
    app: Celery, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):

        @app.task(**options)
        def task() -> None: ...


def test_retry_options_come_from_a_base_class_too(app: Celery) -> None:
    from celeriac import Task

    class Resilient(Task[Any, Any]):
        autoretry_for = (OSError,)
        retry_kwargs = {"max_retries": 1, "countdown": 0}

    seen = Seen()

    @app.task(bind=True, base=Resilient)
    def reads(self: Any) -> None:
        seen.add(self.request.retries)
        raise OSError("gone")

    with start_worker(app), pytest.raises(OSError, match="gone"):
        reads.delay().get(timeout=5)
    assert seen.items == [0, 1]

    class Broken(Task[Any, Any]):
        retry_backoff = "yes"  # type: ignore[assignment]

    with pytest.raises(ImproperlyConfigured, match="retry_backoff"):

        @app.task(base=Broken)
        def nope() -> None: ...


def test_task_options_are_documented() -> None:
    from celeriac.app.task import TASK_OPTIONS

    for name in (
        "autoretry_for",
        "dont_autoretry_for",
        "retry_kwargs",
        "retry_backoff",
        "retry_backoff_max",
        "retry_jitter",
        "max_retries",
        "default_retry_delay",
    ):
        assert TASK_OPTIONS[name]
