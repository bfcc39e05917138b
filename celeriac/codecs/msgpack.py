"""msgpack, as kombu writes it: ``packb(value, use_bin_type=True)`` / ``unpackb(data, raw=False)``.

str is written as msgpack str and bytes as msgpack bin, so both survive a round trip; tuples
become arrays. There is no extension type for datetimes (kombu registers none), so a datetime is an
:class:`~celeriac.exceptions.EncodeError`. msgpack is an optional dependency (extra ``msgpack``).
"""

from __future__ import annotations

from typing import Any, NoReturn

from celeriac.exceptions import EncodeError
from celeriac.utils.optional import optional_module

CONTENT_TYPE = "application/x-msgpack"
CONTENT_ENCODING = "binary"


def _module() -> Any:  # msgpack ships no type information
    # Imported at use, not at import time: celeriac works without msgpack unless it is chosen.
    return optional_module(
        "msgpack",
        purpose="the msgpack serializer",
        package="msgpack",
        install="'celeriac[msgpack]'",
    )


def _unsupported(value: Any) -> NoReturn:
    raise EncodeError(f"msgpack cannot encode object of type {type(value).__qualname__}")


def encode(value: Any) -> bytes:
    """``value`` as msgpack bytes."""
    data: bytes = _module().packb(value, use_bin_type=True, default=_unsupported)
    return data


def decode(data: bytes) -> Any:
    """A value from msgpack bytes (str as str, bin as bytes)."""
    return _module().unpackb(data, raw=False)
