"""``AsyncResult``: the handle to a sent task's state and return value (Celery's API).

Every blocking method has an ``a``-prefixed coroutine twin for asyncio callers (``aget``,
``aready`` …). Exceptions are rebuilt from the result document without importing anything
(:func:`celeriac.backends.meta.exception_from_meta`).

:class:`GroupResult` (the result of a ``group``) holds one :class:`AsyncResult` per member; it reads
their documents in one batch and waits for them all at once
(:meth:`celeriac.backends.base.ResultBackend.wait_many`), never one after the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, overload

from celeriac import states
from celeriac.app.context import current_request
from celeriac.app.control import TERM_SIGNAME, refuse_broadcast_options
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
    #: The result of the task before this one in a chain (None for the first or a lone task).
    parent: _ResultBase | None = None

    def as_tuple(self) -> tuple[Any, ...]:
        """``((id, parent tuple), None)``: Celery's serializable form of a result and its parents."""
        parent = self.parent
        return (self.id, parent.as_tuple() if parent is not None else None), None

    def as_list(self) -> list[str]:
        """This result's id followed by the ids of its parents, nearest first."""
        ids = [self.id]
        if self.parent is not None:
            ids.extend(self.parent.as_list())
        return ids

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

    def __init__(
        self, id: str, app: Celery | None = None, parent: _ResultBase | None = None
    ) -> None:
        if app is None:
            from celeriac.app.shared import current_app

            app = current_app()
        self.id = id
        self.app = app
        self.parent = parent
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
        meta = self.app._read_result_sync(self.id)
        if meta is None:  # the store reads only through the portal
            return self.app.run_sync(self._ameta())
        if meta["status"] in states.READY_STATES:
            self._cache = meta
        return meta

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
        if self._cache is None:
            if disable_sync_subtasks:
                _refuse_inside_task()
            # Waited for on this thread where the store allows it, else through the portal.
            meta = self.app._wait_result_sync(self.id, timeout, interval)
            if meta is None:
                return self.app.run_sync(
                    self.aget(timeout=timeout, propagate=propagate, interval=interval)
                )
            self._cache = meta
        return self._outcome(propagate)

    async def aget(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5
    ) -> Any:
        """``get`` for asyncio callers."""
        if self._cache is None:
            backend = await self.app.aresult_store()
            self._cache = await backend.wait(self.id, timeout=timeout, interval=interval)
        return self._outcome(propagate)

    def _outcome(self, propagate: bool) -> Any:
        """The cached document's value, or its exception raised when ``propagate``."""
        meta = self._cache
        assert meta is not None
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

    def revoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str | int | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Revoke the task: ``app.control.revoke(self.id, terminate=..., signal=...)``.

        Returns once the revocation is stored for every worker. Celery's ``connection``, ``wait``
        and ``timeout`` concern its broadcast and its workers' replies, which celeriac has not.
        """
        self.app.run_sync(self.arevoke(connection, terminate, signal, wait, timeout))

    async def arevoke(
        self,
        connection: Any = None,
        terminate: bool = False,
        signal: str | int | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """``revoke`` for asyncio callers."""
        refuse_broadcast_options("revoke", connection=connection, wait=wait, timeout=timeout)
        self._cache = None
        await self.app.control.arevoke(
            self.id, terminate=terminate, signal=TERM_SIGNAME if signal is None else signal
        )

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


class ResultSet:  # noqa: PLW1641 - a mutable collection: unhashable, as a list is
    """Several results read and waited for together (Celery's ``ResultSet``).

    The documents of all members are read in one batch of the result store and waited for all at
    once; a finished member's document is kept by its :class:`AsyncResult`, so it is never read
    twice.
    """

    def __init__(self, results: Iterable[AsyncResult], app: Celery | None = None) -> None:
        self.results: list[AsyncResult] = list(results)
        self._app = app

    @property
    def app(self) -> Celery:
        """The app whose result store holds the members' documents."""
        if self._app is not None:
            return self._app
        if self.results:
            return self.results[0].app
        from celeriac.app.shared import current_app

        return current_app()

    # -- members -------------------------------------------------------------------------------

    def add(self, result: AsyncResult) -> None:
        """Add ``result`` unless it is already a member."""
        if result not in self.results:
            self.results.append(result)

    def update(self, results: Iterable[AsyncResult]) -> None:
        """Add each of ``results`` that is not already a member."""
        for result in results:
            self.add(result)

    def remove(self, result: AsyncResult | str) -> None:
        """Remove a member (a result or its id); KeyError if it is not one."""
        if isinstance(result, str):
            result = AsyncResult(result, app=self.app)
        try:
            self.results.remove(result)
        except ValueError:
            raise KeyError(result) from None

    def discard(self, result: AsyncResult | str) -> None:
        """Remove a member if it is one."""
        with contextlib.suppress(KeyError):
            self.remove(result)

    def clear(self) -> None:
        """Remove every member."""
        self.results.clear()

    def __iter__(self) -> Iterator[AsyncResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    @overload
    def __getitem__(self, index: int) -> AsyncResult: ...

    @overload
    def __getitem__(self, index: slice) -> list[AsyncResult]: ...

    def __getitem__(self, index: int | slice) -> AsyncResult | list[AsyncResult]:
        return self.results[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResultSet):
            return other.results == self.results
        return NotImplemented

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: [{', '.join(r.id for r in self.results)}]>"

    # -- states --------------------------------------------------------------------------------

    async def _ametas(self) -> list[dict[str, Any]]:
        """Every member's current document, in order: one batched read for those not finished."""
        unknown = [result for result in self.results if result._cache is None]
        fresh: dict[str, dict[str, Any]] = {}
        if unknown:
            backend = await self.app.aresult_store()
            ids = list(dict.fromkeys(result.id for result in unknown))
            fresh = dict(zip(ids, await backend.get_many(ids), strict=True))
            for result in unknown:
                if fresh[result.id]["status"] in states.READY_STATES:
                    result._cache = fresh[result.id]
        return [result._cache or fresh[result.id] for result in self.results]

    async def aready(self) -> bool:
        """``ready`` for asyncio callers."""
        return all(meta["status"] in states.READY_STATES for meta in await self._ametas())

    async def asuccessful(self) -> bool:
        """``successful`` for asyncio callers."""
        return all(meta["status"] == states.SUCCESS for meta in await self._ametas())

    async def afailed(self) -> bool:
        """``failed`` for asyncio callers."""
        return any(meta["status"] == states.FAILURE for meta in await self._ametas())

    async def awaiting(self) -> bool:
        """``waiting`` for asyncio callers."""
        return not await self.aready()

    async def acompleted_count(self) -> int:
        """``completed_count`` for asyncio callers."""
        return sum(meta["status"] == states.SUCCESS for meta in await self._ametas())

    def ready(self) -> bool:
        """Whether every member finished (SUCCESS, FAILURE or REVOKED)."""
        return self.app.run_sync(self.aready())

    def successful(self) -> bool:
        """Whether every member finished with SUCCESS."""
        return self.app.run_sync(self.asuccessful())

    def failed(self) -> bool:
        """Whether any member finished with FAILURE."""
        return self.app.run_sync(self.afailed())

    def waiting(self) -> bool:
        """Whether any member has not finished yet."""
        return self.app.run_sync(self.awaiting())

    def completed_count(self) -> int:
        """How many members finished with SUCCESS (Celery counts only successes)."""
        return self.app.run_sync(self.acompleted_count())

    # -- waiting -------------------------------------------------------------------------------

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.5,
        disable_sync_subtasks: bool = True,
    ) -> list[Any]:
        """Wait for every member and return their results, in the members' order.

        With ``propagate``, the first failure to arrive is raised at once (with its real type,
        as :meth:`AsyncResult.get` raises it); otherwise a failed member's place in the list
        holds its exception. :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds
        for the whole set. As for :meth:`AsyncResult.get`, a task may not wait for other tasks
        unless ``disable_sync_subtasks=False``.
        """
        if disable_sync_subtasks and any(result._cache is None for result in self.results):
            _refuse_inside_task()
        return self.app.run_sync(self.aget(timeout=timeout, propagate=propagate, interval=interval))

    join = get

    async def aget(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5
    ) -> list[Any]:
        """``get`` for asyncio callers."""
        if propagate:
            _raise_first_failure(self.results)
        waiting: dict[str, list[AsyncResult]] = {}
        for result in self.results:
            if result._cache is None:
                waiting.setdefault(result.id, []).append(result)
        if waiting:
            backend = await self.app.aresult_store()
            finished = backend.wait_many(list(waiting), timeout=timeout, interval=interval)
            async with contextlib.aclosing(finished):
                async for task_id, meta in finished:
                    for result in waiting[task_id]:
                        result._cache = meta
                    if propagate and meta["status"] in states.PROPAGATE_STATES:
                        raise AsyncResult._decode_result(meta)
        values = []
        for result in self.results:
            assert result._cache is not None
            values.append(AsyncResult._decode_result(result._cache))
        return values

    ajoin = aget

    def forget(self) -> None:
        """Remove every member's stored result."""
        self.app.run_sync(self.aforget())

    async def aforget(self) -> None:
        """``forget`` for asyncio callers."""
        for result in self.results:
            await result.aforget()


def _raise_first_failure(results: Iterable[AsyncResult]) -> None:
    """Raise the exception of the first member already known to have failed."""
    for result in results:
        meta = result._cache
        if meta is not None and meta["status"] in states.PROPAGATE_STATES:
            raise AsyncResult._decode_result(meta)


class GroupResult(ResultSet, _ResultBase):
    """The result of a ``group``: its id and one :class:`AsyncResult` per member, in order."""

    def __init__(
        self,
        id: str,
        results: Iterable[AsyncResult] = (),
        parent: _ResultBase | None = None,
        app: Celery | None = None,
    ) -> None:
        super().__init__(results, app)
        self.id = id
        self.parent = parent

    @property
    def children(self) -> list[AsyncResult]:
        """The members' results (Celery's name)."""
        return self.results

    def as_tuple(self) -> tuple[Any, ...]:
        """``((id, parent tuple), [member tuples])``: Celery's serializable form of a group."""
        parent = self.parent
        return (
            (self.id, parent.as_tuple() if parent is not None else None),
            [result.as_tuple() for result in self.results],
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GroupResult):
            return (
                other.id == self.id
                and other.results == self.results
                and other.parent == self.parent
            )
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def __bool__(self) -> bool:
        return bool(self.id or self.results)

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id} [{', '.join(r.id for r in self.results)}]>"
