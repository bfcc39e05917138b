"""``AsyncResult``: the handle to a sent task's state and return value (Celery's API).

Every blocking method has an ``a``-prefixed coroutine twin for asyncio callers (``aget``,
``aready`` …). Exceptions are rebuilt from the result document without importing anything
(:func:`celeriac.backends.meta.exception_from_meta`).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.app.context import current_request
from celeriac.exceptions import TaskRevokedError

if TYPE_CHECKING:
    from celeriac.app.base import Celery


def _parse_date(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _refuse_inside_task() -> None:
    request = current_request.get()
    if request is not None and not request.is_eager:
        raise RuntimeError(
            "Never call result.get() within a task: it can deadlock the worker. Link the tasks "
            "(link=, signatures) or pass disable_sync_subtasks=False if you must."
        )


class _ResultBase:
    id: str

    @property
    def task_id(self) -> str:
        """Celery's older name for :attr:`id`."""
        return self.id

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _ResultBase):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented


class AsyncResult(_ResultBase):
    """The state and result of a task, read from the result store."""

    def __init__(self, id: str, app: Celery | None = None) -> None:
        if app is None:
            from celeriac.app.shared import current_app

            app = current_app()
        self.id = id
        self.app = app
        self._cache: dict[str, Any] | None = None

    # -- reading the document ----------------------------------------------------------------

    async def _ameta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        backend = await self.app.aresult_store()
        meta = await backend.get(self.id)
        if meta["status"] in states.READY_STATES:
            self._cache = meta
        return meta

    def _meta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        return self.app.run_sync(self._ameta())

    @property
    def state(self) -> str:
        """PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY or REVOKED."""
        return str(self._meta()["status"])

    status = state

    @property
    def result(self) -> Any:
        """The return value, or the exception for FAILURE/RETRY/REVOKED (not raised)."""
        return self._decode_result(self._meta())

    info = result

    @property
    def traceback(self) -> str | None:
        """The remote traceback text of a failure."""
        value = self._meta().get("traceback")
        return value if isinstance(value, str) else None

    @property
    def date_done(self) -> datetime | None:
        """When the task finished (UTC), for ready states."""
        return _parse_date(self._meta().get("date_done"))

    def ready(self) -> bool:
        """Whether the task finished (SUCCESS, FAILURE or REVOKED)."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        """Whether the task finished with SUCCESS."""
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        """Whether the task finished with FAILURE."""
        return self.state == states.FAILURE

    async def aready(self) -> bool:
        """``ready`` for asyncio callers."""
        return (await self._ameta())["status"] in states.READY_STATES

    async def astate(self) -> str:
        """``state`` for asyncio callers."""
        return str((await self._ameta())["status"])

    # -- waiting -----------------------------------------------------------------------------

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        disable_sync_subtasks: bool = True,
    ) -> Any:
        """Wait for the task to finish and return its result.

        A failure re-raises the task's exception (its real type where that is safe), unless
        ``propagate`` is False, in which case the exception is returned. Raises
        :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds.

        As in Celery, a task may not block on another task's result (it can deadlock a worker
        whose slots are all waiting): pass ``disable_sync_subtasks=False`` to allow it anyway,
        or link the tasks instead.
        """
        if disable_sync_subtasks and self._cache is None:
            _refuse_inside_task()
        return self.app.run_sync(self.aget(timeout=timeout, propagate=propagate, interval=interval))

    async def aget(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5
    ) -> Any:
        """``get`` for asyncio callers."""
        if self._cache is None:
            backend = await self.app.aresult_store()
            self._cache = await backend.wait(self.id, timeout=timeout, interval=interval)
        meta = self._cache
        value = self._decode_result(meta)
        if propagate and meta["status"] in states.PROPAGATE_STATES:
            raise value
        return value

    wait = get

    def forget(self) -> None:
        """Remove the stored result."""
        self._cache = None
        self.app.run_sync(self.aforget())

    async def aforget(self) -> None:
        """``forget`` for asyncio callers."""
        self._cache = None
        backend = await self.app.aresult_store()
        await backend.forget(self.id)

    @staticmethod
    def _decode_result(meta: dict[str, Any]) -> Any:
        from celeriac.backends.meta import exception_from_meta

        status = meta["status"]
        value = meta.get("result")
        if status in states.EXCEPTION_STATES:
            if status == states.REVOKED and not isinstance(value, dict | BaseException):
                return TaskRevokedError("revoked")
            return exception_from_meta(value)
        return value


class EagerResult(_ResultBase):
    """The result of a task run locally with ``Task.apply()``: already known, nothing stored."""

    def __init__(
        self,
        id: str,
        value: Any,
        state: str,
        traceback: str | None = None,
    ) -> None:
        self.id = id
        self._value = value
        self._state = state
        self._traceback = traceback
        self.date_done: datetime | None = None

    @property
    def state(self) -> str:
        """SUCCESS or FAILURE."""
        return self._state

    status = state

    @property
    def result(self) -> Any:
        """The return value or the exception."""
        return self._value

    info = result

    @property
    def traceback(self) -> str | None:
        """The traceback text of a failure."""
        return self._traceback

    def ready(self) -> bool:
        """Always True: the task already ran."""
        return True

    def successful(self) -> bool:
        """Whether the task succeeded."""
        return self._state == states.SUCCESS

    def failed(self) -> bool:
        """Whether the task raised."""
        return self._state == states.FAILURE

    def get(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5
    ) -> Any:
        """The result; re-raises the task's exception when ``propagate``."""
        del timeout, interval
        if propagate and self._state == states.FAILURE:
            raise self._value
        return self._value

    async def aget(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5
    ) -> Any:
        """``get`` for asyncio callers."""
        return self.get(timeout, propagate, interval)
