"""``Task``: a function registered with an app, callable locally or sent to workers.

``@app.task`` builds one subclass of :class:`Task` per function, as Celery does, so class-level
options (``queue``, ``serializer`` …) and ``base=`` inheritance work the way Celery users expect.
Options are checked against :data:`TASK_OPTIONS` when the decorator runs: a misspelled option is an
error there, not a silent no-op.

Retries follow Celery: ``self.retry()`` raises :class:`~celeriac.exceptions.Retry`, the worker sends
the message again (same task id, ``retries`` + 1) to wait in the broker, and past ``max_retries`` the
original exception (or :class:`~celeriac.exceptions.MaxRetriesExceededError`) is raised instead.
``autoretry_for`` wraps the function so that listed exceptions call ``retry`` for it, with
``retry_kwargs`` and the exponential ``retry_backoff`` of :func:`get_exponential_backoff_interval`.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import random
import traceback as tb
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NoReturn, ParamSpec, TypeVar

from celeriac import states
from celeriac.app import calling
from celeriac.app.canvas import Signature
from celeriac.app.context import Context, current_request
from celeriac.app.result import AsyncResult, EagerResult
from celeriac.exceptions import (
    ImproperlyConfigured,
    MaxRetriesExceededError,
    Retry,
    UnknownOptionError,
)
from celeriac.utils.rates import check_scope, parse_rate
from celeriac.utils.suggest import did_you_mean
from celeriac.utils.time_limits import check_limit, check_pair

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
    "reject_on_worker_lost": "requeue the message when the process running it dies (default True)",
    "max_deliveries": "deliveries before the message is dead-lettered (default 5; None: no cap)",
    "max_retries": "retries before the error is final (default 3; None: retry for ever)",
    "default_retry_delay": "seconds before a retry that gives no countdown or eta (default 180)",
    "autoretry_for": "exception classes that retry the task automatically",
    "dont_autoretry_for": "exception classes never retried automatically (checked first)",
    "retry_kwargs": "retry() arguments of automatic retries, e.g. {'max_retries': 5, 'countdown': 2}",
    "retry_backoff": "exponential backoff of automatic retries: True (factor 1 s) or the factor",
    "retry_backoff_max": "longest automatic backoff in seconds (default 600)",
    "retry_jitter": "pick each backoff at random between 0 and its computed value (default True)",
    "typing": "check call arguments against the signature before sending",
    "time_limit": "hard time limit in seconds: the task is stopped and fails with "
    "TimeLimitExceeded (default: task_time_limit)",
    "soft_time_limit": "seconds after which SoftTimeLimitExceeded is raised in the task "
    "(default: task_soft_time_limit)",
    "rate_limit": "most starts per second: a number, or '10/s', '10/m', '10/h' (default: "
    "task_default_rate_limit)",
    "rate_limit_scope": "'worker': the limit holds per worker (Celery's); 'cluster': for all "
    "workers together (default: task_default_rate_limit_scope)",
}


class _FromConfig(enum.Enum):
    """A task option left to its app setting, where None is a value of its own."""

    FROM_CONFIG = "from config"


#: ``max_deliveries`` not given: ``task_max_deliveries`` applies.
FROM_CONFIG = _FromConfig.FROM_CONFIG

#: Arguments of :meth:`Task.retry` besides the ``apply_async`` options it passes on.
_RETRY_PARAMS = frozenset({"args", "kwargs", "exc", "throw", "eta", "countdown", "max_retries"})
#: ``apply_async`` options a retry sets itself: the same id, the next retry count, its own time.
_RETRY_OWN_OPTIONS = frozenset({"task_id", "retries", "countdown", "eta"})
#: Keys ``retry_kwargs`` may hold: what ``retry()`` takes, less what only the failure can give.
_RETRY_KWARGS_KEYS = (_RETRY_PARAMS - {"exc", "eta"}) | (
    set(calling.CALL_OPTIONS) - _RETRY_OWN_OPTIONS
)


def get_exponential_backoff_interval(
    factor: int, retries: int, maximum: int, full_jitter: bool = False
) -> int:
    """Seconds to wait before retry number ``retries + 1``, as Celery computes it.

    ``factor * 2 ** retries``, capped at ``maximum``; with ``full_jitter`` a whole number drawn
    uniformly from 0 to that value (the "full jitter" that spreads retries of many tasks failing
    together). Never negative.
    """
    countdown = max(0, int(min(maximum, factor * 2**retries)))
    if full_jitter:
        countdown = random.randrange(countdown + 1)
    return countdown


def _number(value: Any, what: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ImproperlyConfigured(f"{what} must be a number of seconds, not {value!r}")
    if value < 0:
        raise ImproperlyConfigured(f"{what} must not be negative, got {value!r}")


def _retry_limit(value: Any, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ImproperlyConfigured(
            f"{what} must be an integer >= 0, or None for no limit; got {value!r}"
        )


def _exception_classes(value: Any, what: str) -> tuple[type[BaseException], ...]:
    """A tuple of exception classes from a class, tuple or list of them."""
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, tuple | list) or not all(
        isinstance(c, type) and issubclass(c, BaseException) for c in items
    ):
        raise ImproperlyConfigured(
            f"{what} must be an exception class or a tuple of them, not {value!r}"
        )
    return tuple(items)


#: Retries asked for with ``retry(throw=False)``, by the ``id()`` of the running request; the worker
#: takes them when the body returns. A plain dict (not a context variable) because a sync body runs
#: in a copy of the worker's context, where a variable it sets would not be seen.
_unraised: dict[int, list[Retry]] = {}


def take_unraised_retries(request: Context) -> list[Retry]:
    """The ``retry(throw=False)`` calls made while ``request`` ran (the worker sends them)."""
    if not _unraised:
        return []
    return _unraised.pop(id(request), [])


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
    reject_on_worker_lost: ClassVar[bool | None] = None
    #: :data:`FROM_CONFIG`: ``task_max_deliveries`` applies (None is a value here: no cap).
    max_deliveries: ClassVar[int | _FromConfig | None] = FROM_CONFIG
    max_retries: ClassVar[int | None] = 3
    default_retry_delay: ClassVar[float] = 180.0
    autoretry_for: ClassVar[tuple[type[BaseException], ...]] = ()
    dont_autoretry_for: ClassVar[tuple[type[BaseException], ...]] = ()
    retry_kwargs: ClassVar[Mapping[str, Any]] = {}
    retry_backoff: ClassVar[bool | float] = False
    retry_backoff_max: ClassVar[float] = 600
    retry_jitter: ClassVar[bool] = True
    typing: ClassVar[bool] = True
    #: Celery's: None, tasks per second, or ``"N/s"``, ``"N/m"``, ``"N/h"``; None falls back to
    #: ``task_default_rate_limit``.
    rate_limit: ClassVar[str | float | None] = None
    #: ``"worker"`` or ``"cluster"``; None falls back to ``task_default_rate_limit_scope``.
    rate_limit_scope: ClassVar[str | None] = None
    #: Seconds before the task is stopped (TimeLimitExceeded); None: ``task_time_limit``.
    time_limit: ClassVar[float | None] = None
    #: Seconds before SoftTimeLimitExceeded is raised in it; None: ``task_soft_time_limit``.
    soft_time_limit: ClassVar[float | None] = None
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
        task_cls: type[Task[Any, Any]] = type(fun.__name__, (base,), attrs)
        task: Task[Any, Any] = task_cls()
        task._check_retry_options()
        task._check_rate_limit()
        task._check_delivery_options()
        task._check_time_limits()
        if task.autoretry_for:
            task_cls.fun = staticmethod(task._with_autoretry(fun))
        return task

    def _check_retry_options(self) -> None:
        """Refuse retry options of the wrong type when the task is declared, not at its first
        failure (they may come from ``@task(...)`` or from a ``base=`` class)."""
        where = f"task {self.name}"
        _retry_limit(self.max_retries, f"max_retries of {where}")
        _number(self.default_retry_delay, f"default_retry_delay of {where}")
        type(self).autoretry_for = _exception_classes(
            self.autoretry_for, f"autoretry_for of {where}"
        )
        type(self).dont_autoretry_for = _exception_classes(
            self.dont_autoretry_for, f"dont_autoretry_for of {where}"
        )
        backoff = self.retry_backoff
        if not isinstance(backoff, bool):
            _number(backoff, f"retry_backoff of {where} (True, False or a factor in seconds)")
        _number(self.retry_backoff_max, f"retry_backoff_max of {where}")
        if not isinstance(self.retry_jitter, bool):
            raise ImproperlyConfigured(
                f"retry_jitter of {where} must be True or False, not {self.retry_jitter!r}"
            )
        kwargs = self.retry_kwargs
        if not isinstance(kwargs, Mapping):
            raise ImproperlyConfigured(f"retry_kwargs of {where} must be a dict, not {kwargs!r}")
        for key in kwargs:
            if key not in _RETRY_KWARGS_KEYS:
                hint = did_you_mean(str(key), _RETRY_KWARGS_KEYS)
                raise ImproperlyConfigured(
                    f"retry_kwargs of {where}: {key!r} is not allowed.{hint}"
                )
        if "max_retries" in kwargs:
            _retry_limit(kwargs["max_retries"], f"retry_kwargs['max_retries'] of {where}")
        if "countdown" in kwargs:
            _number(kwargs["countdown"], f"retry_kwargs['countdown'] of {where}")

    def _check_delivery_options(self) -> None:
        """Refuse ``max_deliveries`` / ``reject_on_worker_lost`` of the wrong type at declaration."""
        where = f"task {self.name}"
        cap = self.max_deliveries
        if (
            cap is not FROM_CONFIG
            and cap is not None
            and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1)
        ):
            raise ImproperlyConfigured(
                f"max_deliveries of {where} must be an integer >= 1, or None for no cap; "
                f"got {cap!r}"
            )
        reject = self.reject_on_worker_lost
        if reject is not None and not isinstance(reject, bool):
            raise ImproperlyConfigured(
                f"reject_on_worker_lost of {where} must be True or False, not {reject!r}"
            )

    def _check_time_limits(self) -> None:
        """Refuse a time limit that is not a positive number of seconds, or a soft one above the
        hard one, when the task is declared."""
        where = f"task {self.name}"
        cls = type(self)
        cls.time_limit = check_limit(self.time_limit, f"time_limit of {where}")
        cls.soft_time_limit = check_limit(self.soft_time_limit, f"soft_time_limit of {where}")
        check_pair(self.time_limit, self.soft_time_limit, where)

    def resolved_time_limits(self) -> tuple[float | None, float | None]:
        """``(time_limit, soft_time_limit)``, each falling back to its ``task_*`` setting."""
        conf = self.app.conf
        hard = self.time_limit if self.time_limit is not None else conf.task_time_limit
        soft = self.soft_time_limit
        if soft is None:
            soft = conf.task_soft_time_limit
        return hard, soft

    def _check_rate_limit(self) -> None:
        """Refuse a bad ``rate_limit`` or ``rate_limit_scope`` when the task is declared (Celery
        finds a bad rate string only when a worker starts, and then fails obscurely)."""
        parse_rate(self.rate_limit, f"rate_limit of task {self.name}")
        if self.rate_limit_scope is not None:
            check_scope(self.rate_limit_scope, f"rate_limit_scope of task {self.name}")

    def _with_autoretry(self, fun: Callable[..., Any]) -> Callable[..., Any]:
        """``fun`` wrapped so that the exceptions of ``autoretry_for`` retry the task (Celery's
        ``autoretry_for``); ``async def`` functions get an ``async def`` wrapper."""
        retry_for = self.autoretry_for
        never = self.dont_autoretry_for

        if inspect.iscoroutinefunction(fun):

            @functools.wraps(fun)
            async def arun(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fun(*args, **kwargs)
                except Retry:
                    raise
                except never:
                    raise
                except retry_for as exc:
                    if not self._is_running():
                        raise
                    self._autoretry(exc)

            return arun

        @functools.wraps(fun)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fun(*args, **kwargs)
            except Retry:
                raise
            except never:
                raise
            except retry_for as exc:
                if not self._is_running():
                    raise  # a plain call of the function: its error, as without autoretry
                self._autoretry(exc)

        return run

    def _autoretry(self, exc: BaseException) -> NoReturn:
        options = dict(self.retry_kwargs)
        if self.retry_backoff:
            options["countdown"] = get_exponential_backoff_interval(
                factor=int(max(1.0, float(self.retry_backoff))),
                retries=self.request.retries,
                maximum=int(self.retry_backoff_max),
                full_jitter=self.retry_jitter,
            )
        raise self.retry(exc=exc, **options)

    def _is_running(self) -> bool:
        """Whether this task is the one running (in a worker or ``apply``), not a plain call."""
        request = current_request.get()
        return request is not None and request.id is not None and request.task in (None, self.name)

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
        loop, ``await task(...)`` instead. A retry runs again at once, with ``retries`` counted up
        (Celery's eager retries: there is no broker to wait in), until it succeeds or ends past
        ``max_retries``.
        """
        import asyncio

        task_id = task_id or str(uuid.uuid4())
        call_args, call_kwargs = list(args or ()), dict(kwargs or {})
        retries = 0
        while True:
            request = Context(
                id=task_id,
                task=self.name,
                args=call_args,
                kwargs=call_kwargs,
                retries=retries,
                is_eager=True,
            )
            request.root_id = request.id
            token = current_request.set(request)
            try:
                value = self(*request.args, **request.kwargs)
                if inspect.iscoroutine(value):
                    value = asyncio.run(value)
            except Retry as retry:
                if retry.args_override is not None:
                    call_args = retry.args_override
                if retry.kwargs_override is not None:
                    call_kwargs = retry.kwargs_override
                retries += 1
                continue
            except Exception as exc:
                if throw:
                    raise
                return EagerResult(task_id, exc, states.FAILURE, tb.format_exc())
            finally:
                current_request.reset(token)
            return EagerResult(task_id, value, states.SUCCESS)

    # -- sending ---------------------------------------------------------------------------------

    def _call_signature(self) -> inspect.Signature | None:
        """The signature callers use (without ``self`` for a bound task), computed once."""
        sig: inspect.Signature | None = self.__class__.__dict__.get("_signature_cache")
        if sig is None:
            try:
                sig = inspect.signature(self.fun)
            except (TypeError, ValueError):
                return None
            if self.bind:
                params = list(sig.parameters.values())[1:]
                sig = sig.replace(parameters=params)
            type(self)._signature_cache = sig  # type: ignore[attr-defined]
        return sig

    def _check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        if not self.typing:
            return
        sig = self._call_signature()
        if sig is None:
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
        """Retry the running task: the worker sends it again and the body stops here.

        Use it as ``raise self.retry(exc=exc, countdown=60)`` from a task declared with
        ``bind=True`` (or ``add.retry(...)`` inside ``add``). The new message keeps the task id,
        counts ``retries`` up and waits in the broker, not in worker memory, for ``countdown``
        seconds (default ``default_retry_delay``) or until ``eta``. ``args``/``kwargs`` replace the
        arguments; other keywords are ``apply_async`` options for the new message (``queue``,
        ``priority`` …). ``max_retries`` overrides the task's limit for this call only. Past the
        limit, ``exc`` is raised if given, else :class:`MaxRetriesExceededError`.

        ``throw=False`` returns the :class:`Retry` instead of raising it; the retry is still sent
        when the body returns, and the body's own outcome (success or failure) is stored, as in
        Celery.
        """
        request = current_request.get()
        if request is None or request.id is None or request.task not in (None, self.name):
            error = ImproperlyConfigured(
                f"{self.name}.retry() was called outside a running {self.name} task; retry works "
                "from the task's own body (declare it with bind=True and call self.retry())"
            )
            if exc is not None:
                raise error from exc
            raise error
        self._check_retry_call(args, kwargs, exc, throw, eta, countdown, max_retries, options)
        limit = self.max_retries if max_retries is None else max_retries
        retries = request.retries + 1
        args, kwargs = self._retry_arguments(request, args, kwargs)
        if limit is not None and retries > limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] "
                f"args:{request.args if args is None else args} "
                f"kwargs:{request.kwargs if kwargs is None else kwargs}"
            )
        if countdown is None and eta is None:
            countdown = self.default_retry_delay
        when: datetime | float | None = eta if eta is not None else countdown
        humanized = f"at {when}" if isinstance(when, datetime) else f"in {when}s"
        # Worded as Celery's Retry: "Retry in 5s: ValueError('boom')".
        message = f"Retry {humanized}: {exc!r}" if exc is not None else f"Retry {humanized}"
        retry = Retry(message, exc=exc, when=when)
        retry.args_override = list(args) if args is not None else None
        retry.kwargs_override = dict(kwargs) if kwargs is not None else None
        retry.options = dict(options)
        if throw:
            raise retry
        if not request.is_eager:
            _unraised.setdefault(id(request), []).append(retry)
        return retry

    def _check_retry_call(
        self,
        args: Any,
        kwargs: Any,
        exc: Any,
        throw: Any,
        eta: Any,
        countdown: Any,
        max_retries: Any,
        options: Mapping[str, Any],
    ) -> None:
        """Refuse a ``retry()`` call whose arguments are of the wrong type, before anything."""
        what = f"{self.name}.retry()"
        if args is not None and (isinstance(args, str | bytes) or not isinstance(args, Sequence)):
            raise ImproperlyConfigured(f"{what}: args must be a list or tuple, not {args!r}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ImproperlyConfigured(f"{what}: kwargs must be a dict, not {kwargs!r}")
        if exc is not None and not isinstance(exc, BaseException):
            raise ImproperlyConfigured(f"{what}: exc must be an exception instance, not {exc!r}")
        if not isinstance(throw, bool):
            raise ImproperlyConfigured(f"{what}: throw must be True or False, not {throw!r}")
        if eta is not None and not isinstance(eta, datetime):
            raise ImproperlyConfigured(f"{what}: eta must be a datetime, not {eta!r}")
        if eta is not None and countdown is not None:
            raise ImproperlyConfigured(f"{what}: give countdown or eta, not both")
        _number(countdown, f"{what}: countdown", allow_none=True)
        _retry_limit(max_retries, f"{what}: max_retries")
        for key in options:
            if key in _RETRY_OWN_OPTIONS:
                raise ImproperlyConfigured(
                    f"{what}: {key!r} cannot be given; a retry keeps the task id and counts "
                    "retries itself"
                )
            if key not in calling.CALL_OPTIONS:
                hint = did_you_mean(key, calling.CALL_OPTIONS)
                raise UnknownOptionError(f"{what} got an unknown option {key!r}.{hint}")
        if options:
            # Check the option values now, inside the task, where the error is the task's; the
            # worker builds the same message again when it sends the retry.
            calling.build(self.app.conf, self.name, (), {}, options, self)

    def _retry_arguments(
        self, request: Context, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None
    ) -> tuple[Sequence[Any] | None, Mapping[str, Any] | None]:
        """The arguments of the retried message (None: the request's own).

        Given only ``args``, the request's keyword arguments are kept unless a new positional
        argument now fills the same parameter; given only ``kwargs``, a keyword that names one of
        the request's positional parameters replaces it in place. Without that, the retried call
        would pass one parameter twice (Celery does the same since 5.5, issue #6494).
        """
        only_args = args is not None and kwargs is None and request.kwargs
        only_kwargs = kwargs is not None and args is None and request.args
        if not (only_args or only_kwargs):
            return args, kwargs
        sig = self._call_signature()
        if sig is None:
            return args, kwargs
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if only_args:
            assert args is not None
            params = [p for p in sig.parameters.values() if p.kind in positional]
            kept = dict(request.kwargs)
            for param in params[: len(args)]:
                if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                    kept.pop(param.name, None)
            return args, kept
        assert kwargs is not None
        try:
            bound = sig.bind_partial(*request.args)
        except TypeError:
            return args, kwargs  # the original arguments do not fit: let the retry fail as usual
        rest = dict(kwargs)
        for name in list(rest):
            if (
                name in bound.arguments
                and sig.parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            ):
                bound.arguments[name] = rest.pop(name)
        return list(bound.args), {**bound.kwargs, **rest}

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

    def resolved_reject_on_worker_lost(self) -> bool:
        """``reject_on_worker_lost``, falling back to ``task_reject_on_worker_lost``."""
        if self.reject_on_worker_lost is not None:
            return self.reject_on_worker_lost
        return self.app.conf.task_reject_on_worker_lost

    def resolved_max_deliveries(self) -> int | None:
        """``max_deliveries``, falling back to ``task_max_deliveries`` (None: no cap)."""
        cap = self.max_deliveries
        if isinstance(cap, _FromConfig):
            return self.app.conf.task_max_deliveries
        return cap

    def resolved_track_started(self) -> bool:
        """``track_started``, falling back to ``task_track_started``."""
        if self.track_started is not None:
            return self.track_started
        return self.app.conf.task_track_started

    def resolved_rate_limit(self) -> float | None:
        """Starts per second allowed (``rate_limit``, else ``task_default_rate_limit``); None:
        no limit."""
        if self.rate_limit is not None:
            return parse_rate(self.rate_limit, f"rate_limit of task {self.name}")
        return parse_rate(self.app.conf.task_default_rate_limit, "task_default_rate_limit")

    def resolved_rate_limit_scope(self) -> str:
        """``rate_limit_scope``, falling back to ``task_default_rate_limit_scope``."""
        if self.rate_limit_scope is not None:
            return self.rate_limit_scope
        return self.app.conf.task_default_rate_limit_scope

    def resolved_store_errors(self) -> bool:
        """``store_errors_even_if_ignored``, falling back to the app setting."""
        if self.store_errors_even_if_ignored is not None:
            return self.store_errors_even_if_ignored
        return self.app.conf.task_store_errors_even_if_ignored

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main}>"
