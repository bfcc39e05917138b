"""``chain``: tasks run one after the other, each given the result of the one before.

``(add.s(1, 2) | add.s(3) | add.s(4)).apply_async()`` (or ``chain(add.s(1, 2), add.s(3),
add.s(4))``) is sent as Celery 5 sends it (celery-wire.md §10.2): **one** message, for the first
task, whose ``chain`` field holds the remaining steps *reversed* (the next step is the last
element), each with its task id fixed in advance. The caller gets the
:class:`~celeriac.app.result.AsyncResult` of the last task, whose ``parent`` links lead back to
the first.

The worker continues the chain (:func:`next_step`): when a task succeeds it sends the last element
of its ``chain`` field with the return value prepended to the step's arguments (unless the step is
immutable, ``.si()``), the rest of the list as that message's ``chain``, ``parent_id`` = the task
that just ran and the same ``root_id``. This is what a Celery worker does, so chains sent by
Celery clients run on celeriac workers and the other way round. When a task fails, every step
that would have followed gets the same failure stored (:func:`waiting_tasks`), so whoever waits
for the chain's result gets the error rather than waiting for ever, as in Celery.

A group may be a step of a chain (the worker sends its members with the result); a group followed
by another step would be a chord, which is not supported yet and refused when the chain is built.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celeriac.app import calling
from celeriac.app.canvas import (
    Prepared,
    Signature,
    TaskList,
    address_replies,
    maybe_signature,
    register_type,
    send_prepared,
    send_prepared_sync,
)
from celeriac.app.groups import group
from celeriac.app.result import AsyncResult, _ResultBase
from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app.base import Celery

logger = logging.getLogger("celeriac.app")

#: Chain-level options that belong to the chain's *last* task (its result is the chain's).
_LAST_STEP_OPTIONS = ("task_id", "group_id", "group_index")


def _chord_error() -> NotImplementedError:
    return NotImplementedError(
        "a group followed by another task in a chain is a chord, which this version of celeriac "
        "does not support yet; end the chain with the group instead"
    )


@register_type("chain")
class chain(TaskList):
    """Tasks run in sequence: ``chain(add.s(1, 2), add.s(3))``, ``add.s(1, 2) | add.s(3)``."""

    kind = "chain"

    def __init__(self, *tasks: Any, app: Celery | None = None, **options: Any) -> None:
        steps = self._given(tasks)
        flat: list[Signature] = []
        for step in steps:
            sig = maybe_signature(step, app=app)
            if isinstance(sig, chain):
                flat += sig._unchained()
            else:
                flat.append(sig)
        for sig in flat[:-1]:
            if isinstance(sig, group):
                raise _chord_error()
        super().__init__(
            "celery.chain", (), {"tasks": flat}, options, subtask_type="chain", app=app
        )

    def _unchained(self) -> list[Signature]:
        """Copies of the steps, with the chain's own ``link`` on the last and ``link_error`` on
        every step (how Celery splices one chain into another)."""
        steps = [step.clone() for step in self.tasks]
        if steps:
            for callback in _as_list(self.options.get("link")):
                steps[-1].link(callback)
            for errback in _as_list(self.options.get("link_error")):
                for step in steps:
                    step.link_error(errback)
        return steps

    def __or__(self, other: Any) -> chain:  # type: ignore[override]
        if isinstance(other, Mapping):
            return chain(*self._unchained(), other, app=self._app)
        return NotImplemented

    def __repr__(self) -> str:
        return " | ".join(repr(task) for task in self.tasks) or "chain(<empty>)"

    def as_wire(self) -> dict[str, Any]:
        """The chain as a plain dict, steps included."""
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
    ) -> _ResultBase:
        """Fix every step's id; the last step takes ``_id`` and the group position. Returns
        the result the chain will have (the last step's, with ``parent`` links)."""
        del parent_id  # the first step's parent is whoever sends the chain
        results: list[_ResultBase] = []
        for index, step in enumerate(self.tasks):
            last = index == len(self.tasks) - 1
            result = step.freeze(
                _id if last else None,
                group_id=group_id if last else None,
                root_id=root_id,
                group_index=group_index if last else None,
            )
            if results:
                result.parent = results[-1]
            results.append(result)
        if not results:
            raise ImproperlyConfigured("a chain needs at least one task")
        return results[-1]

    # -- sending -------------------------------------------------------------------------------

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Send the first task, carrying the others; ``args`` go to the first task.

        ``task_id`` names the last task (whose result is the chain's), ``link`` runs after the
        last and ``link_error`` after any that fails; other options apply to the first task, as
        in Celery. Returns the last task's :class:`AsyncResult` (a ``GroupResult`` when the chain
        ends with a group).
        """
        app = self.app
        prepared = self._prepare(app, args, kwargs, options)
        send_prepared_sync(app, prepared)
        return prepared.result

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """``apply_async`` for asyncio callers."""
        app = self.app
        prepared = self._prepare(app, args, kwargs, options)
        await send_prepared(app, prepared)
        return prepared.result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Send the chain, as Celery's ``chain(...)()`` does."""
        return self.apply_async(args, kwargs)

    def apply(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        raise NotImplementedError(
            "a chain cannot be run in this process; send it (apply_async) to a worker, or use "
            "celeriac.contrib.testing.start_worker in tests"
        )

    def _prepare(
        self,
        app: Celery,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> Prepared:
        # Copies: freezing must not change the caller's signatures. The chain's own link and
        # link_error are in ``opts`` below, with those given to this call.
        steps = [step.clone() for step in self.tasks]
        if not steps:
            raise ImproperlyConfigured("a chain needs at least one task")
        opts = {**self.options, **options}
        for callback in _as_list(opts.pop("link", None)):
            steps[-1].link(callback)
        for errback in _as_list(opts.pop("link_error", None)):
            for step in steps:
                step.link_error(errback)
        last_step = {key: opts.pop(key) for key in _LAST_STEP_OPTIONS if key in opts}
        first, rest = steps[0], steps[1:]
        if not rest:
            return first._prepare(app, args, kwargs, {**opts, **last_step})
        # The ids of the later steps are fixed now: they travel in the first message, and the
        # caller's result is the last one's.
        results: list[_ResultBase] = []
        for index, step in enumerate(rest):
            last = index == len(rest) - 1
            result = step.freeze(
                last_step.get("task_id") if last else None,
                group_id=last_step.get("group_id") if last else None,
                group_index=last_step.get("group_index") if last else None,
            )
            result.parent = results[-1] if results else None
            results.append(result)
        prepared = first._prepare(app, args, kwargs, opts)
        (outgoing,) = prepared.outgoings
        outgoing.message.chain = [step.as_wire() for step in reversed(rest)]
        results[0].parent = prepared.result
        return Prepared(prepared.outgoings, results[-1])


def _as_list(value: Any) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [value]
    return list(value)


# -- the worker's side -------------------------------------------------------------------------


def next_step(
    app: Celery, chain_field: Sequence[Mapping[str, Any]], retval: Any, parent_id: str, root_id: str
) -> Prepared:
    """The messages that continue a chain after a task returned ``retval``.

    ``chain_field`` is the finished task's ``chain`` (reversed: the next step is the last
    element). The next step gets ``retval`` before its own arguments unless it is immutable, the
    rest of the list as its own ``chain`` (an empty list for the last step, as Celery sends it),
    ``parent_id`` and ``root_id``. A step is sent to the reply queue it names, never to the
    worker's own. Raises :class:`ImproperlyConfigured` for a step that cannot be sent and
    :class:`NotImplementedError` for a workflow this version does not run (a chord).
    """
    raw = copy.deepcopy(dict(chain_field[-1]))
    address_replies(raw, "")
    step = maybe_signature(raw, app=app)
    _keep_call_options(step)
    rest = [dict(item) for item in chain_field[:-1]]
    ids = {"parent_id": parent_id, "root_id": root_id}
    kind = step.subtask_type
    if kind is None:
        args = list(step.args) if step.immutable else [retval, *step.args]
        outgoing = app._prepare(step.task, args, step.kwargs, {**step.options, **ids})
        outgoing.message.chain = rest
        return Prepared([outgoing], AsyncResult(outgoing.message.id, app=app))
    if kind == "group":
        if rest:
            raise _chord_error()
        return step._prepare(app, (retval,), None, ids)
    if kind == "chain":
        assert isinstance(step, chain)
        steps = [*step.tasks, *(maybe_signature(item, app=app) for item in reversed(rest))]
        return chain(steps, app=app)._prepare(app, (retval,), None, ids)
    raise NotImplementedError(
        f"the next step of this chain is a {kind} ({step.task}), which this version of "
        "celeriac does not run"
    )


def _keep_call_options(step: Signature) -> None:
    """Drop (and log) the options ``apply_async`` does not take, from the step and its members:
    Celery puts its own bookkeeping there (stamps, chord markers) that means nothing here."""
    options = step.options
    dropped = sorted(key for key in options if key not in calling.CALL_OPTIONS)
    if dropped:
        logger.warning(
            "Chain step %s: options not understood and not applied: %s", step.task, dropped
        )
        for key in dropped:
            del options[key]
    if isinstance(step, group | chain):
        for member in step.tasks:
            _keep_call_options(member)


def waiting_tasks(chain_field: Iterable[Mapping[str, Any]]) -> Iterator[tuple[str, str | None]]:
    """``(task_id, reply_to)`` of every task the rest of a chain would have run.

    A failure stops the chain: the worker stores it for each of them so that the caller waiting
    for the last result learns of it. Steps without a fixed id (none, from Celery's and
    celeriac's clients) are skipped; a group's members are included.
    """
    for raw in chain_field:
        if not isinstance(raw, Mapping):
            continue
        options = raw.get("options")
        if not isinstance(options, Mapping):
            continue
        kwargs = raw.get("kwargs")
        if raw.get("subtask_type") in ("group", "chain") and isinstance(kwargs, Mapping):
            yield from waiting_tasks(kwargs.get("tasks") or ())
            continue
        task_id = options.get("task_id")
        if isinstance(task_id, str) and task_id:
            reply_to = options.get("reply_to")
            yield task_id, reply_to if isinstance(reply_to, str) else None
