"""``group``: many task calls sent together, with one result for them all (Celery's ``group``).

``group(add.s(i, i) for i in range(1000)).apply_async()`` sends one ordinary task message per
member, as Celery does (celery-wire.md §10.3): header ``group`` = the group's id, ``group_index``
= the member's position, ``root_id`` = the member's own id; nothing is stored for the group
itself. The caller gets a :class:`~celeriac.app.result.GroupResult`, whose ``get()`` returns the
members' results in order.

Celery publishes the members one by one; celeriac builds and encodes every message first (an
argument that does not serialize fails the whole group with nothing sent) and then publishes the
messages of each queue in a few :meth:`~celeriac.brokers.base.Broker.publish_many` calls
(:meth:`celeriac.app.base.Celery._publish_many`).

Members may be tasks, chains (the chain's last task is the member, as in Celery) and groups
(flattened into this one). Options given to the group apply to every member and win over the
member's own options, as in Celery; ``link``/``link_error`` are refused, as Celery refuses them (a
callback after a whole group is a chord, which is not supported yet).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from celeriac.app import calling
from celeriac.app.canvas import (
    Prepared,
    Signature,
    TaskList,
    maybe_signature,
    register_type,
    send_prepared,
    send_prepared_sync,
)
from celeriac.app.result import AsyncResult, GroupResult
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol.message import TaskMessage, uuid4_text

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.task import Task

#: Every field of a message, in the constructor's order.
_message_fields = attrgetter(*(field.name for field in fields(TaskMessage)))

#: Member options that differ from one member to the next without changing how its message is
#: built: members whose other options are the group's share one template message.
_PER_MEMBER_OPTIONS = frozenset({"task_id", "group_id", "group_index"})


def _chord_error() -> NotImplementedError:
    return NotImplementedError(
        "a group followed by another task is a chord, which this version of celeriac does not "
        "support yet; wait for the group's result and send the next task with it"
    )


@register_type("group")
class group(TaskList):
    """Tasks run in parallel: ``group(add.s(1, 1), add.s(2, 2))`` or ``group(generator)``."""

    kind = "group"

    def __init__(self, *tasks: Any, app: Celery | None = None, **options: Any) -> None:
        members = self._given(tasks)
        signatures = [maybe_signature(member, app=app) for member in members]
        super().__init__(
            "celery.group",
            (),
            {"tasks": signatures},
            options,
            subtask_type="group",
            app=app,
        )

    def __len__(self) -> int:
        return len(self.tasks)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(task) for task in self.tasks)}])"

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Mapping):
            raise _chord_error()
        return NotImplemented

    def as_wire(self) -> dict[str, Any]:
        """The group as a plain dict, members included (as it travels in a chain field)."""
        wire = super().as_wire()
        wire["kwargs"] = {**wire["kwargs"], "tasks": [task.as_wire() for task in self.tasks]}
        return wire

    def freeze(
        self,
        _id: str | None = None,
        group_id: str | None = None,
        root_id: str | None = None,
        parent_id: str | None = None,
        group_index: int | None = None,
    ) -> GroupResult:
        """Fix the group's id and its members' ids; the :class:`GroupResult` they will have.

        ``group_id`` and ``group_index`` place the group itself in an outer workflow; the
        members get their positions in this group, as in Celery.
        """
        del group_id, group_index  # a group's members are indexed in the group itself
        opts = self.options
        gid = opts.get("task_id")
        if not isinstance(gid, str) or not gid:
            gid = opts["task_id"] = _id or str(uuid.uuid4())
        if root_id:
            opts["root_id"] = root_id
        if parent_id:
            opts["parent_id"] = parent_id
        members = list(_flatten(self.tasks, self._app))
        results = []
        for index, member in enumerate(members):
            result = member.freeze(group_index=index, root_id=root_id)
            if not isinstance(result, AsyncResult):
                raise _chord_error()  # a chain ending in a group, inside a group
            results.append(result)
        self.kwargs["tasks"] = members
        return GroupResult(gid, results, app=self.app)

    # -- sending -------------------------------------------------------------------------------

    def apply_async(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> GroupResult:
        """Send every member; ``args`` are prepended to each member's (unless immutable).

        Options apply to every member. Returns at once with the :class:`GroupResult`.
        """
        app = self.app
        prepared = self._prepare(app, args, kwargs, options)
        send_prepared_sync(app, prepared)
        return _group_result(prepared)

    async def aapply_async(  # type: ignore[override]
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> GroupResult:
        """``apply_async`` for asyncio callers."""
        app = self.app
        prepared = self._prepare(app, args, kwargs, options)
        await send_prepared(app, prepared)
        return _group_result(prepared)

    def delay(self, *args: Any, **kwargs: Any) -> GroupResult:  # type: ignore[override]
        """Send every member with ``args`` prepended to its own."""
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> GroupResult:  # type: ignore[override]
        """``delay`` for asyncio callers."""
        return await self.aapply_async(args, kwargs)

    def __call__(self, *args: Any, **options: Any) -> GroupResult:
        """Send the group, as Celery's ``group(...)()`` does."""
        return self.apply_async(args, **options)

    def apply(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        raise NotImplementedError(
            "a group cannot be run in this process; send it (apply_async) to a worker, or use "
            "celeriac.contrib.testing.start_worker in tests"
        )

    def _prepare(
        self,
        app: Celery,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> Prepared:
        for key, advice in (("link", "use a chord"), ("link_error", "add it to each task")):
            if options.get(key) is not None or self.options.get(key) is not None:
                raise TypeError(f"Cannot add {key} to a group: {advice}")
        opts = {**self.options, **options}
        group_id = opts.pop("task_id", None) or str(uuid.uuid4())
        opts["group_id"] = group_id
        builder = _MemberBuilder(app, opts, args or (), kwargs or {})
        outgoings: list[calling.Outgoing] = []
        results: list[AsyncResult] = []
        for index, member in enumerate(_flatten(self.tasks, app)):
            kind = member.subtask_type
            if kind is None:
                outgoing = builder.build(member, index)
                outgoings.append(outgoing)
                results.append(AsyncResult(outgoing.message.id, app=app))
            elif kind == "chain":
                prepared = member._prepare(
                    app, args, kwargs, {**opts, "group_id": group_id, "group_index": index}
                )
                outgoings += prepared.outgoings
                if not isinstance(prepared.result, AsyncResult):
                    raise _chord_error()
                results.append(prepared.result)
            else:
                raise ImproperlyConfigured(
                    f"a {kind} cannot be a member of a group in this version of celeriac"
                )
        return Prepared(outgoings, GroupResult(group_id, results, app=app))


def _group_result(prepared: Prepared) -> GroupResult:
    result = prepared.result
    assert isinstance(result, GroupResult)
    return result


def _flatten(tasks: Iterable[Mapping[str, Any]], app: Celery | None) -> Iterator[Signature]:
    """The members with nested groups spliced in place (their own options are not used, as in
    Celery, where the outer group's id and options apply)."""
    for task in tasks:
        member = maybe_signature(task, app=app)
        if isinstance(member, group):
            yield from _flatten(member.tasks, app)
        else:
            yield member


class _MemberBuilder:
    """The message of each plain member of one ``apply_async`` of a group.

    Members differ mostly by their id and arguments. The first member of each task name is built
    by :func:`celeriac.app.calling.build`, with every check and default of a single call; members
    with the same name and no options of their own beyond ids and position reuse that message
    as a template with their own id, arguments and position. A task router that is a function
    may route each call by its arguments, so with one in ``task_routes`` every member is built
    in full.
    """

    def __init__(
        self,
        app: Celery,
        options: Mapping[str, Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> None:
        self.app = app
        self.options = options
        self.args = args
        self.kwargs = kwargs
        self.group_id: str = options["group_id"]
        self.templates: dict[str, calling.Outgoing] | None = (
            None if _has_function_router(app.conf.task_routes) else {}
        )
        self.new_id = _TaskIds()

    def build(self, member: Signature, index: int) -> calling.Outgoing:
        own = member.options
        if member.immutable:
            args: Sequence[Any] = member.args
            kwargs: Mapping[str, Any] = member.kwargs
        else:
            args = [*self.args, *member.args] if self.args else member.args
            kwargs = {**member.kwargs, **self.kwargs} if self.kwargs else member.kwargs
        task_id = own.get("task_id") or self.new_id()
        group_id = own.get("group_id") or self.group_id
        templates = self.templates
        if templates is not None and _PER_MEMBER_OPTIONS.issuperset(own):
            template = templates.get(member.task)
            if template is not None:
                return _stamped(template, task_id, args, kwargs, group_id, index)
        options = {**own, **self.options, "task_id": task_id, "group_index": index}
        options["group_id"] = group_id
        outgoing = calling.build(
            self.app.conf, member.task, args, kwargs, options, self._task(member.task)
        )
        if templates is not None and _PER_MEMBER_OPTIONS.issuperset(own):
            templates[member.task] = outgoing
        return outgoing

    def _task(self, name: str) -> Task[Any, Any] | None:
        return self.app.tasks.get(name)


def _stamped(
    template: calling.Outgoing,
    task_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    group_id: str,
    index: int,
) -> calling.Outgoing:
    """``template``'s message for another member: its id, arguments and position."""
    # The exact types first: a signature's arguments are a list and a dict, and the checks of
    # abstract types cost more than the rest of the copy.
    if type(args) is not list and (isinstance(args, str | bytes) or not isinstance(args, Sequence)):
        raise ImproperlyConfigured(
            f"args of {template.message.task!r} must be a list, not {args!r}"
        )
    if type(kwargs) is not dict and not isinstance(kwargs, Mapping):
        raise ImproperlyConfigured(
            f"kwargs of {template.message.task!r} must be a mapping, not {kwargs!r}"
        )
    first = template.message
    # A copy through the positional constructor: a quarter of the cost of dataclasses.replace,
    # which matters at thousands of members.
    message = TaskMessage(*_message_fields(first))
    message.id = task_id
    message.args = list(args)
    message.kwargs = dict(kwargs)
    # A member is its own root unless the group was sent from a task or given a root_id.
    message.root_id = task_id if first.root_id == first.id else first.root_id
    message.correlation_id = task_id
    message.group = group_id
    message.group_index = index
    return calling.Outgoing(
        message=message,
        route=template.route,
        serializer=template.serializer,
        compression=template.compression,
        not_before=template.not_before,
        retry_policy=template.retry_policy,
    )


class _TaskIds:
    """Fresh task ids, random UUIDs as ``uuid.uuid4()`` makes them, read from the system's
    random source a block at a time: one system call per :data:`BLOCK` ids, not one per id."""

    BLOCK = 1024

    def __init__(self) -> None:
        self._data = b""
        self._offset = 0

    def __call__(self) -> str:
        if self._offset >= len(self._data):
            self._data = os.urandom(16 * self.BLOCK)
            self._offset = 0
        start = self._offset
        self._offset += 16
        return uuid4_text(self._data[start : start + 16])


def _has_function_router(routes: Any) -> bool:
    """Whether ``task_routes`` holds a router function (which may route by arguments)."""
    if routes is None:
        return False
    entries = routes if isinstance(routes, list | tuple) else [routes]
    return any(not isinstance(entry, Mapping) for entry in entries)
