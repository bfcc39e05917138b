"""Body compression, as kombu does it (``kombu/compression.py``).

Compression is applied to an already serialized body; the message's ``content_type`` and
``content_encoding`` keep describing the uncompressed payload, and the ``compression`` header
carries the method's MIME type (never the alias):

=======================  ========================  ==============================================
Aliases                  MIME (``compression``)    Algorithm
=======================  ========================  ==============================================
``gzip``, ``zlib``       ``application/x-gzip``    a **zlib stream** (RFC 1950, ``zlib.compress``),
                                                   not a gzip file, despite the name
``bzip2``, ``bzip``      ``application/x-bz2``     bz2
``lzma``, ``xz``         ``application/x-lzma``    xz container (``lzma.compress`` defaults)
``brotli``               ``application/x-brotli``  brotli (package ``brotli`` ≥ 1.2)
``zstd``, ``zstandard``  ``application/zstd``      zstd frames (``compression.zstd`` on Python
                                                   3.14+, else package ``backports.zstd``)
=======================  ========================  ==============================================

:func:`compress` uses the library defaults kombu uses, so the bytes are the same as kombu's.
:func:`decompress` never trusts the input's size: it decompresses incrementally and stops with
:class:`~celeriac.exceptions.DecodeError` as soon as the output passes ``max_size`` (a small
"decompression bomb" cannot expand into gigabytes of memory). It is also strict where kombu is
lenient: a truncated stream or bytes trailing the last stream are errors. Reading
``application/x-gzip`` additionally accepts a real gzip file (some non-Python producers send one).

Stored results use an in-band marker instead of a header (Celery 5.7 ``result_compression``):
``b"\\x00celery-compressed\\x00" + mime + b"\\x00" + compressed body`` — see
:func:`compress_payload` / :func:`decompress_payload`.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from celeriac.exceptions import DecodeError, ImproperlyConfigured
from celeriac.utils.optional import optional_module

GZIP = "application/x-gzip"
BZ2 = "application/x-bz2"
LZMA = "application/x-lzma"
BROTLI = "application/x-brotli"
ZSTD = "application/zstd"

#: Alias → MIME type, as registered by kombu.
ALIASES: dict[str, str] = {
    "gzip": GZIP,
    "zlib": GZIP,
    "bzip2": BZ2,
    "bzip": BZ2,
    "lzma": LZMA,
    "xz": LZMA,
    "brotli": BROTLI,
    "zstd": ZSTD,
    "zstandard": ZSTD,
}

#: Default output limit of :func:`decompress`.
DEFAULT_MAX_SIZE = 64 * 1024 * 1024

#: Memory the xz decoder may use. An xz header can ask for a multi-gigabyte dictionary; ``-9e``
#: (the largest preset) needs about 65 MiB to decode.
_LZMA_MEMLIMIT = 128 * 1024 * 1024

#: Marker Celery 5.7 puts in front of a compressed stored result (``celery/backends/base.py``).
COMPRESSED_PAYLOAD_MAGIC = b"\x00celery-compressed\x00"


def _mime(method: str) -> str | None:
    mime = ALIASES.get(method, method)
    return mime if mime in ALIASES.values() else None


def methods() -> list[str]:
    """Aliases and MIME types :func:`compress` knows (whether or not their package is installed)."""
    return sorted({*ALIASES, *ALIASES.values()})


# -- optional libraries ----------------------------------------------------------------------------


def _optional(mime: str) -> ModuleType:
    """The module behind brotli or zstd, or ImproperlyConfigured naming the package to install."""
    if mime == BROTLI:
        candidates, package = ["brotli"], "brotli>=1.2"
    else:
        candidates = ["compression.zstd", "backports.zstd"]
        package = "backports.zstd"
    return optional_module(
        *candidates, purpose=f"{mime} compression", package=package, install=package
    )


# -- compress --------------------------------------------------------------------------------------


def compress(data: bytes, method: str) -> tuple[str, bytes]:
    """Compress ``data`` with ``method`` (alias or MIME type); return ``(mime, compressed)``."""
    mime = _mime(method)
    if mime is None:
        raise ImproperlyConfigured(
            f"unknown compression method {method!r}; known methods: {', '.join(sorted(ALIASES))}"
        )
    if mime == GZIP:
        return mime, zlib.compress(data)
    if mime == BZ2:
        return mime, bz2.compress(data)
    if mime == LZMA:
        return mime, lzma.compress(data)
    compressed: bytes = _optional(mime).compress(data)
    return mime, compressed


# -- decompress ------------------------------------------------------------------------------------


def decompress(data: bytes, method: str, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Decompress ``data`` compressed with ``method`` (MIME type or alias).

    Raises :class:`DecodeError` for an unknown method, corrupt or truncated input, trailing
    garbage, or output larger than ``max_size`` bytes (checked while decompressing).
    """
    if not isinstance(max_size, int) or max_size < 0:
        raise ImproperlyConfigured(f"max_size must be a non-negative int, not {max_size!r}")
    mime = _mime(method)
    if mime is None:
        raise DecodeError(f"unknown compression {method!r}; known: {', '.join(methods())}")
    try:
        if mime == GZIP:
            return _inflate(data, max_size)
        if mime == BZ2:
            return _streams(bz2.BZ2Decompressor, data, max_size, mime)
        if mime == LZMA:
            return _streams(_lzma_decompressor, data, max_size, mime)
        module = _optional(mime)
        if mime == ZSTD:
            return _streams(module.ZstdDecompressor, data, max_size, mime)
        return _unbrotli(module, data, max_size)
    except (DecodeError, ImproperlyConfigured):
        raise
    except Exception as exc:
        # zlib.error, OSError (bz2), LZMAError, brotli.error, ZstdError, MemoryError, …
        raise DecodeError(f"corrupt {mime} data: {exc}") from exc


