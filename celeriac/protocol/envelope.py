"""The message every transport carries: an opaque body plus AMQP-style metadata.

It sits in the protocol layer because it is what the task protocol is written into and read
from; the transports (one layer up) store and deliver it without looking inside the body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class TransportMessage:
    """A message as every transport carries it: an opaque body plus AMQP-style metadata.

    ``properties`` uses AMQP/kombu names: ``correlation_id``, ``reply_to``, ``delivery_mode``,
    ``priority``, ``expiration`` (and whatever else a producer set).
    """

    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def priority(self) -> int:
        """The message priority (0-9, higher runs first on celeriac's own transports)."""
        value = self.properties.get("priority")
        return int(value) if isinstance(value, int | float) else 0
