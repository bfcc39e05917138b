"""``Task``: a function registered with an app, callable locally or sent to workers.

``@app.task`` builds one subclass of :class:`Task` per function, as Celery does, so class-level
options (``queue``, ``serializer`` …) and ``base=`` inheritance work the way Celery users expect.
Options are checked against :data:`TASK_OPTIONS` when the decorator runs: a misspelled option is an
error there, not a silent no-op.
"""

from __future__ import annotations

import inspect
import traceback as tb
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar

from celeriac import states
from celeriac.app.canvas import Signature
from celeriac.app.context import Context, current_request
from celeriac.app.result import AsyncResult, EagerResult
from celeriac.exceptions import (
    ImproperlyConfigured,
    MaxRetriesExceededError,
    Retry,
    UnknownOptionError,
)
from celeriac.utils.suggest import did_you_mean

if TYPE_CHECKING:
    from celeriac.app.base import Celery

P = ParamSpec("P")
R = TypeVar("R")

#: Options ``@app.task(...)`` accepts, with what each means.
TASK_OPTIONS: dict[str, str] = {
    "name": "registered name (default: module.function)",
    "bind": "pass the task itself as first argument (self.request, self.retry)",
    "base": "Task subclass to build the task from",
    "queue": "default queue",
    "exchange": "default exchange",
    "routing_key": "default routing key",
    "priority": "default priority 0-9",
    "serializer": "serializer of arguments",
    "compression": "compression of the body",
    "ignore_result": "store no result",
    "store_errors_even_if_ignored": "store failures even if the result is ignored",
    "track_started": "store STARTED when the task begins",
    "acks_late": "acknowledge after running (celeriac default True)",
    "max_retries": "retries before MaxRetriesExceededError (None: no limit)",
    "default_retry_delay": "seconds before a retry",
    "typing": "check call arguments against the signature before sending",
}


