"""JSON, byte-compatible with kombu ≥ 5.3 (``kombu/utils/json.py``).

The text is exactly what ``json.dumps`` writes with its default settings (``", "`` / ``": "``
separators, ``ensure_ascii``, ``NaN``/``Infinity`` allowed), encoded as UTF-8. Values JSON has no
type for are wrapped in a two-key object, the *type marker*, and unwrapped when loading::

    datetime  {"__type__": "datetime", "__value__": "2024-01-02T03:04:05+00:00"}   isoformat()
    date      {"__type__": "date",     "__value__": "2024-01-02"}                  isoformat()
    time      {"__type__": "time",     "__value__": "03:04:05"}                    isoformat()
    Decimal   {"__type__": "decimal",  "__value__": "1.5"}                         str()
    UUID      {"__type__": "uuid",     "__value__": {"hex": "0000…0001"}}
    bytes     {"__type__": "bytes",    "__value__": "hi"}        when the bytes are UTF-8 text
    bytes     {"__type__": "base64",   "__value__": "/w=="}      otherwise

Only objects whose key set is exactly ``{"__type__", "__value__"}`` are unwrapped; an unknown
``__type__`` is an error, as in kombu. Tuples are written as lists. As in kombu, an object with a
``__json__()`` method is written as what that method returns, and Django's lazy strings (when
Django is loaded) as text. Anything else is an :class:`~celeriac.exceptions.EncodeError`.

This runs for every task message and result, so it is a thin layer over the C-accelerated stdlib
encoder and decoder, built once: the ``default`` hook only runs for values JSON cannot write
natively, and the ``object_hook`` rejects ordinary dicts with one cheap membership test.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, cast

from celeriac.exceptions import DecodeError, EncodeError

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"


def _marker(kind: str, value: Any) -> dict[str, Any]:
    return {"__type__": kind, "__value__": value}


def _default(value: Any) -> Any:
    """Write a value the stdlib encoder does not know, in kombu's order of preference."""
    reducer = getattr(value, "__json__", None)
    if reducer is not None:
        return reducer()
    # datetime before date: a datetime is also a date.
    if isinstance(value, datetime):
        return _marker("datetime", value.isoformat())
    if isinstance(value, date):
        return _marker("date", value.isoformat())
    if isinstance(value, time):
        return _marker("time", value.isoformat())
    if isinstance(value, Decimal):
        return _marker("decimal", str(value))
    if isinstance(value, uuid.UUID):
        return _marker("uuid", {"hex": value.hex})
    if isinstance(value, bytes):
        try:
            return _marker("bytes", value.decode("utf-8"))
        except UnicodeDecodeError:
            return _marker("base64", base64.b64encode(value).decode("ascii"))
    if _is_lazy_text(value):
        return str(value)
    raise EncodeError(f"json cannot encode object of type {type(value).__qualname__}")


def _is_lazy_text(value: Any) -> bool:
    """Django's lazy translation strings, which kombu writes as text; only if Django is loaded."""
    functional = sys.modules.get("django.utils.functional")
    promise = getattr(functional, "Promise", None)
    return isinstance(promise, type) and isinstance(value, promise)


def _decode_date(text: str) -> date:
    return datetime.fromisoformat(text).date()


def _decode_uuid(fields: dict[str, Any]) -> uuid.UUID:
    # kombu rebuilds with UUID(**fields); only "hex" is ever written.
    return uuid.UUID(**fields)


def _decode_bytes(text: str) -> bytes:
    return text.encode("utf-8")


def _decode_base64(text: str) -> bytes:
    return base64.b64decode(text.encode("utf-8"))


_decoders: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": _decode_date,
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": _decode_uuid,
    "bytes": _decode_bytes,
    "base64": _decode_base64,
}


def _object_hook(obj: dict[str, Any]) -> Any:
    if "__type__" in obj and len(obj) == 2 and "__value__" in obj:
        kind = obj["__type__"]
        decoder = _decoders.get(kind) if isinstance(kind, str) else None
        if decoder is None:
            raise DecodeError(f"unknown JSON type marker {kind!r}")
        return decoder(obj["__value__"])
    return obj


_encoder = json.JSONEncoder(default=_default)
_decoder = json.JSONDecoder(object_hook=_object_hook)
#: A decoder's ``scan_once``: the value at a position of the text and where it ends, raising
#: StopIteration when there is none there (whitespace is not skipped).
Scanner = Callable[[str, int], tuple[Any, int]]
_scan: Scanner = _decoder.scan_once  # type: ignore[attr-defined]


def _c_encoder() -> Callable[[Any, int], list[str]] | None:
    """The C encoder ``json.dumps`` builds for each call, built once, without cycle checks.

    ``JSONEncoder.encode`` builds it afresh on every call (its cycle-check markers must start
    empty, and an encoding that failed half way leaves some behind); that costs as much as
    encoding a result document. Built once without markers it needs no reset: a value that
    contains itself then ends in RecursionError instead, and :func:`encode` runs the checking
    encoder on it to fail as ``json.dumps`` does. The text is the same either way.
    """
    try:
        from _json import make_encoder
    except ImportError:  # pragma: no cover - CPython always has it
        return None
    return cast(
        "Callable[[Any, int], list[str]]",
        make_encoder(
            None,  # no cycle-check markers
            _default,
            json.encoder.encode_basestring_ascii,
            None,  # indent
            _encoder.key_separator,
            _encoder.item_separator,
            _encoder.sort_keys,
            _encoder.skipkeys,
            _encoder.allow_nan,
        ),
    )


_fast_encode = _c_encoder()


def encode(value: Any) -> bytes:
    """``value`` as kombu's JSON bytes."""
    if _fast_encode is not None:
        try:
            return "".join(_fast_encode(value, 0)).encode("utf-8")
        except RecursionError:
            pass  # a cycle, or nesting too deep: the checking encoder says which
    return _encoder.encode(value).encode("utf-8")


_plain_scan: Scanner = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def loads_text(text: str) -> Any:
    """``json.loads(text)`` for text: the same value or the same error, for less.

    Plain JSON (no type markers), for what celeriac keeps as JSON text itself, such as a stored
    message's headers. See :func:`decode` for how.
    """
    if type(text) is not str:  # json.loads also reads bytes
        return json.loads(text)
    try:
        value, end = _plain_scan(text, 0)
    except StopIteration:
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    return value


def decode(data: bytes) -> Any:
    """A value from kombu-compatible JSON bytes (strict UTF-8, as kombu decodes them)."""
    text = str(data, "utf-8")
    # The scanner straight away: what JSONDecoder.decode adds (skipping whitespace around the
    # value, errors for no value or extra data) costs more than scanning a message body. Text
    # it does not take whole goes through decode(), which gives its exact error.
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return _decoder.decode(text)
    if end != len(text):
        return _decoder.decode(text)
    return value
