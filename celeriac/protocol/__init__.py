"""Celery task message protocol: the typed message and its wire forms (v2 written, v1/v2 read).

Sans-IO: everything here turns values into values. ``to_v2`` / ``from_wire_parts`` work on Python
objects (headers, properties and the *decoded* body); ``encode`` / ``decode`` add the body's
serialization and compression through :mod:`celeriac.codecs`.
"""

from celeriac.protocol.envelope import TransportMessage
from celeriac.protocol.message import SignatureDict, TaskMessage
from celeriac.protocol.parse import from_wire_parts
from celeriac.protocol.v2 import to_v2
from celeriac.protocol.wire import DEFAULT_MAX_BODY_SIZE, decode, encode

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "SignatureDict",
    "TaskMessage",
    "TransportMessage",
    "decode",
    "encode",
    "from_wire_parts",
    "to_v2",
]
