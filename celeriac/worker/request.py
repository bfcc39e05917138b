"""One delivered message on its way to execution: decoded, checked, and described for logs.

Decoding happens here, before a concurrency slot is taken, so a bad message is dealt with at once
and never occupies a slot. Every way a message can be unusable ends in :class:`Refusal`, which
says whether to dead-letter it and what to store for a waiting caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celeriac.app.context import Context
from celeriac.brokers.base import Delivery
from celeriac.exceptions import (
    ContentDisallowed,
    DecodeError,
    InvalidTaskError,
    NotRegistered,
)
from celeriac.protocol import TaskMessage, wire

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.task import Task


@dataclass(slots=True)
class Refusal:
    """Why a message will not run."""

    reason: str
    #: The exception to store as FAILURE for the task id, when the id is known.
    error: BaseException
    task_id: str | None


@dataclass(slots=True)
class Request:
    """A decoded, registered task message and the delivery that brought it."""

    delivery: Delivery
    message: TaskMessage
    task: Task[Any, Any]
    hostname: str

    @property
    def id(self) -> str:
        """The task id."""
        return self.message.id

    @property
    def name(self) -> str:
        """The name shown in logs (``shadow`` if the sender gave one)."""
        return self.message.shadow or self.message.task

    # Celery's Request attributes, for signal receivers (``task_received``) written for Celery.
    @property
    def args(self) -> list[Any]:
        return self.message.args

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.message.kwargs

    @property
    def eta(self) -> datetime | None:
        return self.message.eta

    @property
    def expires(self) -> datetime | None:
        return self.message.expires

    @property
    def retries(self) -> int:
        return self.message.retries

    @property
    def argsrepr(self) -> str | None:
        return self.message.argsrepr

    @property
    def kwargsrepr(self) -> str | None:
        return self.message.kwargsrepr

    def label(self) -> str:
        """``tasks.add[<id>]``, as in Celery's log lines."""
        return f"{self.name}[{self.id}]"

    # Log calls pass the request itself, so the label is only built for lines that are emitted.
    __str__ = label

    def context(self) -> Context:
        """The ``self.request`` a bound task sees."""
        m = self.message
        d = self.delivery
        # Positional, in the dataclass's field order (is_eager is False here): a call with 25
        # keywords costs more than everything else this does, for every task run.
        return Context(
            m.id,
            m.task,
            m.args,
            m.kwargs,
            m.retries,
            m.eta,
            m.expires,
            m.root_id,
            m.parent_id,
            m.group,
            m.group_index,
            m.correlation_id,
            m.reply_to,
            m.origin,
            self.hostname,
            {  # delivery_info
                "exchange": d.exchange,
                "routing_key": d.routing_key,
                "priority": m.priority,
                "redelivered": d.redelivered,
            },
            dict(d.message.headers),  # headers
            m.callbacks,
            m.errbacks,
            m.chain,
            m.chord,
            m.timelimit,
            self.ignores_result(),
            False,  # is_eager
            d.delivery_count,
        )

    def unsupported(self) -> list[str]:
        """What the message asks for that this version of the worker does not do.

        Such a message still runs (what it asks for is an addition to running it), but the worker
        says so in its log rather than dropping the request silently.
        """
        m = self.message
        notes = []
        if m.chord:
            notes.append("the chord body will not be sent")
        return notes

    def ignores_result(self) -> bool:
        """Whether no result is stored: the message's header, else the task's default."""
        if self.message.ignore_result:
            return True
        return self.task.resolved_ignore_result()


def _header_id(delivery: Delivery) -> str | None:
    value = delivery.message.headers.get("id")
    return value if isinstance(value, str) and value else None


def prepare(
    app: Celery, delivery: Delivery, accept: frozenset[str], hostname: str
) -> Request | Refusal:
    """Decode ``delivery`` and find its task, or say why it cannot run."""
    try:
        message = wire.decode(delivery.message, accept)
    except ContentDisallowed as exc:
        return Refusal(
            f"refused content type {delivery.message.content_type!r} (not in accept_content): {exc}",
            exc,
            _header_id(delivery),
        )
    except (DecodeError, InvalidTaskError) as exc:
        return Refusal(f"malformed message: {exc}", exc, _header_id(delivery))
    task = app.tasks.get(message.task)
    if task is None:
        return Refusal(
            f"unregistered task {message.task!r}", NotRegistered(message.task), message.id
        )
    return Request(delivery, message, task, hostname)
