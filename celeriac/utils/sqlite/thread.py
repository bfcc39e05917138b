"""One SQLite connection, used from one dedicated thread, for coroutines to wait on.

``sqlite3`` blocks, and a connection must stay on the thread that made it, so each store instance
owns a single-worker executor: the connection is opened there by the first operation and every
operation runs there in order. Driver errors are translated to celeriac errors on that thread, so
no ``sqlite3`` exception reaches a caller.

After ``fork()`` the parent's thread does not exist in the child, and SQLite must not use, or even
close, a connection opened before the fork. An instance used in a child therefore starts a new
thread and opens a new connection there; the inherited connection is only kept from being
garbage-collected (which would close it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
from collections.abc import Callable
from typing import Generic, TypeVar

from celeriac.exceptions import CeleriacError, ConnectionError
from celeriac.utils.sqlite.config import FileFormat, Settings
from celeriac.utils.sqlite.files import open_file, translate_error

_H = TypeVar("_H")
_T = TypeVar("_T")

#: Connections inherited through fork(), kept alive so that they are never closed in the child.
_inherited: list[sqlite3.Connection] = []


class ConnectionThread(Generic[_H]):
    """The connection to one file, and the one thread that uses it.

    ``setup`` runs on the thread once the file is open, claimed and configured, and makes the
    *handle* operations receive (a store object wrapping the connection, or the connection).
    """

    def __init__(
        self,
        path: str,
        fmt: FileFormat,
        settings: Settings,
        setup: Callable[[sqlite3.Connection], _H],
    ) -> None:
        self.path = path
        self.format = fmt
        self.settings = settings
        self._setup = setup
        self._connected = False
        self._pid = os.getpid()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        #: Touched only on the executor thread (made there by the first operation).
        self._conn: sqlite3.Connection | None = None
        self._handle: _H | None = None

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The thread's executor while connected in this process (else None)."""
        return self._executor if self._pid == os.getpid() else None

    @property
    def connection(self) -> sqlite3.Connection | None:
        """The open connection, if any; use it only on :attr:`executor`'s thread."""
        return self._conn if self._pid == os.getpid() else None

    async def open(self) -> None:
        """Start the thread and open the file; a no-op when already open in this process."""
        if self._connected and self._pid == os.getpid():
            return
        self._connected = True
        try:
            await self.run(lambda handle: None)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection and let the thread end. Safe to call twice, or in a fork child."""
        if not self._connected:
            return
        self._connected = False
        if self._pid != os.getpid():
            self._leave_inherited()
            return
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.wrap_future(executor.submit(self._close_on_thread))
        finally:
            executor.shutdown(wait=False)

    def submit(
        self, op: Callable[[_H], _T], error: type[CeleriacError] = ConnectionError
    ) -> concurrent.futures.Future[_T]:
        """Queue ``op(handle)`` on the thread; a driver error fails the future with ``error``.

        Raises ConnectionError when not connected, RuntimeError when the thread is shutting down.
        """
        if not self._connected:
            raise ConnectionError(
                f"{self.format.label} {self.path} is not connected; call connect()"
            )
        executor = self._executor
        if executor is None or self._pid != os.getpid():
            executor = self._start_thread()
        return executor.submit(self._on_thread, op, error)

    async def run(self, op: Callable[[_H], _T], error: type[CeleriacError] = ConnectionError) -> _T:
        """``op(handle)`` on the thread; a driver error is raised as ``error``."""
        return await asyncio.wrap_future(self.submit(op, error))

    def _start_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pid != os.getpid():
            self._leave_inherited()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"celeriac-sqlite-{self.format.role.replace(' ', '-')}",
        )
        return self._executor

    def _leave_inherited(self) -> None:
        """In a fork child: forget the parent's thread and connection without touching them."""
        if self._conn is not None:
            _inherited.append(self._conn)
        self._conn = self._handle = None
        self._executor = None
        self._pid = os.getpid()

    def _on_thread(self, op: Callable[[_H], _T], error: type[CeleriacError]) -> _T:
        try:
            handle = self._handle
            if handle is None:
                handle = self._open_on_thread()
            return op(handle)
        except sqlite3.Error as exc:
            raise self._translate(exc, error) from exc

    def _open_on_thread(self) -> _H:
        conn = open_file(self.path, self.format, self.settings)
        try:
            handle = self._setup(conn)
        except BaseException:
            conn.close()
            raise
        self._conn, self._handle = conn, handle
        return handle

    def _close_on_thread(self) -> None:
        conn, self._conn, self._handle = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as exc:
                raise self._translate(exc, ConnectionError) from exc

    def _translate(self, exc: sqlite3.Error, error: type[CeleriacError]) -> CeleriacError:
        return translate_error(exc, self.format, self.path, self.settings.busy_timeout, error)
