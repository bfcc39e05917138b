"""Result documents and exception (de)serialization, checked against captures and real Celery."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import celery.exceptions  # type: ignore[import-untyped]
import pytest
from celery import Celery
from celery.app.task import Context  # type: ignore[import-untyped]

from celeriac import exceptions, states
from celeriac.backends.meta import (
    build_meta,
    ensure_serializable,
    exception_from_meta,
    exception_to_meta,
)

# -- documents vs. the captures of celery-wire.md §6.3 ------------------------------------------

CAPTURED_STARTED = (
    '{"status": "STARTED", "result": {"pid": 19007, "hostname": "w1@vm"}, "traceback": null, '
    '"children": [], "date_done": null, "name": "tasks.add", "args": [2, 3], "kwargs": {}, '
    '"worker": "w1@vm", "retries": 0, "queue": "celery", '
    '"task_id": "0af33d10-7b33-4661-b48e-5ee30bd656b2"}'
)
CAPTURED_SUCCESS = (
    '{"status": "SUCCESS", "result": 5, "traceback": null, "children": [], '
    '"date_done": "2026-11-23T22:09:48.266453+00:00", "name": "tasks.add", "args": [2, 3], '
    '"kwargs": {}, "worker": "w1@vm", "retries": 0, "queue": "celery", '
    '"task_id": "0af33d10-7b33-4661-b48e-5ee30bd656b2"}'
)
CAPTURED_FAILURE = (
    '{"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": ["bad thing"], '
    '"exc_module": "builtins"}, "traceback": "Traceback (most recent call last):\\n ...\\n'
    'ValueError: bad thing\\n", "children": [], "date_done": "2026-11-23T22:09:49.673213+00:00", '
    '"task_id": "1983cb84-8157-4ab2-ad0a-0aecbe1b3118"}'
)
CAPTURED_NOT_REGISTERED = (
    '{"status": "FAILURE", "result": {"exc_type": "NotRegistered", "exc_message": ["tasks.nope"], '
    '"exc_module": "celery.exceptions"}, "traceback": null, "children": [], '
    '"date_done": "2026-11-23T22:10:13.488723+00:00", "name": null, "args": null, '
    '"kwargs": null, "worker": null, "retries": null, "queue": null, '
    '"task_id": "66e731db-e7ee-4cdb-85f9-7eefe40fafcb"}'
)
EXTENDED_ADD = {
    "name": "tasks.add",
    "args": [2, 3],
    "kwargs": {},
    "worker": "w1@vm",
    "retries": 0,
    "queue": "celery",
}


def assert_same_document(ours: dict[str, Any], captured: str) -> None:
    expected = json.loads(captured)
    assert list(ours) == list(expected)  # key order included
    for key, value in expected.items():
        assert ours[key] == value, key
    # json.dumps with default separators is what kombu writes: byte-identical documents.
    assert json.dumps(ours) == captured


def test_started_document_matches_capture() -> None:
    meta = build_meta(
        "0af33d10-7b33-4661-b48e-5ee30bd656b2",
        states.STARTED,
        {"pid": 19007, "hostname": "w1@vm"},
        extended=EXTENDED_ADD,
    )
    assert_same_document(meta, CAPTURED_STARTED)


def test_success_document_matches_capture() -> None:
    meta = build_meta(
        "0af33d10-7b33-4661-b48e-5ee30bd656b2",
        states.SUCCESS,
        5,
        date_done=datetime(2026, 11, 23, 22, 9, 48, 266453, tzinfo=UTC),
        extended=EXTENDED_ADD,
    )
    assert_same_document(meta, CAPTURED_SUCCESS)


def test_failure_document_matches_capture() -> None:
    meta = build_meta(
        "1983cb84-8157-4ab2-ad0a-0aecbe1b3118",
        states.FAILURE,
        ValueError("bad thing"),
        traceback="Traceback (most recent call last):\n ...\nValueError: bad thing\n",
        date_done=datetime(2026, 11, 23, 22, 9, 49, 673213, tzinfo=UTC),
    )
    assert_same_document(meta, CAPTURED_FAILURE)


def test_not_registered_document_matches_capture() -> None:
    meta = build_meta(
        "66e731db-e7ee-4cdb-85f9-7eefe40fafcb",
        states.FAILURE,
        exceptions.NotRegistered("tasks.nope"),
        date_done=datetime(2026, 11, 23, 22, 10, 13, 488723, tzinfo=UTC),
        extended={},  # result_extended on, nothing known: every field null
    )
    assert_same_document(meta, CAPTURED_NOT_REGISTERED)


def test_date_done_is_now_utc_for_ready_states_only() -> None:
    before = datetime.now(UTC)
    for status in states.READY_STATES:
        done = build_meta("t", status)["date_done"]
        assert done.endswith("+00:00")
        parsed = datetime.fromisoformat(done)
        assert before - timedelta(seconds=1) <= parsed <= datetime.now(UTC)
    for status in (states.STARTED, states.RETRY, "PROGRESS"):
        assert build_meta("t", status)["date_done"] is None


def test_date_done_is_converted_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    meta = build_meta("t", states.SUCCESS, date_done=datetime(2026, 1, 1, 12, 0, tzinfo=plus_two))
    assert meta["date_done"] == "2026-01-01T10:00:00+00:00"
    naive = build_meta("t", states.SUCCESS, date_done=datetime(2026, 1, 1, 12, 0))
    assert naive["date_done"] == "2026-01-01T12:00:00+00:00"


def test_group_and_parent_ids_and_extra_extended_fields() -> None:
    meta = build_meta(
        "t",
        states.SUCCESS,
        1,
        children=[[["c", None], None]],
        group_id="g",
        parent_id="p",
        extended={**EXTENDED_ADD, "stamped_headers": ["x"], "x": 1},
    )
    assert list(meta) == [
        "status",
        "result",
        "traceback",
        "children",
        "date_done",
        "group_id",
        "parent_id",
        "name",
        "args",
        "kwargs",
        "worker",
        "retries",
        "queue",
        "stamped_headers",
        "x",
        "task_id",
    ]
    assert meta["children"] == [[["c", None], None]]
    no_ids = build_meta("t", states.SUCCESS, 1)
    assert "group_id" not in no_ids
    assert "parent_id" not in no_ids
    assert no_ids["children"] == []


@pytest.mark.parametrize(("task_id", "status"), [("", "SUCCESS"), (None, "SUCCESS"), ("t", "")])
def test_build_meta_rejects_missing_id_or_status(task_id: Any, status: str) -> None:
    with pytest.raises(exceptions.EncodeError, match="non-empty"):
        build_meta(task_id, status)


# -- exception_to_meta -------------------------------------------------------------------------


class CustomError(Exception):
    class Nested(Exception):
        pass


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_exception_to_meta_builtins() -> None:
    assert exception_to_meta(ValueError("bad thing")) == {
        "exc_type": "ValueError",
        "exc_message": ["bad thing"],
        "exc_module": "builtins",
    }
    assert exception_to_meta(KeyError("again")) == {
        "exc_type": "KeyError",
        "exc_message": ["again"],
        "exc_module": "builtins",
    }


def test_exception_to_meta_custom_and_nested_classes() -> None:
    assert exception_to_meta(CustomError("x", 1)) == {
        "exc_type": "CustomError",
        "exc_message": ["x", 1],
        "exc_module": __name__,
    }
    assert exception_to_meta(CustomError.Nested())["exc_type"] == "CustomError.Nested"


def test_exception_to_meta_replaces_unserializable_args_by_repr() -> None:
    meta = exception_to_meta(
        ValueError(Opaque(), {1: "int key"}, ("a", Opaque()), b"raw", BadRepr())
    )
    assert meta["exc_message"] == [
        "<Opaque>",
        "{1: 'int key'}",
        ["a", "<Opaque>"],
        "b'raw'",
        "<unrepresentable BadRepr object>",
    ]
    json.dumps(meta)  # and the whole thing is JSON


def test_ensure_serializable_keeps_json_values_and_survives_cycles() -> None:
    value = {"a": [1, 2.5, True, None, "s"], "b": {"c": []}}
    assert ensure_serializable(value) == value
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    json.dumps(ensure_serializable(cyclic))  # bounded depth, ends in a repr string


def test_celery_compatible_classes_are_written_under_celery_exceptions() -> None:
    for name, cls in exceptions.CELERY_COMPATIBLE.items():
        meta = exception_to_meta(cls.__new__(cls))
        assert meta["exc_module"] == "celery.exceptions"
        assert meta["exc_type"] == name
    # celeriac-only classes keep their own module
    assert exception_to_meta(exceptions.ContentDisallowed("x"))["exc_module"] == (
        "celeriac.exceptions"
    )


def test_remote_task_error_is_written_as_the_remote_exception() -> None:
    remote = exceptions.RemoteTaskError("MyError", "mymod", ["the message"])
    assert exception_to_meta(remote) == {
        "exc_type": "MyError",
        "exc_message": ["the message"],
        "exc_module": "mymod",
    }


# -- exception_from_meta -----------------------------------------------------------------------


def doc(exc_type: Any, exc_module: Any, exc_message: Any) -> dict[str, Any]:
    return {"exc_type": exc_type, "exc_message": exc_message, "exc_module": exc_module}


def test_builtins_are_rebuilt() -> None:
    exc = exception_from_meta(doc("ValueError", "builtins", ["bad thing"]))
    assert type(exc) is ValueError
    assert exc.args == ("bad thing",)
    key = exception_from_meta(doc("KeyError", "builtins", "again"))  # non-list message
    assert type(key) is KeyError
    assert key.args == ("again",)


def test_celery_exception_names_become_celeriac_classes() -> None:
    exc = exception_from_meta(doc("NotRegistered", "celery.exceptions", ["tasks.nope"]))
    assert type(exc) is exceptions.NotRegistered
    assert exc.args == ("tasks.nope",)
    revoked = exception_from_meta(doc("TaskRevokedError", "celery.exceptions", ["revoked"]))
    assert type(revoked) is exceptions.TaskRevokedError
    # what a real Celery worker writes for a time limit: the class's defining module
    limit = exception_from_meta(doc("TimeLimitExceeded", "billiard.exceptions", [30]))
    assert type(limit) is exceptions.TimeLimitExceeded
    own = exception_from_meta(doc("ContentDisallowed", "celeriac.exceptions", ["x"]))
    assert type(own) is exceptions.ContentDisallowed


def test_round_trip_of_every_celery_compatible_class() -> None:
    for cls in exceptions.CELERY_COMPATIBLE.values():
        original = cls.__new__(cls)
        original.args = ("a",)
        rebuilt = exception_from_meta(exception_to_meta(original))
        assert type(rebuilt) is cls


def test_class_of_an_imported_module_is_rebuilt() -> None:
    exc = exception_from_meta(doc("CustomError", __name__, ["x", 1]))
    assert type(exc) is CustomError
    assert exc.args == ("x", 1)
    nested = exception_from_meta(doc("CustomError.Nested", __name__, []))
    assert type(nested) is CustomError.Nested
    import json.decoder

    decode = exception_from_meta(doc("JSONDecodeError", "json.decoder", ["msg", "doc", 0]))
    assert type(decode) is json.decoder.JSONDecodeError


def test_module_not_imported_is_never_imported(tmp_path: Path) -> None:
    # A module on sys.path whose import would leave a trace, in a fresh interpreter so the check
    # does not depend on what this test process imported.
    (tmp_path / "celeriac_canary_mod.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(tmp_path / 'imported')!r}).write_text('yes')\n"
        "class Boom(Exception):\n    pass\n"
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from celeriac.backends.meta import exception_from_meta
        from celeriac.exceptions import RemoteTaskError
        for module, name in [("celeriac_canary_mod", "Boom"), ("xml.dom.minidom", "Node"),
                             ("celeriac_no_such_module", "Boom")]:
            assert module not in sys.modules, module
            exc = exception_from_meta(
                {{"exc_type": name, "exc_module": module, "exc_message": ["echo pwned"]}}
            )
            assert type(exc) is RemoteTaskError, (module, exc)
            assert module not in sys.modules, module
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert not (tmp_path / "imported").exists()


def test_module_not_imported_in_this_process() -> None:
    name = "xml.dom.minidom"
    if name in sys.modules:  # pragma: no cover - depends on what else the run imported
        pytest.skip(f"{name} already imported in this process")
    exc = exception_from_meta(doc("Node", name, ["x"]))
    assert isinstance(exc, exceptions.RemoteTaskError)
    assert name not in sys.modules


@pytest.mark.parametrize(
    ("exc_type", "exc_module"),
    [
        ("print", "builtins"),  # a function
        ("dict", "builtins"),  # a class, not an exception
        ("system", "os"),  # CVE-2021-23727
        ("loads", "json"),
        ("SystemExit", "builtins"),  # would stop the reader
        ("KeyboardInterrupt", "builtins"),
        ("CancelledError", "asyncio.exceptions"),  # would cancel the awaiting task
        ("ChordError", "celery.exceptions.nonexistent"),
        ("__class__", "builtins"),
        ("path.join", "os"),
        ("", "builtins"),
    ],
)
def test_non_exception_objects_become_remote_task_error(exc_type: str, exc_module: str) -> None:
    exc = exception_from_meta(doc(exc_type, exc_module, ["rm -rf /"]))
    assert type(exc) is exceptions.RemoteTaskError


def test_remote_task_error_reads_like_the_remote_exception() -> None:
    exc = exception_from_meta(doc("MyError", "mymod", ["the message"]))
    assert isinstance(exc, exceptions.RemoteTaskError)
    assert str(exc) == "mymod.MyError: the message"
    assert (exc.exc_type, exc.exc_module, exc.exc_args) == ("MyError", "mymod", ["the message"])


def test_failed_instantiation_becomes_remote_task_error() -> None:
    # UnicodeDecodeError needs five arguments of precise types.
    exc = exception_from_meta(doc("UnicodeDecodeError", "builtins", ["only one"]))
    assert isinstance(exc, exceptions.RemoteTaskError)
    assert str(exc) == "builtins.UnicodeDecodeError: only one"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "a plain string",
        42,
        ["ValueError", "builtins"],
        {},
        {"exc_module": "builtins"},
        {"exc_type": 3, "exc_module": "builtins"},
        {"exc_type": ["ValueError"], "exc_module": "builtins"},
        {"exc_type": "ValueError", "exc_module": 5, "exc_message": []},
    ],
)
def test_garbage_values_become_remote_task_error(value: Any) -> None:
    exc = exception_from_meta(value)
    assert type(exc) is exceptions.RemoteTaskError
    assert str(exc)  # says something


def test_exception_objects_pass_through() -> None:
    original = ValueError("pickled")
    assert exception_from_meta(original) is original


def test_missing_exc_message_and_no_module() -> None:
    exc = exception_from_meta({"exc_type": "ValueError", "exc_module": "builtins"})
    assert type(exc) is ValueError
    assert exc.args == ()
    nomod = exception_from_meta({"exc_type": "ValueError", "exc_message": ["m"]})
    assert isinstance(nomod, exceptions.RemoteTaskError)
    assert str(nomod) == "ValueError: m"


# -- cross-checks with the real Celery ---------------------------------------------------------


@pytest.fixture(scope="module")
def celery_backend() -> Any:
    app = Celery("xcheck", set_as_current=False, backend="cache+memory://")
    app.conf.result_serializer = "json"
    app.conf.result_extended = True
    return app.backend


def test_document_written_by_celery_decodes_with_ours(celery_backend: Any) -> None:
    request = Context(
        id="t-celery",
        task="tasks.add",
        args=[2, 3],
        kwargs={},
        hostname="w1@vm",
        retries=0,
        delivery_info={"routing_key": "celery"},
        group="g1",
        parent_id="p1",
    )
    celery_backend.store_result(
        "t-celery",
        CustomError("bad thing", 3, Opaque()),
        states.FAILURE,
        traceback="tb",
        request=request,
    )
    raw = celery_backend.get(celery_backend.get_key_for_task("t-celery"))
    stored = json.loads(raw)
    exc = exception_from_meta(stored["result"])
    assert type(exc) is CustomError
    assert exc.args == ("bad thing", 3, "<Opaque>")
    # Our document for the same task has Celery's keys in Celery's order and the same values.
    ours = build_meta(
        "t-celery",
        states.FAILURE,
        CustomError("bad thing", 3, Opaque()),
        traceback="tb",
        group_id="g1",
        parent_id="p1",
        date_done=datetime.fromisoformat(stored["date_done"]),
        extended=EXTENDED_ADD,
    )
    assert list(ours) == list(stored)
    assert ours == stored


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad thing"), KeyError("again"), CustomError("x", 1), CustomError.Nested("n")],
)
def test_celery_prepare_exception_matches_ours(celery_backend: Any, exc: BaseException) -> None:
    assert celery_backend.prepare_exception(exc) == exception_to_meta(exc) | {
        "exc_message": tuple(exception_to_meta(exc)["exc_message"])
    }


@pytest.mark.parametrize(
    "exc", [ValueError("bad thing"), KeyError("again"), CustomError("x", 1), OSError(2, "gone")]
)
def test_celery_rebuilds_our_exceptions(celery_backend: Any, exc: BaseException) -> None:
    rebuilt = celery_backend.exception_to_python(json.loads(json.dumps(exception_to_meta(exc))))
    assert type(rebuilt) is type(exc)
    assert rebuilt.args == exc.args


@pytest.mark.parametrize(
    ("ours", "args"),
    [
        (exceptions.NotRegistered("tasks.nope"), ("tasks.nope",)),
        (exceptions.TaskRevokedError("revoked"), ("revoked",)),
        (exceptions.TimeLimitExceeded(30.0), (30.0,)),
        (exceptions.SoftTimeLimitExceeded(), ()),
        (exceptions.MaxRetriesExceededError("too many"), ("too many",)),
    ],
)
def test_celery_rebuilds_our_celery_compatible_classes_as_its_own(
    celery_backend: Any, ours: BaseException, args: tuple[Any, ...]
) -> None:
    rebuilt = celery_backend.exception_to_python(json.loads(json.dumps(exception_to_meta(ours))))
    expected_cls = getattr(celery.exceptions, type(ours).__name__)
    assert type(rebuilt) is expected_cls
    assert rebuilt.args == args


def test_celery_classes_read_back_as_ours(celery_backend: Any) -> None:
    for name in ("NotRegistered", "TaskRevokedError", "TimeLimitExceeded", "WorkerLostError"):
        cls = getattr(celery.exceptions, name)
        written = json.loads(json.dumps(celery_backend.prepare_exception(cls("why"))))
        rebuilt = exception_from_meta(written)
        assert type(rebuilt) is exceptions.CELERY_COMPATIBLE[name], written
        assert rebuilt.args == ("why",)
