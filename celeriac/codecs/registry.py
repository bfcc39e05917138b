"""The serializer registry: serializer names and content types, ``dumps``/``loads``, accept lists.

A *codec* turns a Python value into bytes and back, and is known by a short name (``json``) and a
content type (``application/json``) — the name is what users configure (``task_serializer``), the
content type is what travels with a message or a stored result. Names never contain ``/`` and
content types always do, so both share one lookup table.

Security rule: :func:`loads` checks the content type against the accept list *before* anything is
decoded, so a payload of a type the caller did not opt into (pickle, yaml, …) is never parsed.
Like kombu, ``application/data`` and ``application/text`` (raw bytes / text, no parsing at all) are
always trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from celeriac.exceptions import ContentDisallowed, DecodeError, EncodeError, ImproperlyConfigured
from celeriac.utils.suggest import closest

#: Content types kombu always trusts: their payload is returned as bytes or text, never parsed.
TRUSTED_CONTENT: frozenset[str] = frozenset({"application/data", "application/text"})

#: Content encodings whose payload is left as bytes (kombu's ``SKIP_DECODE``).
_BINARY_ENCODINGS: frozenset[str] = frozenset({"binary", "ascii-8bit"})


@dataclass(frozen=True, slots=True)
class EncodedPayload:
    """A value after serialization: the bytes and the two properties that describe them."""

    data: bytes
    content_type: str
    content_encoding: str


@dataclass(frozen=True, slots=True)
class Codec:
    """One registered serializer."""

    name: str
    content_type: str
    content_encoding: str
    encoder: Callable[[Any], bytes]
    decoder: Callable[[bytes], Any]


#: Codecs by name *and* by content type (the two never collide: only content types contain "/").
_codecs: dict[str, Codec] = {}


def register(
    name: str,
    content_type: str,
    content_encoding: str,
    encoder: Callable[[Any], bytes],
    decoder: Callable[[bytes], Any],
) -> None:
    """Register a serializer, replacing any codec registered under the same name or content type.

    ``encoder`` returns bytes; ``decoder`` receives the payload bytes. Either may raise
    :class:`EncodeError` / :class:`DecodeError` with its own message; any other exception they
    raise is wrapped in one of those by :func:`dumps` / :func:`loads`.
    """
    if not name or "/" in name:
        raise ImproperlyConfigured(f"serializer name must be non-empty without '/': {name!r}")
    if "/" not in content_type:
        raise ImproperlyConfigured(f"content type must look like 'type/subtype': {content_type!r}")
    if content_type in TRUSTED_CONTENT:
        raise ImproperlyConfigured(f"{content_type} is reserved for raw payloads")
    if not content_encoding:
        raise ImproperlyConfigured("content encoding must be given ('utf-8', 'binary', ...)")
    unregister(name)
    stale = _codecs.get(content_type)
    if stale is not None:
        unregister(stale.name)
    codec = Codec(name, content_type, content_encoding, encoder, decoder)
    _codecs[name] = codec
    _codecs[content_type] = codec


def unregister(name: str) -> None:
    """Forget the serializer registered as ``name`` (a name or content type); no-op if unknown."""
    codec = _codecs.get(name)
    if codec is not None:
        del _codecs[codec.name]
        del _codecs[codec.content_type]


def serializer_names() -> list[str]:
    """The registered serializer names, sorted."""
    return sorted(key for key in _codecs if "/" not in key)


def content_type_of(serializer: str) -> str:
    """The content type of a serializer given by name or content type."""
    return _lookup(serializer).content_type


def _lookup(serializer: str) -> Codec:
    codec = _codecs.get(serializer)
    if codec is None:
        raise ImproperlyConfigured(
            f"unknown serializer {serializer!r}{_did_you_mean(serializer)}; "
            f"known serializers: {', '.join(serializer_names())}"
        )
    return codec


def _did_you_mean(word: str) -> str:
    match = closest(word, _codecs)
    return f" (did you mean {match!r}?)" if match else ""


def dumps(value: Any, serializer: str) -> EncodedPayload:
    """Serialize ``value`` with ``serializer`` (a name such as ``"json"``, or a content type).

    Raises :class:`ImproperlyConfigured` for an unknown serializer (or one whose optional
    dependency is missing) and :class:`EncodeError` for a value the serializer cannot represent.
    """
    codec = _codecs.get(serializer)
    if codec is None:
        codec = _lookup(serializer)
    return EncodedPayload(_encode(codec, value), codec.content_type, codec.content_encoding)


def dumps_data(value: Any, serializer: str) -> bytes:
    """The bytes :func:`dumps` would return, for callers that need no content type (a store
    writing many result documents with the serializer it was configured with). Same errors."""
    codec = _codecs.get(serializer)
    if codec is None:
        codec = _lookup(serializer)
    return _encode(codec, value)


def _encode(codec: Codec, value: Any) -> bytes:
    try:
        return codec.encoder(value)
    except (EncodeError, ImproperlyConfigured):
        raise
    except Exception as exc:
        raise EncodeError(f"{codec.name} cannot encode value: {_describe(exc)}") from exc


def loads(data: bytes, content_type: str, content_encoding: str, accept: Collection[str]) -> Any:
    """Deserialize ``data``, refusing content types that are not in ``accept``.

    ``accept`` holds content types (see :func:`resolve_accept`). The accept check happens before
    any decoding. As in kombu, ``content_encoding`` only matters for the raw ``application/data``
    and ``application/text`` payloads; a serializer knows its own encoding.

    Raises :class:`ContentDisallowed` for a refused content type and :class:`DecodeError` for an
    unknown content type or a payload that cannot be decoded.
    """
    if not content_type:
        # kombu's reading of a message without a content type: raw bytes.
        content_type = "application/data"
    if content_type in TRUSTED_CONTENT:
        return _decode_raw(data, content_encoding)
    if content_type not in accept:
        raise ContentDisallowed(_refusal(content_type, accept))
    codec = _codecs.get(content_type)
    if codec is None:
        raise DecodeError(
            f"no serializer is registered for content type {content_type!r}; "
            f"known serializers: {', '.join(serializer_names())}"
        )
    if not data:
        raise DecodeError(f"empty {codec.name} payload")
    try:
        return codec.decoder(data)
    except (DecodeError, ImproperlyConfigured):
        raise
    except Exception as exc:
        raise DecodeError(f"{codec.name} payload could not be decoded: {_describe(exc)}") from exc


def _describe(exc: Exception) -> str:
    # Some libraries raise errors without a message (msgpack's StackError): name the type then.
    return str(exc) or type(exc).__name__


def _decode_raw(data: bytes, content_encoding: str) -> bytes | str:
    """A trusted raw payload, as kombu returns it: bytes for binary encodings, else text."""
    encoding = (content_encoding or "utf-8").lower()
    if encoding in _BINARY_ENCODINGS:
        return bytes(data)
    try:
        # bytes.decode only accepts text encodings, so a content_encoding such as "zlib_codec"
        # cannot smuggle a bytes-to-bytes transform in here.
        return bytes(data).decode(encoding)
    except (LookupError, UnicodeDecodeError) as exc:
        raise DecodeError(f"raw payload is not valid {encoding} text: {exc}") from exc


def _refusal(content_type: str, accept: Collection[str]) -> str:
    codec = _codecs.get(content_type)
    what = f"{codec.name} ({content_type})" if codec is not None else content_type
    message = f"Refusing to deserialize untrusted content of type {what}"
    names = sorted(a for a in accept if "/" not in a)
    if names:
        # Only computed on the error path: a caller that passed names instead of content types.
        message += (
            f"; the accept list holds serializer names {names}, pass it through resolve_accept"
        )
    return message


def resolve_accept(names: Iterable[str]) -> frozenset[str]:
    """Turn an accept list of serializer names and/or content types into content types.

    ``["json", "application/x-python-serialize"]`` →
    ``{"application/json", "application/x-python-serialize"}``. Unknown names and content types
    raise :class:`ImproperlyConfigured` with the closest known name in the message.
    """
    if isinstance(names, str | bytes):
        raise ImproperlyConfigured(
            f"accept content must be a list of serializer names, not a string: use [{names!r}]"
        )
    resolved: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise ImproperlyConfigured(f"accept content entries must be strings, not {name!r}")
        if name in TRUSTED_CONTENT:
            resolved.add(name)
            continue
        codec = _codecs.get(name)
        if codec is None:
            raise ImproperlyConfigured(
                f"unknown serializer {name!r} in accept content{_did_you_mean(name)}; "
                f"known serializers: {', '.join(serializer_names())}"
            )
        resolved.add(codec.content_type)
    return frozenset(resolved)
