"""The app layer: configuration, the alias table, task options, calling options, eager runs."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from celeriac import Celery, EagerResult, shared_task, signature, states
from celeriac.app import aliases, calling
from celeriac.app.config import SETTING_NAMES, Settings, setting_docs
from celeriac.exceptions import ImproperlyConfigured, NotRegistered, UnknownOptionError


def make_app(**settings: Any) -> Celery:
    return Celery(
        "unit", broker="memory://unit", backend="memory://unit", set_as_current=False, **settings
    )


# -- configuration -----------------------------------------------------------------------------


def test_defaults_are_celerys_except_where_unsafe() -> None:
    conf = Settings()
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.result_expires == 86400.0
    assert conf.task_default_queue == "celery"
    assert conf.task_acks_late is True  # Celery: False
    assert conf.worker_prefetch_multiplier == 4
    assert conf.enable_utc is True


def test_unknown_setting_names_the_closest(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = Settings()
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'task_serializer'"):
        conf.task_serializr = "json"
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'result_expires'"):
        conf.update(result_expire=10)
    with pytest.raises(ImproperlyConfigured, match="Did you mean 'broker_url'"):
        Celery("x", set_as_current=False, brokr_url="memory://")
    with pytest.raises(ImproperlyConfigured):
        _ = conf["no_such_setting"]


def test_update_validates_everything_before_changing_anything() -> None:
    conf = Settings()
    with pytest.raises(ImproperlyConfigured, match="worker_prefetch_multiplier"):
        conf.update(task_serializer="msgpack", worker_prefetch_multiplier=0)
    assert conf.task_serializer == "json"


def test_values_are_coerced_and_checked() -> None:
    conf = Settings()
    conf.result_expires = timedelta(hours=2)
    assert conf.result_expires == 7200.0
    conf.accept_content = "json, msgpack"  # type: ignore[assignment]
    assert conf.accept_content == ["json", "msgpack"]
    with pytest.raises(ImproperlyConfigured, match="task_acks_late must be True or False"):
        conf.task_acks_late = "yes"  # type: ignore[assignment]
    with pytest.raises(ImproperlyConfigured, match="must not be negative"):
        conf.result_expires = -1


def test_every_setting_is_documented() -> None:
    docs = setting_docs()
    assert {name for name, _, _ in docs} == SETTING_NAMES
    assert all(len(text) > 10 for _, _, text in docs)


class _ConfigObject:
    task_serializer = "msgpack"
    result_expires = 60
    task_default_queue = "work"


def test_config_from_object_and_envvar(monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app()
    app.config_from_object(_ConfigObject)
    assert app.conf.task_serializer == "msgpack"
    assert app.conf.task_default_queue == "work"

    class OldStyle:
        CELERY_TASK_SERIALIZER = "json"

    with pytest.raises(ImproperlyConfigured, match="task_serializer"):
        app.config_from_object(OldStyle)
    monkeypatch.setenv("UNIT_CONFIG", "tests.unit.test_app:_ConfigObject")
    fresh = make_app()
    fresh.config_from_envvar("UNIT_CONFIG")
    assert fresh.conf.result_expires == 60.0
    with pytest.raises(ImproperlyConfigured, match="not set"):
        fresh.config_from_envvar("UNIT_CONFIG_MISSING")
    fresh.config_from_envvar("UNIT_CONFIG_MISSING", silent=True)


def test_urls_come_from_settings_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CELERIAC_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERIAC_RESULT_BACKEND", raising=False)
    conf = Settings()
    assert conf.resolved_broker_url() == "sqlite:///celeriac-broker.sqlite3"
    assert conf.resolved_result_backend() == "sqlite:///celeriac-results.sqlite3"
    monkeypatch.setenv("CELERIAC_BROKER_URL", "memory://env")
    monkeypatch.setenv("CELERIAC_RESULT_BACKEND", "memory://envres")
    assert conf.resolved_broker_url() == "memory://env"
    assert conf.resolved_result_backend() == "memory://envres"
    conf.broker_url = "sqlite:///explicit.sqlite3"
    assert conf.resolved_broker_url() == "sqlite:///explicit.sqlite3"


# -- the alias table -------------------------------------------------------------------------------


def test_every_alias_imports() -> None:
    for table in (aliases.BROKER_ALIASES, aliases.BACKEND_ALIASES):
        for target in table.values():
            module, _, name = target.partition(":")
            assert isinstance(getattr(importlib.import_module(module), name), type)


def test_unknown_or_missing_schemes_are_clear() -> None:
    with pytest.raises(ImproperlyConfigured, match="No broker transport for nope://"):
        aliases.broker_class("nope://x")
    with pytest.raises(ImproperlyConfigured, match="for results use rpc:// or redis://"):
        aliases.backend_class("amqp://")
    with pytest.raises(ImproperlyConfigured, match="is not a URL"):
        aliases.broker_class("just-a-path")


# -- tasks ---------------------------------------------------------------------------------------------


def test_task_names_options_and_local_calls() -> None:
    app = make_app()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="custom.name", queue="q1", ignore_result=True, bind=True)
    def bound(self: Any, x: int) -> tuple[str, int]:
        return self.name, x

    assert add.name == f"{__name__}.add"
    assert app.tasks[add.name] is add
    assert add(2, 3) == 5
    assert bound(7) == ("custom.name", 7)
    assert bound.queue == "q1" and bound.resolved_ignore_result() is True
    with pytest.raises(NotRegistered):
        app.tasks["nope"]


def test_unknown_task_option_fails_at_decoration() -> None:
    app = make_app()
    with pytest.raises(UnknownOptionError, match="Did you mean 'max_retries'"):

        @app.task(max_retrys=3)
        def f() -> None: ...


def test_apply_runs_eagerly_sync_and_async() -> None:
    app = make_app()

    @app.task
    def div(x: float, y: float) -> float:
        return x / y

    @app.task
    async def adouble(x: int) -> int:
        return x * 2

    ok = div.apply((6, 3))
    assert isinstance(ok, EagerResult) and ok.get() == 2 and ok.state == states.SUCCESS
    bad = div.apply((1, 0))
    assert bad.failed() and isinstance(bad.result, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        bad.get()
    assert adouble.apply((21,)).get() == 42


def test_signatures_are_celery_wire_dicts() -> None:
    app = make_app()

    @app.task
    def mul(x: int, y: int) -> int:
        return x * y

    sig = mul.s(10)
    assert dict(sig.as_wire()) == {
        "task": f"{__name__}.mul",
        "args": [10],
        "kwargs": {},
        "options": {},
        "subtask_type": None,
        "immutable": False,
    }
    assert mul.si(1, 2).immutable
    assert sig.clone((3,)).args == [3, 10]  # new partial args go first, as in Celery
    assert sig.apply((4,)).get() == 40
    rebuilt = signature(sig.as_wire(), app=app)
    assert rebuilt.task == sig.task and rebuilt.args == [10]


def test_shared_task_registers_on_every_app() -> None:
    @shared_task
    def shared_add(x: int, y: int) -> int:
        return x + y

    later = make_app()
    assert f"{__name__}.shared_add" in later.tasks
    assert shared_add(1, 2) == 3


# -- calling options -----------------------------------------------------------------------------------


def test_call_options_are_checked_and_normalized() -> None:
    app = make_app()
    conf = app.conf
    with pytest.raises(UnknownOptionError, match="Did you mean 'countdown'"):
        calling.build(conf, "t", [], {}, {"countdwn": 3})
    with pytest.raises(ImproperlyConfigured, match="countdown must not be negative"):
        calling.build(conf, "t", [], {}, {"countdown": -1})
    with pytest.raises(ImproperlyConfigured, match="expires is not after eta"):
        calling.build(conf, "t", [], {}, {"countdown": 10, "expires": 5})
    with pytest.raises(ImproperlyConfigured, match="would replace the protocol header 'id'"):
        calling.build(conf, "t", [], {}, {"headers": {"id": "forged"}})
    assert calling.build(
        conf, "t", [], {}, {"headers": {"x-custom": "v"}}
    ).message.extra_headers == {"x-custom": "v"}
    with pytest.raises(ImproperlyConfigured, match="priority"):
        calling.build(conf, "t", [], {}, {"priority": 10})
    naive = datetime(2030, 1, 1, 12, 0)
    out = calling.build(conf, "t", [1], {}, {"eta": naive, "queue": "q", "priority": 3})
    assert out.message.eta == naive.replace(tzinfo=UTC)
    assert out.route.exchange == "" and out.route.routing_key == "q"
    assert out.not_before == naive.replace(tzinfo=UTC).timestamp()
    assert out.message.priority == 3 and out.message.root_id == out.message.id


def test_naive_eta_uses_timezone_when_utc_is_off() -> None:
    app = make_app(enable_utc=False, timezone="Europe/Paris")
    out = calling.build(app.conf, "t", [], {}, {"eta": datetime(2030, 7, 1, 12, 0)})
    assert out.message.eta == datetime(2030, 7, 1, 10, 0, tzinfo=UTC)


def test_routes_choose_the_queue() -> None:
    app = make_app(task_routes={"billing.*": {"queue": "billing"}, "exact.name": "exact"})
    assert calling.build(app.conf, "billing.charge", [], {}, {}).route.queue == "billing"
    assert calling.build(app.conf, "exact.name", [], {}, {}).route.queue == "exact"
    assert calling.build(app.conf, "other", [], {}, {}).route.queue == "celery"
    assert calling.build(app.conf, "billing.charge", [], {}, {"queue": "vip"}).route.queue == "vip"


def test_arguments_are_checked_before_sending() -> None:
    app = make_app()

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="missing a required argument"):
        add.delay(1)


def test_unserializable_arguments_fail_at_the_caller() -> None:
    app = make_app()

    @app.task
    def echo(x: Any) -> Any:
        return x

    from celeriac.exceptions import EncodeError

    with pytest.raises(EncodeError):
        echo.delay(object())
    app.close()


@pytest.mark.parametrize("url", ["memory:/x", "memory://a/b", "memory://a?x=1", "memory://a#f"])
def test_memory_urls_are_plain_names_for_broker_and_result_store(url: str) -> None:
    from celeriac.backends.base import BackendOptions
    from celeriac.backends.memory import MemoryBackend
    from celeriac.brokers.base import BrokerOptions
    from celeriac.brokers.memory import MemoryBroker

    with pytest.raises(ImproperlyConfigured, match="memory broker"):
        MemoryBroker(url, BrokerOptions())
    with pytest.raises(ImproperlyConfigured, match="memory result store"):
        MemoryBackend(url, BackendOptions())