def _too_large(mime: str, max_size: int) -> DecodeError:
    return DecodeError(f"{mime} data decompresses to more than {max_size} bytes")


def _inflate(data: bytes, max_size: int) -> bytes:
    # wbits MAX_WBITS | 32: detect a zlib or a gzip header.
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    out = inflater.decompress(data, max_size + 1)
    if len(out) > max_size:
        raise _too_large(GZIP, max_size)
    # Fewer than max_size + 1 bytes came out, so all the input was consumed.
    if not inflater.eof:
        raise DecodeError(f"truncated {GZIP} data")
    if inflater.unused_data:
        raise DecodeError(f"{len(inflater.unused_data)} bytes of garbage after {GZIP} data")
    return out


def _lzma_decompressor() -> lzma.LZMADecompressor:
    return lzma.LZMADecompressor(memlimit=_LZMA_MEMLIMIT)


def _streams(factory: Callable[[], Any], data: bytes, max_size: int, mime: str) -> bytes:
    """Decompress one or more concatenated streams with a bz2/lzma/zstd-style decompressor.

    Those decompressors share one interface: ``decompress(data, max_length)``, ``eof``,
    ``needs_input`` and ``unused_data``; one instance reads one stream.
    """
    pieces: list[bytes] = []
    total = 0
    rest = data
    while True:
        machine = factory()
        piece = machine.decompress(rest, max_size + 1 - total)
        total += len(piece)
        if total > max_size:
            raise _too_large(mime, max_size)
        pieces.append(piece)
        if not machine.eof:
            # It stopped below the output limit without reaching the end: the input ran out.
            raise DecodeError(f"truncated {mime} data")
        rest = machine.unused_data
        if not rest:
            return b"".join(pieces)


def _unbrotli(brotli: ModuleType, data: bytes, max_size: int) -> bytes:
    machine = brotli.Decompressor()
    if not hasattr(machine, "can_accept_more_data"):
        # Older releases cannot bound one call's output, so the size limit could not be kept.
        raise ImproperlyConfigured("brotli decompression needs brotli>=1.2: pip install -U brotli")
    pieces: list[bytes] = []
    total = 0
    piece: bytes = machine.process(data, max_size + 1)
    while True:
        total += len(piece)
        if total > max_size:
            raise _too_large(BROTLI, max_size)
        pieces.append(piece)
        if machine.is_finished():
            return b"".join(pieces)
        if machine.can_accept_more_data():
            raise DecodeError(f"truncated {BROTLI} data")
        piece = machine.process(b"", max_size + 1 - total)
        if not piece:
            raise DecodeError(f"{BROTLI} decoder made no progress")


# -- stored results (Celery 5.7 result_compression) ------------------------------------------------


def compress_payload(payload: bytes, method: str) -> bytes:
    """A stored-result payload compressed with its method written in front (Celery 5.7 format)."""
    mime, body = compress(payload, method)
    return b"".join((COMPRESSED_PAYLOAD_MAGIC, mime.encode("utf-8"), b"\x00", body))


def decompress_payload(payload: bytes, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Undo :func:`compress_payload`; payloads without the marker are returned unchanged.

    The marker's leading NUL byte cannot start any serializer's output, so a result stored
    uncompressed is never mistaken for a compressed one.
    """
    if not payload.startswith(COMPRESSED_PAYLOAD_MAGIC):
        return payload
    mime, sep, body = payload[len(COMPRESSED_PAYLOAD_MAGIC) :].partition(b"\x00")
    if not sep:
        raise DecodeError("compressed result payload has no end to its compression type")
    try:
        method = mime.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"compressed result payload has a garbled type {mime[:40]!r}") from exc
    return decompress(body, method, max_size)
