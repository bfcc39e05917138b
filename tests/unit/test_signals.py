"""Signals with Celery's names, senders and arguments; a receiver's error never breaks a task."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celeriac import Celery, states
from celeriac.contrib.testing import start_worker
from celeriac.exceptions import ImproperlyConfigured, Retry
from celeriac.signals import (
    ExceptionInfo,
    Signal,
    after_task_publish,
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_received,
    task_retry,
    task_revoked,
    task_success,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from celeriac.worker import Worker
from celeriac.worker.request import Request
from tests.services import wait_until

ALL_TASK_SIGNALS = [
    before_task_publish,
    after_task_publish,
    task_received,
    task_prerun,
    task_postrun,
    task_success,
    task_failure,
    task_retry,
    task_revoked,
]
WORKER_SIGNALS = [worker_init, worker_process_init, worker_ready, worker_shutdown]


class Recorder:
    """Connects one receiver to signals and keeps every call: (signal name, sender, kwargs, thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, Any], str]] = []
        self.lock = threading.Lock()
        self.connected: list[Signal] = []

    def __call__(self, signal: Signal, sender: Any = None, **kwargs: Any) -> str:
        with self.lock:
            self.calls.append((str(signal.name), sender, kwargs, threading.current_thread().name))
        return "ok"

    def connect(self, *signals: Signal, sender: Any = None) -> None:
        for sig in signals:
            sig.connect(self, sender=sender)
            self.connected.append(sig)

    def named(self, name: str) -> list[tuple[str, Any, dict[str, Any], str]]:
        with self.lock:
            return [c for c in self.calls if c[0] == name]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    # Signals are global: whatever a test connected must not leak into the next one.
    for sig in ALL_TASK_SIGNALS + WORKER_SIGNALS:
        sig.receivers = [c for c in sig.receivers if c.ref() is not rec]


def memory_app() -> Celery:
    name = uuid.uuid4().hex
    return Celery(
        "sig", broker=f"memory://{name}", backend=f"memory://{name}", set_as_current=False
    )


# -- the Signal class --------------------------------------------------------------------------------


def test_connect_send_and_responses() -> None:
    sig = Signal(name="custom", providing_args={"x"})
    got: list[tuple[Any, Any]] = []

    @sig.connect
    def first(sender: Any = None, x: int = 0, **kwargs: Any) -> int:
        got.append((sender, x))
        assert kwargs["signal"] is sig
        return x + 1

    def second(sender: Any = None, **kwargs: Any) -> str:
        return "two"

    assert sig.connect(second) is second
    responses = sig.send(sender="me", x=41)
    assert responses == [(first, 42), (second, "two")]
    assert got == [("me", 41)]
    assert sig.has_listeners()
    assert sig.disconnect(first) is True
    assert sig.disconnect(first) is False
    assert sig.send(sender="me", x=1) == [(second, "two")]
    assert repr(sig) == "<Signal: custom>"


def test_sender_filter_by_name_and_by_identity() -> None:
    sig = Signal(name="filtered")
    hits: list[str] = []
    target = object()

    @sig.connect(sender="tasks.add")
    def by_name(sender: Any = None, **kwargs: Any) -> None:
        hits.append("name")

    @sig.connect(sender=target)
    def by_object(sender: Any = None, **kwargs: Any) -> None:
        hits.append("object")

    sig.send(sender="tasks.add")
    sig.send(sender="tasks.mul")
    sig.send(sender=target)
    sig.send(sender=object())
    assert hits == ["name", "object"]
    assert sig.has_listeners("tasks.add") and not sig.has_listeners("tasks.mul")
    assert sig.disconnect(by_name) is False  # connected with a sender: disconnect with it
    assert sig.disconnect(by_name, sender="tasks.add") is True


