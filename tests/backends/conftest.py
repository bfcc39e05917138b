"""Fixtures shared by the result-store tests.

``store_url`` is parametrized over every store; a new store joins the conformance suite by adding
one entry to :data:`STORES` (a class and a function giving a fresh, empty store's URL). A store
whose fresh instance needs options besides its URL (Redis: a unique ``global_keyprefix``) records
them in :data:`URL_OPTIONS` under that URL, and :func:`backend_for` applies them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from celeriac.backends.base import BackendOptions, ResultBackend
from celeriac.backends.memory import MemoryBackend
from celeriac.backends.redis import RedisBackend
from celeriac.backends.sqlite import SQLiteBackend
from tests import services


def _memory_url(tmp_path: Path) -> str:
    return f"memory://test-{uuid.uuid4().hex}"


def _sqlite_url(tmp_path: Path) -> str:
    # tmp_path is absolute, hence the fourth slash.
    return f"sqlite:///{tmp_path / 'results.sqlite3'}"


#: URL -> BackendOptions fields every store opened on that URL gets (a test's own fields win).
URL_OPTIONS: dict[str, dict[str, Any]] = {}


def _redis_url(tmp_path: Path) -> str:
    # Redis on the test database, every key under a prefix of this test's own; the client name
    # makes the URL unique (and names the test's connections in CLIENT LIST).
    services.require_redis()
    token = services.unique("rb")
    url = f"{services.redis_url()}?client_name=celeriac-test-{token}"
    URL_OPTIONS[url] = {"transport_options": (("global_keyprefix", f"{token}:"),)}
    return url


def _forget_url(url: str) -> None:
    """Remove what a test stored under its Redis prefix (only keys it created)."""
    options = URL_OPTIONS.pop(url, None)
    if options is None or not url.startswith("redis"):
        return
    import redis

    prefix = dict(options["transport_options"])["global_keyprefix"]
    client = redis.Redis(host=services.REDIS_HOST, port=services.REDIS_PORT, db=services.REDIS_DB)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


#: store name -> (class, fresh URL for a test's tmp_path)
STORES: dict[str, tuple[type[ResultBackend], Callable[[Path], str]]] = {
    "memory": (MemoryBackend, _memory_url),
    "sqlite": (SQLiteBackend, _sqlite_url),
    "redis": (RedisBackend, _redis_url),
}


@pytest.fixture(params=sorted(STORES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty store of each kind."""
    _, make_url = STORES[request.param]
    url = make_url(tmp_path)
    yield url
    _forget_url(url)


OpenStore = Callable[..., AbstractAsyncContextManager[ResultBackend]]


def backend_for(url: str, **options: Any) -> ResultBackend:
    """An unconnected store for ``url`` with :class:`BackendOptions` built from ``options``."""
    scheme = url.partition("://")[0]
    cls, _ = STORES[scheme]
    return cls(url, BackendOptions(**{**URL_OPTIONS.get(url, {}), **options}))


@asynccontextmanager
async def open_backend(url: str, **options: Any) -> AsyncIterator[ResultBackend]:
    """A connected store, closed on exit."""
    backend = backend_for(url, **options)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
def open_store() -> OpenStore:
    """``async with open_store(url, **BackendOptions fields) as backend``: a connected store."""
    return open_backend
