"""Fixtures shared by the result-store tests.

``store_url`` is parametrized over every store; a new store joins the conformance suite by adding
one entry to :data:`STORES` (a class and a function giving a fresh, empty store's URL).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from celeriac.backends.base import BackendOptions, ResultBackend
from celeriac.backends.memory import MemoryBackend
from celeriac.backends.sqlite import SQLiteBackend


def _memory_url(tmp_path: Path) -> str:
    return f"memory://test-{uuid.uuid4().hex}"


def _sqlite_url(tmp_path: Path) -> str:
    # tmp_path is absolute, hence the fourth slash.
    return f"sqlite:///{tmp_path / 'results.sqlite3'}"


#: store name -> (class, fresh URL for a test's tmp_path)
STORES: dict[str, tuple[type[ResultBackend], Callable[[Path], str]]] = {
    "memory": (MemoryBackend, _memory_url),
    "sqlite": (SQLiteBackend, _sqlite_url),
}


@pytest.fixture(params=sorted(STORES))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh, empty store of each kind."""
    _, make_url = STORES[request.param]
    return make_url(tmp_path)


OpenStore = Callable[..., AbstractAsyncContextManager[ResultBackend]]


def backend_for(url: str, **options: Any) -> ResultBackend:
    """An unconnected store for ``url`` with :class:`BackendOptions` built from ``options``."""
    scheme = url.partition("://")[0]
    cls, _ = STORES[scheme]
    return cls(url, BackendOptions(**options))


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