class Task(Generic[P, R]):
    """Base class of tasks. Subclass it and pass ``base=`` to share behaviour."""

    name: ClassVar[str] = ""
    app: ClassVar[Celery]
    bind: ClassVar[bool] = False
    queue: ClassVar[str | None] = None
    exchange: ClassVar[str | None] = None
    routing_key: ClassVar[str | None] = None
    priority: ClassVar[int | None] = None
    serializer: ClassVar[str | None] = None
    compression: ClassVar[str | None] = None
    ignore_result: ClassVar[bool | None] = None
    store_errors_even_if_ignored: ClassVar[bool | None] = None
    track_started: ClassVar[bool | None] = None
    acks_late: ClassVar[bool | None] = None
    max_retries: ClassVar[int | None] = 3
    default_retry_delay: ClassVar[float] = 180.0
    typing: ClassVar[bool] = True
    #: The wrapped function.
    fun: ClassVar[Callable[..., Any]]
    #: Whether the wrapped function is ``async def``.
    is_async: ClassVar[bool] = False

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def _build(
        cls, app: Celery, fun: Callable[..., Any], options: Mapping[str, Any]
    ) -> Task[Any, Any]:
        for key in options:
            if key not in TASK_OPTIONS:
                hint = did_you_mean(key, TASK_OPTIONS)
                raise UnknownOptionError(
                    f"@task option {key!r} is not known (task {fun.__qualname__}).{hint}"
                )
        base = options.get("base") or cls
        if not (isinstance(base, type) and issubclass(base, Task)):
            raise ImproperlyConfigured(f"base= must be a Task subclass, not {base!r}")
        name = options.get("name") or app.gen_task_name(fun.__name__, fun.__module__)
        attrs: dict[str, Any] = {k: v for k, v in options.items() if k not in ("base", "name")}
        attrs.update(
            name=name,
            app=app,
            fun=staticmethod(fun),
            is_async=inspect.iscoroutinefunction(fun),
            __module__=fun.__module__,
            __doc__=fun.__doc__,
            __qualname__=fun.__qualname__,
        )
        task_cls = type(fun.__name__, (base,), attrs)
        task: Task[Any, Any] = task_cls()
        return task

    # -- running locally -------------------------------------------------------------------------

    @property
    def request(self) -> Context:
        """The request being executed (empty outside a task)."""
        return current_request.get() or Context()

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here, in this process, as a plain call."""
        if self.bind:
            return self.fun(self, *args, **kwargs)  # type: ignore[no-any-return]
        return self.fun(*args, **kwargs)  # type: ignore[no-any-return]

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task body (the wrapped function)."""
        return self(*args, **kwargs)

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
        throw: bool = False,
    ) -> EagerResult:
        """Run the task locally and return an :class:`EagerResult` (nothing is sent or stored).

        An ``async def`` task is run to completion on a new event loop; from inside a running
        loop, ``await task(...)`` instead.
        """
        import asyncio

        request = Context(
            id=task_id or str(uuid.uuid4()),
            task=self.name,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            is_eager=True,
        )
        request.root_id = request.id
        token = current_request.set(request)
        try:
            value = self(*request.args, **request.kwargs)
            if inspect.iscoroutine(value):
                value = asyncio.run(value)
        except Exception as exc:
            if throw:
                raise
            return EagerResult(request.id or "", exc, states.FAILURE, tb.format_exc())
        finally:
            current_request.reset(token)
        return EagerResult(request.id or "", value, states.SUCCESS)

    # -- sending ---------------------------------------------------------------------------------

    def _check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        if not self.typing:
            return
        try:
            sig = self.__class__.__dict__.get("_signature_cache")
            if sig is None:
                sig = inspect.signature(self.fun)
                if self.bind:
                    params = list(sig.parameters.values())[1:]
                    sig = sig.replace(parameters=params)
                type(self)._signature_cache = sig  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            return
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}{sig}: {exc}") from None

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the task with these arguments; returns at once with an :class:`AsyncResult`."""
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """``delay`` for asyncio callers."""
        return await self.aapply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send the task with call options (countdown, eta, expires, queue, priority, …)."""
        self._check_arguments(args or (), kwargs or {})
        return self.app.send_task(self.name, args, kwargs, _task=self, **options)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``apply_async`` for asyncio callers."""
        self._check_arguments(args or (), kwargs or {})
        return await self.app.asend_task(self.name, args, kwargs, _task=self, **options)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        """The result handle of a call of this task."""
        return AsyncResult(task_id, app=self.app)

    # -- signatures ----------------------------------------------------------------------------

    def signature(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """A signature of this task with partial arguments and options."""
        immutable = bool(options.pop("immutable", False))
        return Signature(self.name, args, kwargs, options, immutable=immutable, app=self.app)

    subtask = signature

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """``task.s(2)``: a signature with partial arguments."""
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: it ignores the result of the task it is linked to."""
        return self.signature(args, kwargs, immutable=True)

    # -- retrying ---------------------------------------------------------------------------------

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Retry the running task (needs ``bind=True``): the worker sends it again and stops here.

        The new message keeps the task id and counts ``retries`` up; it waits in the broker, not
        in worker memory. Past ``max_retries`` the original exception (or
        :class:`MaxRetriesExceededError`) is raised instead.
        """
        request = current_request.get()
        if request is None or request.id is None:
            raise ImproperlyConfigured(
                f"{self.name}.retry() was called outside a running task; "
                "retry works from a task declared with bind=True"
            )
        if request.is_eager:
            raise ImproperlyConfigured("retry() is not available when the task runs with apply()")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and request.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
            )
        if countdown is None and eta is None:
            countdown = self.default_retry_delay
        retry = Retry(
            f"Retry in {countdown}s" if countdown is not None else f"Retry at {eta}",
            exc=exc,
            when=eta if eta is not None else countdown,
        )
        retry.args_override = list(args) if args is not None else None
        retry.kwargs_override = dict(kwargs) if kwargs is not None else None
        retry.options = dict(options)
        if throw:
            raise retry
        return retry

    # -- defaults resolved against the app -----------------------------------------------------

    def resolved_ignore_result(self) -> bool:
        """``ignore_result``, falling back to ``task_ignore_result``."""
        if self.ignore_result is not None:
            return self.ignore_result
        return self.app.conf.task_ignore_result

    def resolved_acks_late(self) -> bool:
        """``acks_late``, falling back to ``task_acks_late``."""
        if self.acks_late is not None:
            return self.acks_late
        return self.app.conf.task_acks_late

    def resolved_track_started(self) -> bool:
        """``track_started``, falling back to ``task_track_started``."""
        if self.track_started is not None:
            return self.track_started
        return self.app.conf.task_track_started

    def resolved_store_errors(self) -> bool:
        """``store_errors_even_if_ignored``, falling back to the app setting."""
        if self.store_errors_even_if_ignored is not None:
            return self.store_errors_even_if_ignored
        return self.app.conf.task_store_errors_even_if_ignored

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main}>"
