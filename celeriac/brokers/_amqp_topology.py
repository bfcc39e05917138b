"""The RabbitMQ entities the AMQP transport declares, named and shaped exactly as Celery's.

Task queues (Celery 5.7 defaults, captured with ``rabbitmqctl``): a durable ``direct`` exchange named
like the queue's exchange, a durable, non-exclusive, non-auto-delete queue, and a binding with the
routing key. Queue arguments only where Celery adds them: ``x-max-priority`` (``max_priority``),
``x-queue-type: quorum`` (quorum queues; nothing for classic ones, so a queue declared by Celery
without the argument is equivalent), ``x-delivery-limit`` when the ``delivery_limit`` transport
option asks for RabbitMQ's poison-message cap.

Delayed delivery (Celery 5.5+ "native delayed delivery", kombu's
``native_delayed_delivery.py``): 28 levels ``celery_delayed_0`` … ``celery_delayed_27``, each a
durable topic exchange and a durable queue of that name with

* ``x-queue-type`` (``quorum`` by default, as Celery's ``broker_native_delayed_delivery_queue_type``),
* ``x-overflow: reject-publish``,
* ``x-message-ttl`` = 2**level seconds (in ms),
* ``x-dead-letter-exchange`` = the level below, ``celery_delayed_delivery`` for level 0,
* ``x-dead-letter-strategy: at-least-once`` for quorum queues.

A delayed message's routing key is its delay in whole seconds as 28 dot-separated binary digits,
most significant first, then the destination routing key: ``0.0.…1.0.1.celery`` is 5 s for
``celery``. It is published to ``celery_delayed_27``. Level N's queue is bound to its exchange
with ``*.`` repeated 27 - N times then ``1.#`` (this bit set: wait 2**N s in the queue, then
dead-letter to level N-1), and exchange N-1 is bound to exchange N with ``*.`` repeated 27 - N
times then ``0.#`` (bit clear: go straight down). Level 0 hands over to the topic exchange
``celery_delayed_delivery``, where each destination queue is bound with ``#.<routing key>``.
The entities are declared with exactly these names and arguments, so a Celery worker sharing the
broker finds them equivalent (no PRECONDITION_FAILED).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from celeriac.exceptions import ImproperlyConfigured

LEVELS = 28
MAX_DELAY = 2**LEVELS - 1
DELIVERY_EXCHANGE = "celery_delayed_delivery"
TOP_EXCHANGE = f"celery_delayed_{LEVELS - 1}"

_DELAY_PREFIX = re.compile(rf"^(?:[01]\.){{{LEVELS}}}")


def level_name(level: int) -> str:
    return f"celery_delayed_{level}"


def level_queue_arguments(level: int, queue_type: str) -> dict[str, Any]:
    """The arguments kombu declares delay queue ``level`` with."""
    arguments: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-overflow": "reject-publish",
        "x-message-ttl": 2**level * 1000,
        "x-dead-letter-exchange": level_name(level - 1) if level > 0 else DELIVERY_EXCHANGE,
    }
    if queue_type == "quorum":
        arguments["x-dead-letter-strategy"] = "at-least-once"
    return arguments


@dataclass(frozen=True, slots=True)
class DelayLevel:
    name: str
    arguments: dict[str, Any]
    #: Binding key of the level's queue to its exchange (this bit set).
    queue_key: str
    #: The level below and the binding key from this exchange to it (bit clear); None at level 0.
    down: tuple[str, str] | None


def delay_levels(queue_type: str) -> list[DelayLevel]:
    """Levels from 27 down to 0, in the order kombu declares them."""
    levels = []
    for level in range(LEVELS - 1, -1, -1):
        stars = "*." * (LEVELS - 1 - level)
        down = (level_name(level - 1), f"{stars}0.#") if level > 0 else None
        levels.append(
            DelayLevel(
                name=level_name(level),
                arguments=level_queue_arguments(level, queue_type),
                queue_key=f"{stars}1.#",
                down=down,
            )
        )
    return levels


#: Binding key from level 0's exchange to the delivery exchange (bit 0 clear).
DELIVERY_KEY = "*." * (LEVELS - 1) + "0.#"


def delay_routing_key(seconds: int, routing_key: str) -> str:
    """The routing key that delays a message ``seconds`` (1 … 2**28-1) on its way to ``routing_key``.

    A routing key that already carries a delay prefix (a retried message's) loses it first, as
    kombu does.
    """
    if not 1 <= seconds <= MAX_DELAY:
        raise ValueError(f"delay must be 1 … {MAX_DELAY} seconds, got {seconds}")
    bare = strip_delay_prefix(routing_key)
    return ".".join(format(seconds, f"0{LEVELS}b")) + "." + bare


def strip_delay_prefix(routing_key: str) -> str:
    """``routing_key`` without a delay prefix (unchanged when it has none)."""
    if not routing_key.startswith(("0.", "1.")):  # most keys: spared the regular expression
        return routing_key
    return _DELAY_PREFIX.sub("", routing_key, count=1)


def delivery_binding_key(routing_key: str) -> str:
    """How a queue bound with ``routing_key`` is bound to the delivery exchange (as kombu binds)."""
    return routing_key if routing_key.startswith("#") else f"#.{routing_key}"


def queue_arguments(
    name: str,
    *,
    queue_type: str,
    max_priority: int | None,
    durable: bool,
    delivery_limit: int | None,
    dead_letter_queue: str | None,
) -> dict[str, Any]:
    """The ``queue.declare`` arguments of a task queue, as Celery writes them."""
    arguments: dict[str, Any] = {}
    if queue_type == "quorum":
        if max_priority is not None:
            raise ImproperlyConfigured(
                f"queue {name!r}: quorum queues have no priorities; drop max_priority "
                "or use a classic queue"
            )
        if not durable:
            raise ImproperlyConfigured(f"queue {name!r}: quorum queues are always durable")
        arguments["x-queue-type"] = "quorum"
        if delivery_limit is not None:
            arguments["x-delivery-limit"] = delivery_limit
            if dead_letter_queue is not None:
                # Past the limit RabbitMQ drops the message unless the queue dead-letters it:
                # send it to our dead-letter queue through the default exchange.
                arguments["x-dead-letter-exchange"] = ""
                arguments["x-dead-letter-routing-key"] = dead_letter_queue
    elif max_priority is not None:
        arguments["x-max-priority"] = max_priority
    return arguments


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'"
    r"(?: in vhost '[^']*')?: (?P<detail>.*)$"
)
_CURRENT_IS = re.compile(r"current is '?(?P<current>[^']*)'?")


def explain_precondition(kind: str, name: str, server_text: str) -> str:
    """A clear sentence for RabbitMQ's PRECONDITION_FAILED on re-declaring ``name``."""
    match = _INEQUIVALENT.search(server_text)
    if match and match["arg"] == "type" and kind == "exchange":
        current = _CURRENT_IS.search(match["detail"])
        if current:
            return (
                f"exchange {name!r} is already declared as {current['current']!r} with "
                f"different settings; declare it with the same type or delete it first "
                f"(server said: {server_text})"
            )
    what = f"argument {match['arg']!r}: {match['detail']}" if match else server_text
    return (
        f"{kind} {name!r} already exists on the broker with different settings ({what}). "
        f"RabbitMQ cannot change a declared {kind}: declare it exactly as it exists (queue type, "
        f"max_priority, durability), or delete it first (rabbitmqctl delete_{kind} …) "
        f"if its messages can go"
    )
