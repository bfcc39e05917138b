"""celeriac.codecs compression: kombu interop, aliases, corrupt input and the bomb guard."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import lzma
import tracemalloc
import zlib

import celery.backends.base
import kombu.compression
import pytest

from celeriac import codecs
from celeriac.codecs import compression
from celeriac.exceptions import DecodeError, ImproperlyConfigured

BODY = b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]' * 20

BUILTIN = [
    ("gzip", "application/x-gzip"),
    ("zlib", "application/x-gzip"),
    ("bzip2", "application/x-bz2"),
    ("bzip", "application/x-bz2"),
    ("lzma", "application/x-lzma"),
    ("xz", "application/x-lzma"),
]


@pytest.mark.parametrize(("alias", "mime"), BUILTIN)
def test_compress_matches_kombu(alias: str, mime: str) -> None:
    ours_mime, ours = codecs.compress(BODY, alias)
    theirs, theirs_mime = kombu.compression.compress(BODY, alias)
    assert (ours_mime, ours) == (theirs_mime, theirs) == (mime, theirs)
    assert codecs.compress(BODY, mime) == (mime, ours)


@pytest.mark.parametrize(("alias", "mime"), BUILTIN)
def test_decompress_both_ways_with_kombu(alias: str, mime: str) -> None:
    _, ours = codecs.compress(BODY, alias)
    assert kombu.compression.decompress(ours, mime) == BODY
    theirs, _ = kombu.compression.compress(BODY, alias)
    assert codecs.decompress(theirs, mime) == BODY
    assert codecs.decompress(theirs, alias) == BODY


def test_gzip_is_a_zlib_stream_not_a_gzip_file() -> None:
    mime, data = codecs.compress(b"x" * 100, "gzip")
    assert mime == "application/x-gzip"
    assert data.startswith(b"x\x9c")
    assert zlib.decompress(data) == b"x" * 100
    # A real gzip file (as some non-Python producers send) is read too.
    assert codecs.decompress(gzip.compress(BODY), "application/x-gzip") == BODY


def test_empty_body_round_trips() -> None:
    for alias, mime in BUILTIN:
        assert codecs.decompress(codecs.compress(b"", alias)[1], mime) == b""


def test_concatenated_streams_like_bz2_and_lzma_modules() -> None:
    assert codecs.decompress(bz2.compress(b"ab") + bz2.compress(b"cd"), "bzip2") == b"abcd"
    assert codecs.decompress(lzma.compress(b"ab") + lzma.compress(b"cd"), "xz") == b"abcd"


def test_unknown_methods() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"unknown compression method 'rar'.*gzip"):
        codecs.compress(BODY, "rar")
    with pytest.raises(DecodeError, match="unknown compression 'application/x-rar'"):
        codecs.decompress(BODY, "application/x-rar")


@pytest.mark.parametrize(
    ("module", "alias", "mime", "package"),
    [
        ("brotli", "brotli", "application/x-brotli", "brotli"),
        ("backports.zstd", "zstd", "application/zstd", "backports.zstd"),
    ],
)
def test_optional_methods(module: str, alias: str, mime: str, package: str) -> None:
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        installed = False
    if installed:
        got_mime, data = codecs.compress(BODY, alias)
        assert got_mime == mime
        assert codecs.decompress(data, mime) == BODY
        assert kombu.compression.decompress(data, mime) == BODY
        return
    for call in (lambda: codecs.compress(BODY, alias), lambda: codecs.decompress(b"x", mime)):
        with pytest.raises(ImproperlyConfigured, match=f"pip install {package}"):
            call()


@pytest.mark.parametrize(("alias", "mime"), BUILTIN[::2])
def test_corrupt_truncated_and_trailing_data(alias: str, mime: str) -> None:
    _, data = codecs.compress(BODY, alias)
    with pytest.raises(DecodeError, match="truncated"):
        codecs.decompress(data[: len(data) // 2], mime)
    with pytest.raises(DecodeError, match="corrupt") as info:
        codecs.decompress(b"definitely not compressed", mime)
    assert info.value.__cause__ is not None  # the library's own error is kept
    with pytest.raises(DecodeError, match=r"garbage|corrupt"):
        codecs.decompress(data + b"garbage", mime)
    with pytest.raises(DecodeError, match="truncated"):
        codecs.decompress(b"", mime)


@pytest.mark.parametrize(("alias", "mime"), BUILTIN[::2])
def test_size_limit_is_exact(alias: str, mime: str) -> None:
    _, data = codecs.compress(BODY, alias)
    assert codecs.decompress(data, mime, max_size=len(BODY)) == BODY
    with pytest.raises(DecodeError, match=f"more than {len(BODY) - 1} bytes"):
        codecs.decompress(data, mime, max_size=len(BODY) - 1)


def test_size_limit_counts_all_concatenated_streams() -> None:
    data = bz2.compress(b"a" * 600) + bz2.compress(b"b" * 600)
    assert len(codecs.decompress(data, "bzip2", max_size=1200)) == 1200
    with pytest.raises(DecodeError, match="more than 1000 bytes"):
        codecs.decompress(data, "bzip2", max_size=1000)


@pytest.mark.parametrize(("alias", "mime"), BUILTIN[::2])
def test_decompression_bomb_stops_early(alias: str, mime: str) -> None:
    bomb_size = 48 * 1024 * 1024
    compressor = {"gzip": zlib.compressobj(1), "bzip2": bz2.BZ2Compressor(1)}.get(alias)
    if compressor is None:
        bomb = lzma.compress(bytes(bomb_size), preset=0)
    else:
        chunk = bytes(1024 * 1024)
        bomb = b"".join(compressor.compress(chunk) for _ in range(48)) + compressor.flush()
    assert len(bomb) < bomb_size // 100
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="more than 1048576 bytes"):
            codecs.decompress(bomb, mime, max_size=1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Nothing near the 48 MiB the bomb expands to was ever held in memory.
    assert peak < 8 * 1024 * 1024


def test_default_limit_is_64_mib() -> None:
    limit = 64 * 1024 * 1024
    compressor = zlib.compressobj(1)
    chunk = bytes(1024 * 1024)
    bomb = b"".join(compressor.compress(chunk) for _ in range(65)) + compressor.flush()
    with pytest.raises(DecodeError, match=f"more than {limit} bytes"):
        codecs.decompress(bomb, "gzip")


def test_max_size_must_be_sane() -> None:
    with pytest.raises(ImproperlyConfigured):
        codecs.decompress(b"", "gzip", max_size=-1)


def test_result_payload_compression_matches_celery() -> None:
    ours = codecs.compress_payload(BODY, "gzip")
    assert ours == celery.backends.base.compress_payload(BODY, "gzip")
    assert ours.startswith(b"\x00celery-compressed\x00application/x-gzip\x00x\x9c")
    assert celery.backends.base.decompress_payload(ours) == BODY
    theirs = celery.backends.base.compress_payload(BODY, "bzip2")
    assert codecs.decompress_payload(theirs) == BODY
    # Uncompressed results pass through unchanged, in both implementations.
    assert codecs.decompress_payload(BODY) == BODY == celery.backends.base.decompress_payload(BODY)


def test_result_payload_errors() -> None:
    magic = compression.COMPRESSED_PAYLOAD_MAGIC
    with pytest.raises(DecodeError, match="no end"):
        codecs.decompress_payload(magic + b"application/x-gzip")
    with pytest.raises(DecodeError, match="unknown compression"):
        codecs.decompress_payload(magic + b"application/x-rar\x00data")
    with pytest.raises(DecodeError, match="garbled"):
        codecs.decompress_payload(magic + b"\xff\x00data")
    with pytest.raises(DecodeError, match="more than 10 bytes"):
        codecs.decompress_payload(codecs.compress_payload(BODY, "xz"), max_size=10)
