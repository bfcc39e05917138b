"""Bad input at the caller: a clear error at the call, and nothing left in the broker."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from celeriac import Celery, Task
from celeriac.app import calling
from celeriac.exceptions import EncodeError, ImproperlyConfigured, UnknownOptionError


@pytest.fixture
def app() -> Iterator[Celery]:
    name = uuid.uuid4().hex
    app = Celery(
        "calls", broker=f"memory://{name}", backend=f"memory://{name}", set_as_current=False
    )
    yield app
    app.close()


@pytest.fixture
def add(app: Celery) -> Task[Any, Any]:
    @app.task
    def add(x: Any, y: Any = 0) -> Any:
        return x + y

    return add


def waiting(app: Celery, queue: str = "celery") -> int:
    """Messages the broker holds in ``queue`` (delayed ones included)."""

    async def size() -> int:
        return await (await app.abroker()).size(queue)

    return app.run_sync(size())


class Unserializable:
    pass


def test_a_good_call_is_counted(app: Celery, add: Task[Any, Any]) -> None:
    """The counting itself works: a valid call leaves one message, a delayed one too."""
    add.delay(1, 2)
    add.apply_async((1, 2), countdown=60)
    assert waiting(app) == 2


@pytest.mark.parametrize(
    ("value", "type_name"),
    [({1, 2}, "set"), (Unserializable(), "Unserializable"), (object(), "object")],
)
def test_arguments_that_do_not_serialize(
    app: Celery, add: Task[Any, Any], value: Any, type_name: str
) -> None:
    with pytest.raises(EncodeError, match=f"json cannot encode object of type {type_name}"):
        add.delay(value, 1)
    with pytest.raises(EncodeError, match=type_name):
        add.apply_async((1,), {"y": value})
    with pytest.raises(EncodeError, match=type_name):
        app.send_task("anything.at.all", [value])
    assert waiting(app) == 0


def test_arguments_that_do_not_serialize_with_the_chosen_serializer(
    app: Celery, add: Task[Any, Any]
) -> None:
    pytest.importorskip("msgpack")
    with pytest.raises(EncodeError):
        add.apply_async((datetime.now(UTC).date(), 1), serializer="msgpack")
    with pytest.raises(EncodeError, match=r"lambda|function"):
        add.apply_async((lambda: 1, 1), serializer="pickle")
    assert waiting(app) == 0


def test_async_callers_get_the_same_errors(app: Celery, add: Task[Any, Any]) -> None:
    import asyncio

    async def call() -> None:
        with pytest.raises(EncodeError, match="set"):
            await add.adelay({1}, 2)
        with pytest.raises(ImproperlyConfigured, match="countdown must not be negative"):
            await add.aapply_async((1, 2), countdown=-1)

    asyncio.run(call())
    assert waiting(app) == 0


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"countdown": -1}, ImproperlyConfigured, "countdown must not be negative.*use 0"),
        ({"countdown": -0.001}, ImproperlyConfigured, "countdown must not be negative"),
        ({"countdown": "10"}, ImproperlyConfigured, "countdown must be a finite number"),
        ({"countdown": True}, ImproperlyConfigured, "countdown must be a finite number"),
        ({"countdown": float("nan")}, ImproperlyConfigured, "countdown must be a finite number"),
        ({"countdown": float("inf")}, ImproperlyConfigured, "countdown must be a finite number"),
        ({"countdown": 1e300}, ImproperlyConfigured, "countdown of 1e.300 seconds is beyond"),
        (
            {"countdown": 5, "eta": datetime.now(UTC)},
            ImproperlyConfigured,
            "countdown or eta, not both",
        ),
        ({"eta": "2030-01-01T00:00:00"}, ImproperlyConfigured, "eta must be a datetime"),
        ({"eta": 1700000000}, ImproperlyConfigured, "eta must be a datetime"),
        ({"expires": "1h"}, ImproperlyConfigured, "expires must be a finite number"),
        ({"expires": float("nan")}, ImproperlyConfigured, "expires must be a finite number"),
        ({"countdown": 10, "expires": 5}, ImproperlyConfigured, "expires is not after eta"),
        ({"countdown": 10, "expires": 10}, ImproperlyConfigured, "expires is not after eta"),
        (
            {
                "eta": datetime.now(UTC) + timedelta(hours=2),
                "expires": datetime.now(UTC) + timedelta(hours=1),
            },
            ImproperlyConfigured,
            "expires is not after eta",
        ),
        ({"countdwn": 5}, UnknownOptionError, "unknown option 'countdwn'.*'countdown'"),
        ({"time_limit": -5}, ImproperlyConfigured, "time_limit must be a positive number"),
        ({"priority": 10}, ImproperlyConfigured, "priority must be an integer from 0 to 9"),
        ({"priority": "high"}, ImproperlyConfigured, "priority must be an integer"),
        ({"headers": {"id": "x"}}, ImproperlyConfigured, "replace the protocol header 'id'"),
        ({"headers": ["x"]}, ImproperlyConfigured, "headers must be a mapping"),
        ({"retry": "yes"}, ImproperlyConfigured, "retry must be True or False"),
        ({"retry_policy": 3}, ImproperlyConfigured, "retry_policy must be a dict"),
        (
            {"retry_policy": {"max_retries": -1}},
            ImproperlyConfigured,
            r"retry_policy\['max_retries'\] must be an integer >= 0",
        ),
        (
            {"retry_policy": {"interval_start": "soon"}},
            ImproperlyConfigured,
            r"retry_policy\['interval_start'\] must be seconds >= 0",
        ),
        (
            {"retry_policy": {"interval_stepp": 1}},
            ImproperlyConfigured,
            "retry_policy has unknown key",
        ),
        ({"link": "not a signature"}, ImproperlyConfigured, "link must be a signature"),
    ],
)
def test_bad_call_options(
    app: Celery, add: Task[Any, Any], options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        add.apply_async((1, 2), **options)
    with pytest.raises(error, match=message):
        app.send_task(add.name, (1, 2), **options)
    assert waiting(app) == 0


def test_bad_arguments_containers(app: Celery, add: Task[Any, Any]) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"args of .* must be a list or tuple"):
        app.send_task(add.name, "12")
    with pytest.raises(ImproperlyConfigured, match=r"kwargs of .* must be a mapping"):
        app.send_task(add.name, (), [("x", 1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"add.*unexpected keyword argument 'z'"):
        add.delay(1, z=2)
    assert waiting(app) == 0


def test_an_expiry_already_past_is_sent_to_be_revoked_with_a_warning(
    app: Celery, add: Task[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """As Celery: sent all the same (a deadline may pass while the caller works), with a warning;
    the worker records the task REVOKED without running it."""
    with caplog.at_level(logging.WARNING, logger="celeriac.app"):
        add.apply_async((1, 2), expires=datetime.now(UTC) - timedelta(seconds=1))
        add.apply_async((1, 2), expires=-5)
    assert waiting(app) == 2
    assert caplog.text.count("already past: it will be revoked, not run") == 2


# -- naive datetimes ------------------------------------------------------------------------------------


def _eta(app: Celery, value: datetime, what: str = "eta") -> datetime:
    outgoing = calling.build(app.conf, "t", (), {}, {what: value})
    result = outgoing.message.eta if what == "eta" else outgoing.message.expires
    assert result is not None and result.utcoffset() == timedelta(0)
    return result


def test_naive_datetimes_are_utc_with_enable_utc(app: Celery) -> None:
    naive = datetime(2031, 6, 1, 12, 0)
    assert _eta(app, naive) == naive.replace(tzinfo=UTC)
    assert _eta(app, naive, "expires") == naive.replace(tzinfo=UTC)
    app.conf.timezone = "Asia/Tokyo"  # enable_utc still on: naive is still UTC
    assert _eta(app, naive) == naive.replace(tzinfo=UTC)
    aware = datetime(2031, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert _eta(app, aware) == datetime(2031, 6, 1, 10, 0, tzinfo=UTC)


def test_naive_datetimes_are_in_the_timezone_without_enable_utc(app: Celery) -> None:
    app.conf.update(enable_utc=False, timezone="Asia/Tokyo")  # UTC+9, no daylight saving
    naive = datetime(2031, 6, 1, 12, 0)
    assert _eta(app, naive) == datetime(2031, 6, 1, 3, 0, tzinfo=UTC)
    assert _eta(app, naive, "expires") == datetime(2031, 6, 1, 3, 0, tzinfo=UTC)
    app.conf.timezone = "Mars/Olympus_Mons"
    with pytest.raises(ImproperlyConfigured, match="timezone 'Mars/Olympus_Mons' is not known"):
        _eta(app, naive)


def test_naive_datetimes_are_local_time_without_enable_utc_or_timezone(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's ``app.timezone`` is the system's local zone when enable_utc is off and no
    timezone is set."""
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    monkeypatch.setenv("TZ", "America/Bogota")  # UTC-5, no daylight saving
    time.tzset()
    try:
        app.conf.update(enable_utc=False)
        assert _eta(app, datetime(2031, 6, 1, 12, 0)) == datetime(2031, 6, 1, 17, 0, tzinfo=UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
