"""Deliveries read off the socket by celeriac, before the AMQP client sees them.

Why: aiormq reads every frame on its own (an awaited lock and three awaited reads, a ``BytesIO``,
pamqp's generic unmarshalling into Python objects: the content header's properties and header
table included), hands it to the channel's reader task through an ``asyncio.Queue`` and starts one
task per delivery for the consumer callback. A message is three frames, so a worker draining a
queue spent about half of its event loop's time there, nearly half of that in pamqp.

How: aiormq opens its socket through a ``TransportFactory`` (a documented argument of its
``Connection``, there since 7.1: ``create(url, **kwargs)`` returns a stream reader and writer).
:class:`TapFactory` opens the same TCP/TLS connection, but the reader it returns is a
:class:`DeliveryTap`: a ``StreamReader`` that looks at the frames as they arrive, in
``feed_data``. ``basic.deliver`` and its content frames, on a channel :meth:`DeliveryTap.divert`
registered, are assembled and given to that channel's sink at once, as one call with plain
values; they never reach aiormq. Every other frame (replies, ``basic.get-ok`` and
``basic.return`` with their content, channel and connection frames, heartbeats) goes on to aiormq
unchanged and in order, so the client keeps its whole protocol: handshake, heartbeats, RPCs,
closes, errors. Nothing of aiormq's internals is touched.

* A sink may refuse a delivery (it returns False or raises, e.g. for a header it cannot decode):
  the delivery's frames then go on to aiormq as they came, to its usual consumer callback.
* Order: a delivery is handed over as soon as its last frame is read, before aiormq parses what
  came after it. A reply that follows deliveries on the wire (``basic.qos-ok``, ``basic.cancel-ok``)
  thus finds them handed over already, as it would have before.
* Liveness: aiormq counts a connection on which it reads no frame for three heartbeat intervals
  as dead. While it sees only deliveries, RabbitMQ sends no heartbeats (any traffic counts), so
  the tap passes aiormq a heartbeat frame of its own when deliveries alone arrived for a second.
* A stream the tap cannot parse as frames (the server's protocol header refusing the version,
  say, or a malformed frame) goes to aiormq whole from that byte on, to fail there as it would.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex

if TYPE_CHECKING:
    from yarl import URL

__all__ = ["DeliverySink", "DeliveryTap", "TapFactory", "tap_factory"]

logger = logging.getLogger(__name__)

#: ``sink(consumer_tag, delivery_tag, redelivered, exchange, routing_key, properties, body)``:
#: ``properties`` is the content header from the property flags on; True if the sink took the
#: delivery (it must then ack or reject it on that channel), False to leave it to the client.
DeliverySink = Callable[[str, int, bool, str, str, bytes, bytes], bool]

_FRAME_HEADER = struct.Struct(">BHI")
_unpack_frame_header = _FRAME_HEADER.unpack_from
_unpack_u64 = struct.Struct(">Q").unpack_from
_CONTENT_HEADER = struct.Struct(">HHQ")
_FRAME_END = 0xCE
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_FRAME_TYPES = frozenset({_METHOD, _HEADER, _BODY, _HEARTBEAT})
#: Class and method ids of basic.deliver (60, 60), as they start a method frame's payload.
_DELIVER = b"\x00\x3c\x00\x3c"
_HEARTBEAT_FRAME = _FRAME_HEADER.pack(_HEARTBEAT, 0, 0) + bytes((_FRAME_END,))
#: Seconds of deliveries alone after which aiormq is shown a heartbeat.
_LIVENESS = 1.0


class _Content:
    """A delivery being assembled: its ``basic.deliver`` fields, then its header and body."""

    __slots__ = (
        "body_size",
        "consumer_tag",
        "delivery_tag",
        "exchange",
        "parts",
        "properties",
        "received",
        "redelivered",
        "routing_key",
        "sink",
    )

    def __init__(
        self,
        sink: DeliverySink,
        consumer_tag: str,
        delivery_tag: int,
        redelivered: bool,
        exchange: str,
        routing_key: str,
    ) -> None:
        self.sink = sink
        self.consumer_tag = consumer_tag
        self.delivery_tag = delivery_tag
        self.redelivered = redelivered
        self.exchange = exchange
        self.routing_key = routing_key
        #: The content header from the property flags on; None until it arrives.
        self.properties: bytes | None = None
        self.body_size = 0
        self.parts: list[bytes] = []
        self.received = 0

    def frames(self, channel: int) -> bytes:
        """The frames this delivery came in, as they came (to hand it to the client instead)."""
        exchange = self.exchange.encode()
        key = self.routing_key.encode()
        tag = self.consumer_tag.encode()
        method = b"".join(
            (
                _DELIVER,
                bytes((len(tag),)),
                tag,
                struct.pack(">QB", self.delivery_tag, 1 if self.redelivered else 0),
                bytes((len(exchange),)),
                exchange,
                bytes((len(key),)),
                key,
            )
        )
        out = [_frame(_METHOD, channel, method)]
        if self.properties is not None:
            header = _CONTENT_HEADER.pack(60, 0, self.body_size) + self.properties
            out.append(_frame(_HEADER, channel, header))
            out.extend(_frame(_BODY, channel, part) for part in self.parts)
        return b"".join(out)


def _frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME_HEADER.pack(kind, channel, len(payload)) + payload + bytes((_FRAME_END,))


class DeliveryTap(asyncio.StreamReader):
    """The client's stream reader, taking out the deliveries of diverted channels (see the
    module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._sinks: dict[int, DeliverySink] = {}
        self._contents: dict[int, _Content] = {}
        #: Bytes of a frame not complete yet.
        self._pending = bytearray()
        #: Set once the stream is not frames the tap can follow: everything goes on unread.
        self._raw = False
        self._passed_at = time.monotonic()

    def divert(self, channel: int, sink: DeliverySink) -> None:
        """Give the deliveries of ``channel`` to ``sink`` from now on."""
        self._sinks[channel] = sink

    def stop_diverting(self, channel: int, sink: DeliverySink | None = None) -> None:
        """Leave the deliveries of ``channel`` to the client again (if ``sink`` is its sink)."""
        if sink is None or self._sinks.get(channel) is sink:
            self._sinks.pop(channel, None)

    def diverting(self, channel: int) -> bool:
        return channel in self._sinks

    # -- asyncio.StreamReader ----------------------------------------------------------------------

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        if self._raw:
            super().feed_data(data)
            return
        chunk = data if isinstance(data, bytes) else bytes(data)
        if self._pending:
            buffer: bytes | bytearray = self._pending
            buffer += chunk
        else:
            buffer = chunk
        out: list[bytes | bytearray] = []
        used = self._scan(buffer, out)
        self._pending = bytearray(buffer[used:]) if used < len(buffer) else bytearray()
        if out:
            super().feed_data(b"".join(out) if len(out) > 1 else out[0])

    def feed_eof(self) -> None:
        if self._pending:
            # A frame cut short: the client finds out, as it would have.
            super().feed_data(bytes(self._pending))
            self._pending = bytearray()
        super().feed_eof()

    # -- frames ----------------------------------------------------------------------------------

    def _scan(self, buffer: bytes | bytearray, out: list[bytes | bytearray]) -> int:
        """Read the complete frames of ``buffer``: the diverted ones are handed over, the others
        appended to ``out`` (in order, in runs). Returns how many bytes were read."""
        size = len(buffer)
        pos = 0
        run = 0  # where the run of frames to pass on starts
        took = False
        sinks = self._sinks
        contents = self._contents
        while size - pos >= 8:
            kind, channel, length = _unpack_frame_header(buffer, pos)
            end = pos + 7 + length
            if end >= size:
                break
            try:
                if buffer[end] != _FRAME_END or kind not in _FRAME_TYPES:
                    raise ValueError(f"not an AMQP frame: {bytes(buffer[pos : pos + 8])!r}")
                if channel in contents:
                    handed = self._content_frame(kind, channel, buffer, pos + 7, end)
                elif (
                    kind == _METHOD
                    and channel in sinks
                    and buffer[pos + 7 : pos + 11] == _DELIVER
                    and (started := self._start(channel, sinks[channel], buffer, pos + 11, end))
                    is not None
                ):
                    end, handed = started
                else:
                    pos = end + 1  # not ours: passed on with its run
                    continue
            except Exception as exc:
                # Not frames as the tap knows them (or a bug here): the client reads the rest,
                # deliveries being assembled included, and fails as it would have.
                logger.warning("AMQP frames left to the client from here on: %r", exc)
                self._raw = True
                if run < pos:
                    out.append(buffer[run:pos])
                out.append(self._unfinished())
                out.append(buffer[pos:])
                return size
            took = True
            if run < pos:
                out.append(buffer[run:pos])
            if handed:
                out.append(handed)
            pos = run = end + 1
        if run < pos:
            out.append(buffer[run:pos])
        if out:
            self._passed_at = time.monotonic()
        elif took and time.monotonic() - self._passed_at >= _LIVENESS:
            out.append(_HEARTBEAT_FRAME)
            self._passed_at = time.monotonic()
        return pos

    def _start(
        self, channel: int, sink: DeliverySink, buffer: bytes | bytearray, pos: int, end: int
    ) -> tuple[int, bytes] | None:
        """Read a ``basic.deliver`` (its arguments at ``buffer[pos:end]``); None to pass it on.

        When its content follows whole in ``buffer`` (the usual case: a header frame and one
        body frame), the delivery is handed over at once; else it is assembled frame by frame.
        Returns where the frames read end (at their frame-end byte) and what to pass on.
        """
        try:
            size = buffer[pos]
            consumer_tag = buffer[pos + 1 : pos + 1 + size].decode()
            pos += 1 + size
            delivery_tag = _unpack_u64(buffer, pos)[0]
            redelivered = bool(buffer[pos + 8] & 1)
            pos += 9
            size = buffer[pos]
            exchange = buffer[pos + 1 : pos + 1 + size].decode()
            pos += 1 + size
            size = buffer[pos]
            routing_key = buffer[pos + 1 : pos + 1 + size].decode()
            pos += 1 + size
        except (IndexError, struct.error, UnicodeDecodeError):
            return None
        if pos != end:
            return None
        content = _Content(sink, consumer_tag, delivery_tag, redelivered, exchange, routing_key)
        # The content header and a single body frame right behind, complete?
        total = len(buffer)
        header = end + 1
        if total - header >= 8 + 14:
            kind, number, length = _unpack_frame_header(buffer, header)
            header_end = header + 7 + length
            if (
                kind == _HEADER
                and number == channel
                and length >= 14
                and header_end < total
                and buffer[header_end] == _FRAME_END
            ):
                body_size = _unpack_u64(buffer, header + 11)[0]
                content.body_size = body_size
                content.properties = bytes(buffer[header + 19 : header_end])
                if body_size == 0:
                    return header_end, self._hand_over(channel, content)
                body = header_end + 1
                if total - body >= 8:
                    kind, number, length = _unpack_frame_header(buffer, body)
                    body_end = body + 7 + length
                    if (
                        kind == _BODY
                        and number == channel
                        and length == body_size
                        and body_end < total
                        and buffer[body_end] == _FRAME_END
                    ):
                        content.parts.append(bytes(buffer[body + 7 : body_end]))
                        content.received = length
                        return body_end, self._hand_over(channel, content)
                self._contents[channel] = content
                return header_end, b""
        self._contents[channel] = content
        return end, b""

    def _content_frame(
        self, kind: int, channel: int, buffer: bytes | bytearray, pos: int, end: int
    ) -> bytes:
        """Add a frame to the delivery being assembled on ``channel``; what to pass on."""
        content = self._contents[channel]
        if content.properties is None and kind == _HEADER and end - pos >= 14:
            content.body_size = _unpack_u64(buffer, pos + 4)[0]
            content.properties = bytes(buffer[pos + 12 : end])
        elif content.properties is not None and kind == _BODY:
            content.parts.append(bytes(buffer[pos:end]))
            content.received += end - pos
        else:
            # Not the frame the protocol says comes next: hand the delivery to the client as it
            # came, with this frame, to judge.
            del self._contents[channel]
            return content.frames(channel) + bytes(buffer[pos - 7 : end + 1])
        if content.received < content.body_size:
            return b""
        del self._contents[channel]
        return self._hand_over(channel, content)

    def _hand_over(self, channel: int, content: _Content) -> bytes:
        """Give a complete delivery to its sink; its frames, to pass on, if the sink refuses."""
        parts = content.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        properties = content.properties
        assert properties is not None
        try:
            if content.sink(
                content.consumer_tag,
                content.delivery_tag,
                content.redelivered,
                content.exchange,
                content.routing_key,
                properties,
                body,
            ):
                return b""
        except Exception:
            logger.debug("A delivery goes to the client's own decoding", exc_info=True)
        return content.frames(channel)

    def _unfinished(self) -> bytes:
        """The frames of deliveries being assembled, to pass on when the tap stops reading."""
        frames = b"".join(content.frames(channel) for channel, content in self._contents.items())
        self._contents.clear()
        return frames