def test_dispatch_uid_and_duplicate_connections_are_kept_once() -> None:
    sig = Signal(name="uids")
    calls: list[str] = []

    def receiver(**kwargs: Any) -> None:
        calls.append("r")

    sig.connect(receiver)
    sig.connect(receiver)
    sig.connect(lambda **kw: calls.append("a"), dispatch_uid="one")
    sig.connect(lambda **kw: calls.append("b"), dispatch_uid="one")
    sig.send(sender=None)
    assert calls == ["r", "a"]
    assert sig.disconnect(dispatch_uid="one") is True
    assert len(sig.receivers) == 1


def test_bound_methods_connect_once_per_instance() -> None:
    sig = Signal(name="methods")

    class Listener:
        def __init__(self) -> None:
            self.count = 0

        def on(self, **kwargs: Any) -> None:
            self.count += 1

    a, b = Listener(), Listener()
    sig.connect(a.on)
    sig.connect(a.on)
    sig.connect(b.on)
    sig.send(sender=None)
    assert (a.count, b.count) == (1, 1)
    assert sig.disconnect(a.on)
    sig.send(sender=None)
    assert (a.count, b.count) == (1, 2)


def test_strong_by_default_weak_on_request() -> None:
    sig = Signal(name="refs")

    def make() -> Callable[..., Any]:
        def closure(**kwargs: Any) -> str:
            return "alive"

        return closure

    sig.connect(make())  # strong: kept although nothing else refers to it
    sig.connect(make(), weak=True)  # weak: gone at the next collection
    gc.collect()
    assert [response for _, response in sig.send(sender=None)] == ["alive"]
    assert len(sig.receivers) == 1

    class Listener:
        def on(self, **kwargs: Any) -> str:
            return "method"

    listener = Listener()
    sig.connect(listener.on, weak=True)
    assert len(sig.send(sender=None)) == 2
    del listener
    gc.collect()
    assert len(sig.send(sender=None)) == 1


def test_a_raising_receiver_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sig = Signal(name="robust")

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    def fine(**kwargs: Any) -> str:
        return "fine"

    sig.connect(broken)
    sig.connect(fine)
    with caplog.at_level(logging.ERROR, logger="celeriac.signals"):
        responses = sig.send(sender=None)
    assert isinstance(responses[0][1], RuntimeError)
    assert responses[1] == (fine, "fine")
    assert "receiver bug" in caplog.text
    assert sig.send_robust(sender=None)[1] == (fine, "fine")


def test_receivers_must_take_kwargs_and_must_not_be_async() -> None:
    sig = Signal(name="strict")

    def positional(sender: Any) -> None: ...

    async def coroutine(**kwargs: Any) -> None: ...

    class AsyncCallable:
        async def __call__(self, **kwargs: Any) -> None: ...

    with pytest.raises(ImproperlyConfigured, match=r"\*\*kwargs"):
        sig.connect(positional)
    with pytest.raises(ImproperlyConfigured, match="async def"):
        sig.connect(coroutine)
    with pytest.raises(ImproperlyConfigured, match="async def"):
        sig.connect(AsyncCallable())
    with pytest.raises(ImproperlyConfigured, match="callable"):
        sig.connect("not a function")  # type: ignore[call-overload]
    with pytest.raises(ImproperlyConfigured, match="retry=True"):
        sig.connect(lambda **kw: None, retry=True)
    with pytest.raises(ImproperlyConfigured, match="receiver or a dispatch_uid"):
        sig.disconnect()
    assert sig.receivers == []


def test_a_receiver_returning_a_coroutine_has_it_closed_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sig = Signal(name="sneaky")

    async def later() -> None: ...

    sig.connect(lambda **kw: later())
    with caplog.at_level(logging.ERROR, logger="celeriac.signals"):
        (_receiver, response), *_ = sig.send(sender=None)
    assert response.cr_frame is None  # closed: no "never awaited" warning, no leak
    assert "never awaited" in caplog.text


