"""Queue and exchange declarations: ``task_queues`` with kombu's ``Queue`` / ``Exchange`` shapes.

``Queue("images", Exchange("media", type="topic"), routing_key="media.#")`` reads as in Celery;
:func:`queue_spec` turns a queue name into the :class:`~celeriac.brokers.base.QueueSpec` the worker
and the client both declare, so they never disagree (on RabbitMQ a declaration that differs from the
existing one is refused). A queue not listed in ``task_queues`` is made as Celery makes missing
queues: a durable direct exchange of the queue's name, bound with the queue's name; the default
queue follows the ``task_default_exchange*`` settings.

Only what celeriac honours is accepted: any other kombu keyword or queue argument is an error that
names it, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celeriac.brokers.base import QueueSpec
from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app.config import Settings

#: ``queue_arguments`` keys celeriac understands, and the QueueSpec field each one sets.
_ARGUMENTS = {"x-max-priority": "max_priority", "x-queue-type": "queue_type"}


@dataclass(slots=True, frozen=True)
class Exchange:
    """An exchange, as kombu's ``Exchange(name, type="direct", durable=True)``."""

    name: str = ""
    type: str = "direct"
    durable: bool = True


@dataclass(slots=True, frozen=True)
class Queue:
    """A queue and its binding, as kombu's ``Queue(name, exchange, routing_key, ...)``.

    ``queue_arguments`` may hold ``x-max-priority`` and ``x-queue-type`` (``classic`` /
    ``quorum``); ``max_priority=`` is the short form of the first.
    """

    name: str
    exchange: Exchange | str | None = None
    routing_key: str | None = None
    durable: bool = True
    max_priority: int | None = None
    queue_arguments: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ImproperlyConfigured(f"Queue needs a non-empty name, got {self.name!r}")
        unknown = sorted(set(self.queue_arguments) - set(_ARGUMENTS))
        if unknown:
            raise ImproperlyConfigured(
                f"Queue {self.name!r}: queue_arguments {unknown} are not supported; "
                f"supported: {sorted(_ARGUMENTS)}"
            )

    @property
    def exchange_obj(self) -> Exchange:
        """The exchange: a name given as a string is a durable direct exchange."""
        if isinstance(self.exchange, Exchange):
            return self.exchange
        return Exchange(self.exchange if self.exchange is not None else self.name)

    def spec(self, conf: Settings) -> QueueSpec:
        """The declaration of this queue under ``conf``'s defaults."""
        exchange = self.exchange_obj
        max_priority = self.queue_arguments.get("x-max-priority", self.max_priority)
        if max_priority is None:
            max_priority = conf.task_queue_max_priority
        queue_type = self.queue_arguments.get("x-queue-type", conf.task_default_queue_type)
        routing_key = self.routing_key
        if routing_key is None:
            routing_key = "" if exchange.type == "fanout" else self.name
        return QueueSpec(
            name=self.name,
            exchange=exchange.name,
            routing_key=routing_key,
            exchange_type=exchange.type,
            durable=self.durable,
            max_priority=max_priority,
            queue_type=queue_type,
        )


def check_task_queues(value: Any, name: str) -> list[Queue]:
    """Validate ``task_queues``: Queue objects (or plain names), no name twice."""
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ImproperlyConfigured(f"{name} must be a list of Queue objects, got {value!r}")
    queues: list[Queue] = []
    for entry in value:
        item = Queue(entry) if isinstance(entry, str) else entry
        if not isinstance(item, Queue):
            raise ImproperlyConfigured(
                f"{name} entries must be celeriac.Queue objects, got {item!r} "
                "(from celeriac import Queue, Exchange)"
            )
        queues.append(item)
    names = [q.name for q in queues]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ImproperlyConfigured(f"{name} lists queue(s) {twice} more than once")
    return queues


def queue_spec(conf: Settings, name: str) -> QueueSpec:
    """How queue ``name`` is declared, by workers and clients alike."""
    for queue in conf.task_queues:
        if queue.name == name:
            return queue.spec(conf)
    if name == conf.task_default_queue:
        return QueueSpec(
            name=name,
            exchange=conf.task_default_exchange or name,
            routing_key=conf.task_default_routing_key or name,
            exchange_type=conf.task_default_exchange_type,
            max_priority=conf.task_queue_max_priority,
            queue_type=conf.task_default_queue_type,
        )
    return QueueSpec(
        name=name,
        exchange=name,
        routing_key=name,
        max_priority=conf.task_queue_max_priority,
        queue_type=conf.task_default_queue_type,
    )


def defined_queue(conf: Settings, name: str) -> Queue | None:
    """The ``task_queues`` entry named ``name``, if any."""
    for queue in conf.task_queues:
        if queue.name == name:
            return queue
    return None