class TapFactory:
    """Opens an aiormq connection's socket with a :class:`DeliveryTap` as its reader.

    Built by :func:`tap_factory` as a subclass of aiormq's ``TransportFactory``; ``tap`` is the
    reader of the last connection opened.
    """

    tap: DeliveryTap | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, Any]:
        from aiormq.exceptions import AMQPConnectionError

        # As aiormq's own TCP and TLS factories do: its SSL context (given, or made from the
        # URL's certificates) for amqps, the remaining arguments for create_connection.
        provider = kwargs.pop("ssl_context_provider", None)
        context = None
        if url.scheme == "amqps":
            if provider is None:
                raise AMQPConnectionError("amqps without an SSL context")
            context = await provider.get_context()
        if url.host is None or url.port is None:
            raise AMQPConnectionError(f"no host and port in {url}")
        loop = asyncio.get_running_loop()
        tap = DeliveryTap(loop)
        protocol = asyncio.StreamReaderProtocol(tap, loop=loop)
        try:
            transport, _ = await loop.create_connection(
                lambda: protocol, host=url.host, port=url.port, ssl=context, **kwargs
            )
        except OSError as exc:
            raise AMQPConnectionError(*exc.args) from exc
        self.tap = tap
        return tap, asyncio.StreamWriter(transport, protocol, tap, loop)


def tap_factory() -> TapFactory | None:
    """A factory for one aiormq connection, or None when this aiormq takes none (then the
    client reads every frame itself)."""
    factory = _factory_class()
    return factory() if factory is not None else None


@functools.cache
def _factory_class() -> type[TapFactory] | None:
    try:
        from aiormq.connection import TransportFactory
    except ImportError:  # pragma: no cover - aiormq older than 7.1
        return None

    class _TapFactory(TapFactory, TransportFactory):
        pass

    return _TapFactory
