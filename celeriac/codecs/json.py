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
from typing import Any

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


def encode(value: Any) -> bytes:
    """``value`` as kombu's JSON bytes."""
    return _encoder.encode(value).encode("utf-8")


def decode(data: bytes) -> Any:
    """A value from kombu-compatible JSON bytes (strict UTF-8, as kombu decodes them)."""
    return _decoder.decode(str(data, "utf-8"))
