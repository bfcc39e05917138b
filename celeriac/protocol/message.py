"""The Celery task message as one typed value, independent of its wire form.

:class:`TaskMessage` is what the app produces when a task is called and what the worker executes.
``celeriac.protocol`` turns it into protocol v2 headers/properties/body (and reads v1 and v2 back);
``celeriac.codecs`` turns the body into bytes. Nothing here does I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: A canvas signature in its wire form (celery-wire.md §10.1): a dict with ``task``, ``args``,
#: ``kwargs``, ``options``, ``subtask_type`` and ``immutable``.
SignatureDict = dict[str, Any]


@dataclass(slots=True)
class TaskMessage:
    """One task invocation: what to run, with which arguments, under which delivery options."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Earliest execution time (tz-aware UTC) or None.
    eta: datetime | None = None
    #: Time after which the task must not run (tz-aware UTC) or None.
    expires: datetime | None = None
    retries: int = 0
    #: ``(hard, soft)`` time limits in seconds, hard first as on the wire.
    timelimit: tuple[float | None, float | None] = (None, None)
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    shadow: str | None = None
    origin: str | None = None
    #: None means "use the task's own default".
    ignore_result: bool | None = None
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    callbacks: list[SignatureDict] | None = None
    errbacks: list[SignatureDict] | None = None
    #: Remaining chain, reversed as on the wire: the next step is the last element.
    chain: list[SignatureDict] | None = None
    chord: SignatureDict | None = None
    #: AMQP-style properties.
    reply_to: str | None = None
    correlation_id: str | None = None
    priority: int | None = None
    delivery_mode: int = 2
    #: Headers this model does not name (custom ``headers=`` of ``apply_async``, stamps, …);
    #: written back at the top level of the headers, as Celery does.
    extra_headers: dict[str, Any] = field(default_factory=dict)
    #: The protocol version the message was read from (always written as 2).
    protocol: int = 2


def uuid4_text(random: bytes | None = None) -> str:
    """A random UUID (version 4) as text, as ``str(uuid.uuid4())`` writes it, for a third of
    the cost (task ids and delivery tags: one or two per message sent).

    ``random``: 16 bytes from ``os.urandom`` to use (one read serves many ids); read here when
    not given.
    """
    data = bytearray(os.urandom(16) if random is None else random)
    data[6] = (data[6] & 0x0F) | 0x40  # version 4
    data[8] = (data[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = data.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
