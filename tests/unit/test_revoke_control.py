"""app.control.revoke and AsyncResult.revoke: Celery's signatures, where revocations are kept,
and a clear error for every input celeriac cannot honour."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest

from celeriac import Celery, states
from celeriac.app.control import revocation_store, signal_name, signal_number
from celeriac.backends.meta import build_meta
from celeriac.brokers._revocations import MemoryRevocations, RevocationStore
from celeriac.brokers._revocations_sqlite import SQLiteRevocations
from celeriac.exceptions import ImproperlyConfigured, TaskRevokedError
from tests import services


def memory_app() -> Celery:
    name = uuid.uuid4().hex
    return Celery(
        "ctl", broker=f"memory://{name}", backend=f"memory://{name}", set_as_current=False
    )


def stored(app: Celery) -> list[tuple[str, bool, str | None]]:
    store = revocation_store(app)
    assert store is not None

    async def load() -> list[tuple[str, bool, str | None]]:
        await store.connect()
        try:
            found, _ = await store.read(None, 0)
        finally:
            await store.close()
        return [(r.task_id, r.terminate, r.signal) for r in found]

    return asyncio.run(load())


def test_revoke_takes_an_id_or_a_list_and_celerys_signal_names() -> None:
    app = memory_app()
    app.control.revoke("a")
    app.control.revoke(["b", "c", "b"], terminate=True, signal="KILL")
    app.AsyncResult("d").revoke(terminate=True)
    app.control.terminate("e", signal=2)
    assert stored(app) == [
        ("a", False, None),
        ("b", True, "SIGKILL"),
        ("c", True, "SIGKILL"),
        ("d", True, "SIGTERM"),
        ("e", True, "SIGINT"),
    ]
    app.control.revoke([])  # nothing to revoke: nothing stored
    assert len(stored(app)) == 5


def test_signal_names() -> None:
    assert signal_name("SIGTERM") == signal_name("TERM") == signal_name("term") == "SIGTERM"
    assert signal_name(9) == "SIGKILL"
    assert signal_number("SIGKILL") == 9
    for bad in ("SIGNOPE", "", 0, 10_000, True, None, 1.5):
        with pytest.raises(ValueError, match="unknown signal"):
            signal_name(bad)


def test_bad_input_is_refused_before_anything_is_stored() -> None:
    app = memory_app()
    with pytest.raises(ValueError, match="unknown signal"):
        app.control.revoke("a", terminate=True, signal="SIGNOPE")
    with pytest.raises(TypeError, match="task id"):
        app.control.revoke(["a", ""])
    with pytest.raises(TypeError, match="task id"):
        app.control.revoke(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="terminate must be True or False"):
        app.control.revoke("a", terminate="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"destination=.*broadcast"):
        app.control.revoke("a", destination=["celeriac@host"])
    with pytest.raises(ValueError, match="reply=True"):
        app.control.revoke("a", reply=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'terminat'"):
        app.control.revoke("a", terminat=True)
    with pytest.raises(ValueError, match="wait=True"):
        app.AsyncResult("a").revoke(wait=True)
    assert stored(app) == []


def test_revoke_stores_revoked_unless_the_result_is_ready() -> None:
    app = memory_app()
    backend = app.backend
    app.run_sync(backend.store(build_meta("done", states.SUCCESS, 3)))
    app.run_sync(backend.store(build_meta("failed", states.FAILURE, ValueError("x"))))
    app.run_sync(backend.store(build_meta("started", states.STARTED, None)))
    app.control.revoke(["done", "failed", "started", "pending"])
    assert app.AsyncResult("done").get(timeout=1) == 3
    assert app.AsyncResult("failed").state == states.FAILURE
    for task_id in ("started", "pending"):
        result = app.AsyncResult(task_id)
        assert result.state == states.REVOKED
        with pytest.raises(TaskRevokedError, match="revoked"):
            result.get(timeout=1)
    # The revocation is stored even where the result was ready: it costs nothing and is honest.
    assert [task_id for task_id, _, _ in stored(app)] == ["done", "failed", "started", "pending"]


def test_revocations_expire_after_worker_revoke_expires() -> None:
    app = memory_app()
    app.conf.worker_revoke_expires = 0.2
    app.control.revoke("short")
    assert [i for i, _, _ in stored(app)] == ["short"]
    time.sleep(0.3)
    assert stored(app) == []


def test_only_worker_revokes_max_are_kept() -> None:
    app = memory_app()
    app.conf.worker_revokes_max = 2
    for task_id in ("a", "b", "c"):
        app.control.revoke(task_id)
    assert [i for i, _, _ in stored(app)] == ["b", "c"]


def test_settings_are_checked() -> None:
    app = memory_app()
    assert app.conf.worker_revokes_max == 50_000
    assert app.conf.worker_revoke_expires == 10800.0
    with pytest.raises(ImproperlyConfigured, match="worker_revokes_max must be an integer >= 1"):
        app.conf.worker_revokes_max = 0
    with pytest.raises(ImproperlyConfigured, match="worker_revoke_expires must be more than 0"):
        app.conf.worker_revoke_expires = 0
    from datetime import timedelta

    app.conf.worker_revoke_expires = timedelta(hours=1)
    assert app.conf.worker_revoke_expires == 3600.0


def kind_of(store: RevocationStore | None) -> str:
    return "none" if store is None else type(store).__name__


def test_where_revocations_are_kept(tmp_path: Path) -> None:
    def app(broker: str, backend: str, **settings: object) -> Celery:
        return Celery("w", broker=broker, backend=backend, set_as_current=False, **settings)

    sqlite_broker = f"sqlite:///{tmp_path}/b.sqlite3"
    sqlite_results = f"sqlite:///{tmp_path}/r.sqlite3"
    # The broker keeps them when it can.
    store = revocation_store(app("memory://x", sqlite_results))
    assert isinstance(store, MemoryRevocations) and store.namespace == "broker:x"
    store = revocation_store(app(sqlite_broker, "memory://y"))
    assert isinstance(store, SQLiteRevocations)
    assert store.path == os.path.realpath(tmp_path / "b.sqlite3")
    redis_app = app(
        "redis://127.0.0.1:6379/3", "rpc://", broker_transport_options={"global_keyprefix": "p:"}
    )
    assert kind_of(revocation_store(redis_app)) == "RedisRevocations"
    assert revocation_store(redis_app).key == "p:_celeriac.revoked"  # type: ignore[union-attr]
    # RabbitMQ keeps no key-value data: the result store does.
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    store = revocation_store(app(amqp, sqlite_results))
    assert isinstance(store, SQLiteRevocations)
    assert os.path.realpath(store.path) == os.path.realpath(tmp_path / "r.sqlite3")
    store = revocation_store(app(amqp, "memory://z"))
    assert isinstance(store, MemoryRevocations) and store.namespace == "results:z"
    results_on_redis = app(
        amqp,
        "redis://127.0.0.1:6379/4",
        result_backend_transport_options={"global_keyprefix": "q"},
    )
    store = revocation_store(results_on_redis)
    assert kind_of(store) == "RedisRevocations"
    assert store.key == "q_celeriac.revoked"  # type: ignore[union-attr]
    assert "6379/4" in store.describe
    # Nothing can keep them with RabbitMQ and rpc:// results: a clear error, nothing connected.
    nowhere = app("amqp://guest:secret@127.0.0.1:1//", "rpc://")
    assert revocation_store(nowhere) is None
    with pytest.raises(ImproperlyConfigured, match="Redis or SQLite result store") as error:
        nowhere.control.revoke("a")
    assert "secret" not in str(error.value)


def test_the_worker_warns_when_revoke_is_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    """AMQP broker and rpc:// results: the worker says at start-up that revoke cannot work."""
    services.require_rabbitmq()
    from celeriac.contrib.testing import start_worker

    app = Celery(
        "nowhere",
        broker=services.amqp_url(),
        backend="rpc://",
        task_default_queue=services.unique("q"),
        set_as_current=False,
    )
    with start_worker(app):
        pass
    assert "Revoking tasks is not available" in caplog.text
    assert "Redis or SQLite result store" in caplog.text
