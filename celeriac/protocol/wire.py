"""A :class:`TaskMessage` to and from the bytes a transport carries.

``encode``: protocol v2 parts (:func:`~celeriac.protocol.v2.to_v2`), the body serialized with
:mod:`celeriac.codecs` and optionally compressed (header ``compression: <mime>``, as kombu does;
``content_type``/``content_encoding`` keep describing the uncompressed payload).

``decode`` undoes that in the order that keeps a hostile message cheap: size limit on the raw
bytes, accept-list check, bounded decompression, deserialization, then protocol detection and
field validation. Undecodable bytes raise :class:`~celeriac.exceptions.DecodeError` (Celery acks and
drops such a message); a refused content type raises
:class:`~celeriac.exceptions.ContentDisallowed` and a well-decoded message of the wrong shape
:class:`~celeriac.exceptions.InvalidTaskError` (Celery rejects both).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, tzinfo

from celeriac import codecs
from celeriac.exceptions import ContentDisallowed, DecodeError
from celeriac.protocol.envelope import TransportMessage
from celeriac.protocol.message import TaskMessage
from celeriac.protocol.parse import from_wire_parts
from celeriac.protocol.v2 import from_v2, to_v2

__all__ = ["DEFAULT_MAX_BODY_SIZE", "decode", "encode"]

#: Largest body :func:`decode` accepts, compressed or not (and the limit on what a compressed
#: body may expand to). Celery has no limit; one huge message should not take a worker's memory.
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024


def encode(
    msg: TaskMessage,
    *,
    serializer: str = "json",
    compression: str | None = None,
    now: datetime | None = None,
) -> TransportMessage:
    """Protocol v2 message ready for any transport.

    ``serializer`` is a codec name or content type; ``compression`` an alias (``gzip``) or MIME
    type. ``now`` only feeds the ``expiration`` property (see :func:`to_v2`). Raises
    :class:`~celeriac.exceptions.EncodeError` when the arguments cannot be serialized and
    :class:`~celeriac.exceptions.ImproperlyConfigured` for an unknown serializer or compression.
    """
    headers, properties, body = to_v2(msg, now=now)
    payload = codecs.dumps(body, serializer)
    data = payload.data
    if compression is not None:
        mime, data = codecs.compress(data, compression)
        headers["compression"] = mime
    return TransportMessage(
        body=data,
        content_type=payload.content_type,
        content_encoding=payload.content_encoding,
        headers=headers,
        properties=properties,
    )


def decode(
    message: TransportMessage,
    accept: Collection[str],
    *,
    max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    local_tz: tzinfo | None = None,
) -> TaskMessage:
    """Read a task message (protocol v1 or v2) from what a transport delivered.

    ``accept`` holds *content types*, as returned by ``codecs.resolve_accept(["json", ...])``
    (resolve it once, not per message). ``local_tz`` only matters for v1 bodies sent with
    ``utc: false``.
    """
    data = message.body
    if len(data) > max_body_size:
        raise DecodeError(
            f"message body is {len(data)} bytes, over the limit of {max_body_size} (max_body_size)"
        )
    headers = message.headers
    compression = headers.get("compression")
    if compression is not None:
        if not isinstance(compression, str) or not compression:
            raise DecodeError(f"'compression' header must be a MIME type, got {compression!r}")
        # Refuse a disallowed type before spending CPU on decompressing it; loads() checks again.
        content_type = message.content_type or "application/data"
        if content_type not in accept and content_type not in codecs.TRUSTED_CONTENT:
            raise ContentDisallowed(
                f"Refusing to deserialize untrusted content of type {content_type}"
            )
        data = codecs.decompress(data, compression, max_size=max_body_size)
    body = codecs.loads(data, message.content_type, message.content_encoding, accept)
    properties = message.properties
    if type(headers) is dict and type(properties) is dict and "task" in headers:
        # What from_wire_parts does with the usual message (protocol v2), one call sooner.
        return from_v2(headers, properties, body)
    return from_wire_parts(headers, properties, body, local_tz=local_tz)