def test_sending_without_receivers_builds_nothing() -> None:
    sig = Signal(name="idle")
    assert sig.receivers == []
    assert sig.send(sender=None, big=object()) == []
    assert not sig.receivers  # what hot paths test before building any arguments


def test_module_names_match_celerys() -> None:
    import celery.signals

    import celeriac.signals

    for name in [s.name for s in ALL_TASK_SIGNALS + WORKER_SIGNALS]:
        assert name is not None
        ours = getattr(celeriac.signals, name)
        theirs = getattr(celery.signals, name)
        assert ours.name == theirs.name == name
        assert ours.providing_args <= theirs.providing_args | {"state", "headers"}
    # Every Celery signal imports; those never sent here refuse receivers instead of ignoring them.
    for name in celery.signals.__all__:
        assert getattr(celeriac.signals, name).name == name
    from celeriac.signals import beat_init, setup_logging

    with pytest.raises(ImproperlyConfigured, match="does not send Celery's 'setup_logging'"):

        @setup_logging.connect
        def configure(**kwargs: Any) -> None: ...

    with pytest.raises(ImproperlyConfigured, match="does not send Celery's 'beat_init'"):
        beat_init.connect(lambda **kw: None, sender="x")
    assert beat_init.receivers == [] and setup_logging.receivers == []


def test_exception_info_as_celerys_einfo() -> None:
    try:
        raise ValueError("bad")
    except ValueError as caught:
        exc = caught
    info = ExceptionInfo(exc)
    assert info.type is ValueError
    assert info.exception is exc
    assert info.tb is exc.__traceback__
    assert "ValueError: bad" in info.traceback
    assert info.exc_info == (ValueError, exc, exc.__traceback__)
    assert str(info) == info.traceback


# -- signals sent by a worker --------------------------------------------------------------------------


