"""Signatures: a task call packed up to be sent later (Celery's ``Signature``).

A signature *is* a dict with Celery's wire keys (celery-wire.md §10.1) — ``task``, ``args``,
``kwargs``, ``options``, ``subtask_type``, ``immutable`` — so it travels unchanged in ``link`` /
``link_error`` callbacks and in a chain's ``chain`` field between celeriac and Celery.

Workflows are signatures too, told apart by ``subtask_type``: ``group`` (:mod:`celeriac.app.groups`)
and ``chain`` (:mod:`celeriac.app.chains`); :func:`maybe_signature` turns a dict from the wire back
into the right class. ``a | b`` chains signatures. Chords are not supported yet: ``group | task``
(which Celery turns into a chord) is refused with a clear error.

Sending a workflow has two steps, so that everything it sends is known (and encoded) before
anything is published: :meth:`Signature._prepare` builds the messages and the result handle, then
the app publishes the messages in batches (:meth:`celeriac.app.base.Celery._publish_many`).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from celeriac.app.result import AsyncResult
from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.calling import Outgoing
    from celeriac.app.chains import chain
    from celeriac.app.result import EagerResult, _ResultBase

_S = TypeVar("_S", bound="type[Signature]")

#: Signature classes by ``subtask_type`` (``group``, ``chain``), filled by :func:`register_type`.
_SUBTASK_TYPES: dict[str, type[Signature]] = {}


def register_type(name: str) -> Callable[[_S], _S]:
    """Class decorator: signatures whose ``subtask_type`` is ``name`` are read as this class."""

    def register(cls: _S) -> _S:
        _SUBTASK_TYPES[name] = cls
        return cls

    return register


@dataclass(slots=True)
class Prepared:
    """What sending a signature publishes, built but not sent yet, and the caller's result."""

    outgoings: list[Outgoing]
    result: _ResultBase


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
        # A task name first: ``task.s()`` makes signatures by the thousand for a group, and the
        # check of an abstract Mapping is the slower one.
        if type(task) is not str and isinstance(task, Mapping):
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
    def subtask_type(self) -> str | None:
        """``None`` for a task, ``"group"`` or ``"chain"`` for a workflow (Celery's field)."""
        value = self.get("subtask_type")
        return value if isinstance(value, str) else None

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
        return type(self).from_dict(
            {
                "task": self.task,
                "args": new_args,
                "kwargs": new_kwargs,
                "options": copy.deepcopy(new_options),
                "subtask_type": self.subtask_type,
                "immutable": self.immutable,
            },
            app=self._app,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None) -> Signature:
        """A signature of this class from its dict form (Celery's ``from_dict``)."""
        return cls(d, app=app)

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

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> _ResultBase:
        """Fix the task id (keeping one already set) and the workflow ids; the result handle.

        Sending the signature afterwards sends the task under that id. As in Celery, a
        signature must not be sent twice once frozen: both messages would carry one id.
        """
        opts = self.options
        task_id = opts.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            task_id = opts["task_id"] = _id or str(uuid.uuid4())
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        if group_id and "group_id" not in opts:
            opts["group_id"] = group_id
        if group_index is not None:
            opts["group_index"] = group_index
        return AsyncResult(task_id, app=self.app)

    def __or__(self, other: Any) -> chain:  # type: ignore[override]
        """``a | b``: a chain that runs ``b`` with ``a``'s result (Celery's operator)."""
        from celeriac.app.chains import chain

        if isinstance(other, Mapping):
            return chain(self, other, app=self._app)
        return NotImplemented

    def __ior__(self, other: Any) -> chain:  # type: ignore[override]
        # A dict merges in place with |=; a signature chains, as in Celery.
        return self.__or__(other)

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
        self._refuse_unknown_workflow()
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        return self.app.send_task(self.task, new_args, new_kwargs, **new_options)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``apply_async`` for asyncio callers."""
        self._refuse_unknown_workflow()
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        return await self.app.asend_task(self.task, new_args, new_kwargs, **new_options)

    def _prepare(
        self,
        app: Celery,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> Prepared:
        """The messages that ``apply_async(args, kwargs, **options)`` publishes, unsent."""
        self._refuse_unknown_workflow()
        new_args, new_kwargs, new_options = self._merge(args, kwargs, options)
        outgoing = app._prepare(self.task, new_args, new_kwargs, new_options)
        return Prepared([outgoing], AsyncResult(outgoing.message.id, app=app))

    def _refuse_unknown_workflow(self) -> None:
        """A chord (or chunks, xmap …) read from a dict is not a task: sending it would send a
        message for a task named ``celery.chord`` that no worker has."""
        kind = self.subtask_type
        if kind is not None and kind not in _SUBTASK_TYPES:
            raise NotImplementedError(
                f"a {kind} ({self.task}) cannot be sent by this version of celeriac"
            )

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


async def send_prepared(app: Celery, prepared: Prepared) -> None:
    """Publish prepared messages; steps carried inside them learn the caller's reply queue.

    With a result store that answers through a reply queue (rpc://) every task of a workflow
    must name the caller's queue, including the chain steps a worker will send later: as
    Celery's ``freeze`` does, their options get ``reply_to`` unless they name one already.
    """
    reply_to = await app._reply_queue()
    if reply_to:
        for outgoing in prepared.outgoings:
            for step in outgoing.message.chain or ():
                address_replies(step, reply_to)
    await app._publish_many(prepared.outgoings)


def send_prepared_sync(app: Celery, prepared: Prepared) -> None:
    """:func:`send_prepared` for a synchronous caller: on this thread where the broker allows it
    (no reply queue then), else through the portal's loop."""
    if not app._publish_sync(prepared.outgoings):
        app.run_sync(send_prepared(app, prepared))


def address_replies(step: dict[str, Any], reply_to: str) -> None:
    """Give a wire signature, and the members of a workflow, ``reply_to`` where they name none."""
    options = step.get("options")
    if isinstance(options, dict) and options.get("reply_to") is None:
        options["reply_to"] = reply_to
    kwargs = step.get("kwargs")
    if step.get("subtask_type") and isinstance(kwargs, dict):
        for member in kwargs.get("tasks") or ():
            if isinstance(member, dict):
                address_replies(member, reply_to)


def signature(
    varies: str | Mapping[str, Any],
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    *,
    app: Celery | None = None,
    **options: Any,
) -> Signature:
    """Build a signature from a task name or a signature dict (Celery's ``signature``).

    A dict whose ``subtask_type`` is ``group`` or ``chain`` gives a group or a chain.
    """
    if isinstance(varies, Mapping):
        if isinstance(varies, Signature):
            return (
                varies.clone()
                if not (args or kwargs or options)
                else varies.clone(args, kwargs, **options)
            )
        return maybe_signature(varies, app=app)
    return Signature(varies, args, kwargs, options, app=app)


def maybe_signature(value: Mapping[str, Any], app: Celery | None = None) -> Signature:
    """``value`` as a signature of the class its ``subtask_type`` names (itself if it is one).

    Workflow types celeriac does not run (``chord``, ``chunks``, ``xmap`` …) come back as plain
    :class:`Signature` objects with that ``subtask_type``, for the caller to refuse.
    """
    if isinstance(value, Signature):
        return value
    if not isinstance(value, Mapping) or not isinstance(value.get("task"), str):
        raise ImproperlyConfigured(f"a signature must be a dict with a task name, not {value!r}")
    kind = value.get("subtask_type")
    if kind and kind not in _SUBTASK_TYPES:
        # The workflow classes register themselves on import.
        import celeriac.app.chains
        import celeriac.app.groups  # noqa: F401
    return _SUBTASK_TYPES.get(kind or "", Signature).from_dict(value, app=app)


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


class TaskList(Signature):
    """A signature whose ``kwargs.tasks`` holds other signatures: a group's members, a chain's steps.

    Subclasses set :attr:`kind` (the word their errors use) and define how the list runs.
    """

    kind: ClassVar[str] = "workflow"

    @classmethod
    def _given(cls, tasks: tuple[Any, ...]) -> Iterable[Any]:
        """The signatures given as ``f(a, b)`` or as ``f(iterable)``; anything else is refused."""
        if len(tasks) == 1 and not isinstance(tasks[0], Mapping):
            if isinstance(tasks[0], str | bytes) or not isinstance(tasks[0], Iterable):
                raise ImproperlyConfigured(
                    f"{cls.kind}() takes signatures or one iterable of them, not {tasks[0]!r}"
                )
            return tasks[0]
        return tasks

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None) -> Self:
        """One from its dict form (``kwargs.tasks`` holds the signatures, in order)."""
        kwargs = d.get("kwargs") or {}
        tasks = kwargs.get("tasks") if isinstance(kwargs, Mapping) else None
        if not isinstance(tasks, list | tuple):
            raise ImproperlyConfigured(f"a {cls.kind} signature needs kwargs.tasks, a list: {d!r}")
        # Subclasses take the list of signatures where Signature takes a task name.
        return cls(list(tasks), app=app, **dict(d.get("options") or {}))  # type: ignore[arg-type]

    @property
    def tasks(self) -> list[Signature]:
        """The signatures, in order (a group's members; a chain's steps, first to last)."""
        value: list[Signature] = self.kwargs["tasks"]
        return value

    @property
    def app(self) -> Celery:
        """Its own app, else its first signature's, else the current app."""
        if self._app is not None:
            return self._app
        for task in self.tasks:
            if task._app is not None:
                return task._app
        return super().app
