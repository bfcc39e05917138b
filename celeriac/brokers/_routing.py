"""AMQP-style routing for celeriac's own transports (memory, SQLite).

The rules are AMQP 0-9-1's, so a routing configuration written for RabbitMQ routes the same way
here:

* the default exchange ``""`` delivers to the queue named by the routing key (no declaration
  needed, as with RabbitMQ's implicit bindings);
* a ``direct`` exchange delivers to queues bound with exactly the routing key;
* a ``fanout`` exchange delivers to every bound queue;
* a ``topic`` exchange matches dot-separated words, ``*`` standing for exactly one word and ``#``
  for zero or more.

Unlike AMQP, a message that matches no queue is never dropped: the publish fails with
:class:`~celeriac.exceptions.RoutingError` (AMQP would need ``mandatory`` and a return listener).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from celeriac.brokers.base import QueueSpec
from celeriac.exceptions import ImproperlyConfigured, RoutingError

#: Exchange types celeriac's own transports implement.
EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic"})

#: AMQP priorities are one unsigned byte.
MAX_PRIORITY = 255


#: RabbitMQ's ``x-queue-type`` values celeriac declares; the other transports treat both alike.
QUEUE_TYPES = frozenset({"classic", "quorum"})


def check_queue_spec(spec: QueueSpec) -> None:
    """Raise ImproperlyConfigured for a queue declaration these transports cannot honour."""
    if not isinstance(spec.name, str) or not spec.name:
        raise ImproperlyConfigured(f"queue name must be a non-empty string, got {spec.name!r}")
    if spec.exchange_type not in EXCHANGE_TYPES:
        raise ImproperlyConfigured(
            f"queue {spec.name!r}: exchange type {spec.exchange_type!r} is not supported; "
            f"use one of {sorted(EXCHANGE_TYPES)}"
        )
    if spec.exchange == "" and spec.routing_key not in ("", spec.name):
        raise ImproperlyConfigured(
            f"queue {spec.name!r}: the default exchange '' always routes by queue name; "
            f"routing key {spec.routing_key!r} would never match (name an exchange to bind it)"
        )
    if spec.queue_type not in QUEUE_TYPES:
        raise ImproperlyConfigured(
            f"queue {spec.name!r}: queue type {spec.queue_type!r} is not supported; "
            f"use one of {sorted(QUEUE_TYPES)}"
        )
    if spec.max_priority is not None and (
        not isinstance(spec.max_priority, int) or not 0 <= spec.max_priority <= MAX_PRIORITY
    ):
        raise ImproperlyConfigured(
            f"queue {spec.name!r}: max_priority must be an integer 0-{MAX_PRIORITY} or None, "
            f"got {spec.max_priority!r}"
        )


def clamp_priority(priority: int, max_priority: int | None) -> int:
    """A message's priority as the queue stores it: 0..max_priority (AMQP caps, never refuses)."""
    ceiling = MAX_PRIORITY if max_priority is None else max_priority
    return min(max(priority, 0), ceiling)


@functools.lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether an AMQP topic binding ``pattern`` matches ``routing_key``.

    The empty string has no words (as in RabbitMQ), so ``#`` matches it and ``*`` does not.
    """
    words = routing_key.split(".") if routing_key else []
    parts = pattern.split(".") if pattern else []
    # matched[j]: parts[:i] can match words[:j]; classic wildcard DP over words.
    matched = [True] + [False] * len(words)
    for part in parts:
        if part == "#":
            # Zero or more words: reachable from any earlier reachable position.
            for j in range(1, len(words) + 1):
                matched[j] = matched[j] or matched[j - 1]
        else:
            for j in range(len(words), 0, -1):
                matched[j] = matched[j - 1] and (part in ("*", words[j - 1]))
            matched[0] = False
    return matched[len(words)]


def route(
    exchange: str,
    exchange_type: str,
    bindings: Iterable[tuple[str, str]],
    routing_key: str,
) -> list[str]:
    """Queues a message published to a named exchange goes to, in binding order, without repeats.

    ``bindings`` are ``(binding_key, queue)`` pairs of that exchange. Raises RoutingError when no
    queue matches.
    """
    if exchange_type == "fanout":
        targets = [queue for _, queue in bindings]
    elif exchange_type == "topic":
        targets = [queue for key, queue in bindings if topic_matches(key, routing_key)]
    else:
        targets = [queue for key, queue in bindings if key == routing_key]
    if not targets:
        raise RoutingError(
            f"no queue is bound to exchange {exchange!r} ({exchange_type}) "
            f"for routing key {routing_key!r}; declare the queue first"
        )
    return list(dict.fromkeys(targets))


def default_exchange_queue(routing_key: str) -> str:
    """The queue the default exchange ``""`` routes ``routing_key`` to."""
    if not isinstance(routing_key, str) or not routing_key:
        raise RoutingError(
            "publishing to the default exchange '' needs the queue name as routing key"
        )
    return routing_key