def test_task_signals_fire_once_with_celerys_arguments(recorder: Recorder) -> None:
    app = memory_app()
    body_threads: list[str] = []

    @app.task
    def add(x: int, y: int) -> int:
        body_threads.append(threading.current_thread().name)
        return x + y

    @app.task
    def fail(message: str) -> None:
        raise KeyError(message)

    @app.task(bind=True)
    def retry_once(self: Any) -> int:
        if self.request.retries == 0:
            raise self.retry(exc=OSError("later"), countdown=0)
        return 1

    recorder.connect(*ALL_TASK_SIGNALS)
    try:
        with start_worker(app) as worker:
            ok = add.delay(2, 3)
            assert ok.get(timeout=5) == 5
            bad = fail.delay("nope")
            with pytest.raises(KeyError):
                bad.get(timeout=5)
            again = retry_once.delay()
            assert again.get(timeout=5) == 1
            expired = add.apply_async((1, 1), expires=datetime.now(UTC) - timedelta(seconds=1))
            assert expired.get(timeout=5, propagate=False) is not None
            assert expired.state == states.REVOKED
            wait_until(lambda: len(recorder.named("task_postrun")) == 4)
    finally:
        app.close()

    def of(name: str, task_id: str) -> list[dict[str, Any]]:
        return [
            kw
            for _, _, kw, _ in recorder.named(name)
            if task_id
            in (
                kw.get("task_id"),
                kw.get("headers", {}).get("id"),
                getattr(kw.get("request"), "id", None),
            )
        ]

    # Publishing: sender is the task name; the retry is published like any call.
    publishes = recorder.named("before_task_publish")
    assert [s for _, s, _, _ in publishes].count(add.name) == 2
    assert [s for _, s, _, _ in publishes].count(retry_once.name) == 2
    before = of("before_task_publish", ok.id)[0]
    assert before["body"][0] == [2, 3] and before["body"][1] == {}
    assert set(before["body"][2]) == {"callbacks", "errbacks", "chain", "chord"}
    assert before["routing_key"] == "celery" and before["exchange"] == ""
    assert before["headers"]["task"] == add.name
    assert before["properties"]["correlation_id"] == ok.id
    assert before["retry_policy"]["max_retries"] == 3
    assert before["declare"] == []
    after = of("after_task_publish", ok.id)[0]
    assert after["headers"]["id"] == ok.id and after["routing_key"] == "celery"

    # Received: sender is the worker, request the worker's request.
    received = [c for c in recorder.named("task_received") if c[2]["request"].id == ok.id]
    assert len(received) == 1
    assert isinstance(received[0][1], Worker) and received[0][1] is worker
    assert isinstance(received[0][2]["request"], Request)
    assert received[0][2]["request"].name == add.name

    # Success: prerun, success, postrun, each once, sender the task, in the body's thread.
    prerun = [c for c in recorder.named("task_prerun") if c[2]["task_id"] == ok.id]
    assert len(prerun) == 1
    _, sender, kw, thread = prerun[0]
    assert sender is add and kw["task"] is add and kw["args"] == [2, 3] and kw["kwargs"] == {}
    assert thread == body_threads[0]
    success = [c for c in recorder.named("task_success") if c[1] is add]
    assert len(success) == 1
    assert success[0][2]["result"] == 5 and success[0][2]["runtime"] >= 0
    assert success[0][3] == body_threads[0]
    postrun = of("task_postrun", ok.id)
    assert len(postrun) == 1
    assert postrun[0]["retval"] == 5 and postrun[0]["state"] == states.SUCCESS

    # Failure.
    failure = of("task_failure", bad.id)
    assert len(failure) == 1
    assert isinstance(failure[0]["exception"], KeyError)
    assert failure[0]["args"] == ["nope"] and failure[0]["kwargs"] == {}
    assert failure[0]["traceback"] is failure[0]["exception"].__traceback__
    assert isinstance(failure[0]["einfo"], ExceptionInfo)
    assert "KeyError: 'nope'" in failure[0]["einfo"].traceback
    assert [c[1] for c in recorder.named("task_failure")] == [fail]
    assert of("task_postrun", bad.id)[0]["state"] == states.FAILURE

    # Retry: once, with the request, the Retry as reason and its einfo; then a success.
    retries = recorder.named("task_retry")
    assert len(retries) == 1
    _, sender, kw, _ = retries[0]
    assert sender is retry_once
    assert kw["request"].id == again.id and kw["request"].retries == 0
    assert isinstance(kw["reason"], Retry) and isinstance(kw["reason"].exc, OSError)
    assert isinstance(kw["einfo"], ExceptionInfo) and kw["einfo"].type is Retry
    states_seen = [k["state"] for k in of("task_postrun", again.id)]
    assert states_seen == [states.RETRY, states.SUCCESS]
    assert len(of("task_received", again.id)) == 2  # the retry is a new message

    # Revoked (expired): sender the task, expired=True; it never ran.
    revoked = recorder.named("task_revoked")
    assert len(revoked) == 1
    _, sender, kw, _ = revoked[0]
    assert sender is add
    assert kw["request"].id == expired.id
    assert (kw["terminated"], kw["signum"], kw["expired"]) == (False, None, True)
    assert of("task_prerun", expired.id) == []
    assert of("task_received", expired.id) == []


def test_prerun_runs_in_the_tasks_own_context(recorder: Recorder) -> None:
    """A receiver can set what the body then sees (how tracing integrations work)."""
    app = memory_app()
    span: contextvars.ContextVar[str | None] = contextvars.ContextVar("span", default=None)

    def start_span(task_id: str | None = None, **kwargs: Any) -> None:
        span.set(f"span-{task_id}")

    @app.task(bind=True)
    def sync_body(self: Any) -> str | None:
        return span.get()

    @app.task(bind=True)
    async def async_body(self: Any) -> str | None:
        await asyncio.sleep(0)
        return span.get()

    task_prerun.connect(start_span)
    try:
        with start_worker(app, concurrency=2):
            first, second = sync_body.delay(), async_body.delay()
            assert first.get(timeout=5) == f"span-{first.id}"
            assert second.get(timeout=5) == f"span-{second.id}"
    finally:
        task_prerun.disconnect(start_span)
        app.close()


