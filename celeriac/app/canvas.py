"""Signatures: a task call packed up to be sent later (Celery's ``Signature``).

A signature *is* a dict with Celery's wire keys (celery-wire.md §10.1) — ``task``, ``args``,
``kwargs``, ``options``, ``subtask_type``, ``immutable`` — so it travels unchanged in ``link`` /
``link_error`` callbacks between celeriac and Celery. Chains, groups and chords come later.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.result import AsyncResult, EagerResult


class Signature(dict[str, Any]):
    """``task.s(*args, **kwargs)``: a task name, partial arguments and call options."""

    def __init__(
        self,
        task: str | Mapping[str, Any],
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        subtask_type: str | None = None,
        app: Celery | None = None,
    ) -> None:
        if isinstance(task, Mapping):
            super().__init__(
                task=task["task"],
                args=list(task.get("args") or ()),
                kwargs=dict(task.get("kwargs") or {}),
                options=dict(task.get("options") or {}),
                subtask_type=task.get("subtask_type"),
                immutable=bool(task.get("immutable", False)),
            )
        else:
            if not isinstance(task, str) or not task:
                raise ImproperlyConfigured(f"a signature needs a task name, got {task!r}")
            super().__init__(
                task=task,
                args=list(args or ()),
                kwargs=dict(kwargs or {}),
                options=dict(options or {}),
                subtask_type=subtask_type,
                immutable=immutable,
            )
        self._app = app

    # Celery's attribute-style accessors.
    @property
    def task(self) -> str:
        """The task name."""
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        """Partial positional arguments."""
        value: list[Any] = self["args"]
        return value

    @property
    def kwargs(self) -> dict[str, Any]:
        """Partial keyword arguments."""
        value: dict[str, Any] = self["kwargs"]
        return value

    @property
    def options(self) -> dict[str, Any]:
        """``apply_async`` options."""
        value: dict[str, Any] = self["options"]
        return value

    @property
    def immutable(self) -> bool:
        """An immutable signature (``.si()``) ignores the parent's result."""
        return bool(self["immutable"])

    @property
    def id(self) -> str | None:
        """The task id fixed for this signature, if any."""
        value = self.options.get("task_id")
        return value if isinstance(value, str) else None

    @property
    def app(self) -> Celery:
        """The app this signature is sent with (the current app if none was given)."""
        if self._app is not None:
            return self._app
        from celeriac.app.shared import current_app

        return current_app()

    def clone(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """A copy with more partial arguments (prepended, as Celery does) and options."""
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        return Signature(
            self.task,
            new_args,
            new_kwargs,
            new_options,
            immutable=self.immutable,
            subtask_type=self["subtask_type"],
            app=self._app,
        )

    def _merge(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        if self.immutable:
            return list(self.args), dict(self.kwargs), {**self.options, **options}
        return (
            [*(args or ()), *self.args],
            {**self.kwargs, **(kwargs or {})},
            {**self.options, **options},
        )

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        """Set call options in place; returns the signature for chaining."""
        if immutable is not None:
            self["immutable"] = immutable
        self.options.update(options)
        return self

    def link(self, callback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run ``callback`` with this task's result when it succeeds."""
        self.options.setdefault("link", []).append(Signature(callback))
        return callback

    def link_error(self, errback: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run ``errback`` with this task's id when it fails."""
        self.options.setdefault("link_error", []).append(Signature(errback))
        return errback

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send the task with the partial arguments merged in."""
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        return self.app.send_task(self.task, new_args, new_kwargs, **new_options)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``apply_async`` for asyncio callers."""
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        return await self.app.asend_task(self.task, new_args, new_kwargs, **new_options)

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Send the task, with ``args`` prepended to the partial arguments."""
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """``delay`` for asyncio callers."""
        return await self.aapply_async(args, kwargs)

    def apply(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> EagerResult:
        """Run the task here and now (it must be registered with the app)."""
        new_args, new_kwargs, _ = self._merge(args, kwargs, {})
        return self.app.tasks[self.task].apply(new_args, new_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        new_args, new_kwargs, _ = self._merge(args, kwargs, {})
        return self.app.tasks[self.task](*new_args, **new_kwargs)

    def as_wire(self) -> dict[str, Any]:
        """A plain dict, as it goes into a message (no celeriac classes inside)."""
        options = {k: v for k, v in self.options.items() if k not in ("link", "link_error")}
        wire: dict[str, Any] = {
            "task": self.task,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "options": copy.deepcopy(options),
            "subtask_type": self["subtask_type"],
            "immutable": self.immutable,
        }
        for key in ("link", "link_error"):
            if self.options.get(key):
                wire["options"][key] = [Signature(s).as_wire() for s in self.options[key]]
        return wire

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}({', '.join(parts)}){'!' if self.immutable else ''}"


def signature(
    varies: str | Mapping[str, Any],
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    app: Celery | None = None,
    **options: Any,
) -> Signature:
    """Build a signature from a task name or a signature dict (Celery's ``signature``)."""
    if isinstance(varies, Mapping):
        if isinstance(varies, Signature):
            return (
                varies.clone()
                if not (args or kwargs or options)
                else varies.clone(args, kwargs, **options)
            )
        return Signature(varies, app=app)
    return Signature(varies, args, kwargs, options, app=app)


def as_signature_list(value: Any, what: str) -> list[dict[str, Any]] | None:
    """Normalize a ``link``/``link_error`` option into wire dicts."""
    if value is None:
        return None
    items: Iterable[Any] = [value] if isinstance(value, Mapping) else value
    result = []
    for item in items:
        if not isinstance(item, Mapping) or "task" not in item:
            raise ImproperlyConfigured(
                f"{what} must be a signature or a list of them, not {item!r}"
            )
        result.append(Signature(item).as_wire())
    return result or None
