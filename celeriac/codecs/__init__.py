"""Content type ⇄ bytes: serializers, compression and accept lists. Knows nothing of tasks.

Built-in serializers, with the content types and encodings Celery/kombu put on the wire:

=========  ==================================  ================  ===============================
Name       Content type                        Content encoding  Notes
=========  ==================================  ================  ===============================
json       ``application/json``                ``utf-8``         default; kombu ≥ 5.3 type markers
pickle     ``application/x-python-serialize``  ``binary``        protocol 4; only if accepted
msgpack    ``application/x-msgpack``           ``binary``        extra ``celeriac[msgpack]``
yaml       ``application/x-yaml``              ``utf-8``         safe dump/load; ``celeriac[yaml]``
xml        ``application/xml``                 ``utf-8``         celeriac's own schema
=========  ==================================  ================  ===============================

Typical use::

    payload = codecs.dumps(body, "json")            # EncodedPayload(data, content_type, ...)
    accept = codecs.resolve_accept(["json"])        # frozenset({"application/json"})
    body = codecs.loads(payload.data, payload.content_type, payload.content_encoding, accept)
    mime, data = codecs.compress(payload.data, "gzip")   # "application/x-gzip", zlib stream
"""

from __future__ import annotations

from celeriac.codecs import json, msgpack, pickle, xml, yaml
from celeriac.codecs.compression import (
    COMPRESSED_PAYLOAD_MAGIC,
    compress,
    compress_payload,
    decompress,
    decompress_payload,
)
from celeriac.codecs.registry import (
    TRUSTED_CONTENT,
    Codec,
    EncodedPayload,
    content_type_of,
    dumps,
    dumps_data,
    loads,
    register,
    resolve_accept,
    serializer_names,
    unregister,
)

for _name, _codec in (
    ("json", json),
    ("pickle", pickle),
    ("msgpack", msgpack),
    ("yaml", yaml),
    ("xml", xml),
):
    register(_name, _codec.CONTENT_TYPE, _codec.CONTENT_ENCODING, _codec.encode, _codec.decode)
del _name, _codec

__all__ = [
    "COMPRESSED_PAYLOAD_MAGIC",
    "TRUSTED_CONTENT",
    "Codec",
    "EncodedPayload",
    "compress",
    "compress_payload",
    "content_type_of",
    "decompress",
    "decompress_payload",
    "dumps",
    "dumps_data",
    "loads",
    "register",
    "resolve_accept",
    "serializer_names",
    "unregister",
]