def test_sender_filter_with_a_task_object(recorder: Recorder) -> None:
    app = memory_app()

    @app.task
    def watched() -> str:
        return "w"

    @app.task
    def other() -> str:
        return "o"

    recorder.connect(task_success, sender=watched)
    recorder.connect(before_task_publish, sender=watched.name)
    try:
        with start_worker(app):
            assert other.delay().get(timeout=5) == "o"
            assert watched.delay().get(timeout=5) == "w"
    finally:
        task_success.disconnect(recorder, sender=watched)
        before_task_publish.disconnect(recorder, sender=watched.name)
        app.close()
    assert [(c[0], c[2].get("result")) for c in recorder.calls if c[0] == "task_success"] == [
        ("task_success", "w")
    ]
    assert [c[1] for c in recorder.named("before_task_publish")] == [watched.name]


def test_before_publish_can_add_headers_the_task_sees() -> None:
    app = memory_app()

    def add_trace(headers: dict[str, Any], properties: dict[str, Any], **kwargs: Any) -> None:
        headers["x-trace-id"] = "trace-123"
        properties["priority"] = 6

    @app.task(bind=True)
    def traced(self: Any) -> list[Any]:
        return [self.request.headers.get("x-trace-id"), self.request.delivery_info["priority"]]

    before_task_publish.connect(add_trace, sender=traced.name)
    try:
        with start_worker(app):
            assert traced.delay().get(timeout=5) == ["trace-123", 6]
    finally:
        before_task_publish.disconnect(add_trace, sender=traced.name)
        app.close()


def test_raising_receivers_do_not_fail_tasks_or_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = memory_app()

    def broken(**kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    async def aadd(x: int, y: int) -> int:
        return x + y

    signals = [*ALL_TASK_SIGNALS, *WORKER_SIGNALS]
    for sig in signals:
        sig.connect(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="celeriac.signals"), start_worker(app):
            assert add.delay(1, 2).get(timeout=5) == 3
            assert aadd.delay(3, 4).get(timeout=5) == 7
            assert add.apply_async((5, 5)).get(timeout=5) == 10
    finally:
        for sig in signals:
            sig.disconnect(broken)
        app.close()
    assert "receiver bug" in caplog.text
    for name in ("task_prerun", "task_success", "task_postrun", "worker_ready", "worker_init"):
        assert f"<Signal: {name}> raised" in caplog.text


def test_worker_signals_fire_once_in_order(recorder: Recorder) -> None:
    app = memory_app()
    recorder.connect(*WORKER_SIGNALS)
    try:
        with start_worker(app) as worker:
            ready_calls = [c[0] for c in recorder.calls]
    finally:
        app.close()
    assert ready_calls == ["worker_init", "worker_process_init", "worker_ready"]
    assert [c[0] for c in recorder.calls] == [
        "worker_init",
        "worker_process_init",
        "worker_ready",
        "worker_shutdown",
    ]
    senders = {c[0]: c[1] for c in recorder.calls}
    assert senders["worker_init"] is worker
    assert senders["worker_ready"] is worker
    assert senders["worker_shutdown"] is worker
    assert senders["worker_process_init"] == worker.hostname


def test_worker_shutdown_is_sent_even_when_start_fails(recorder: Recorder) -> None:
    app = Celery("broken", broker="nope://", backend="memory://", set_as_current=False)
    recorder.connect(worker_init, worker_shutdown, worker_ready)
    with pytest.raises(Exception, match="nope://"), start_worker(app):
        pass
    assert [c[0] for c in recorder.calls] == ["worker_init", "worker_shutdown"]
