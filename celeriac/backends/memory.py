"""In-process result store: ``memory://`` or ``memory://<name>``.

Documents live in process-global *namespaces* keyed by name, so a client and an in-process worker
running on different event loops or threads of one process see the same results (as they would
through Redis). Every namespace is guarded by one ``threading.Lock``.

Layout of a namespace::

    documents: task_id -> _Entry(status, payload: StoredPayload, expires_at: float | None,
                                 version: int)
    version:   counter bumped by every write and delete

Coroutines in ``_wait_for_change`` wait in a process-global
:class:`~celeriac.utils.wakeup.WakeupRegistry` keyed by namespace name, on the task id as channel
(the memory broker wakes its fetches the same way).

The payload is the document encoded with ``result_serializer`` by the shared template, exactly the
bytes another store would keep, so a value a real store could not carry fails here too and
``result_accept_content`` is enforced on read.

The store *pushes*: a write wakes every waiter of that task at once, whichever thread or loop
wrote it.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celeriac import exceptions, states
from celeriac.backends.base import BackendOptions, ResultBackend, StoredPayload
from celeriac.exceptions import ImproperlyConfigured
from celeriac.utils.memory_url import parse_memory_url
from celeriac.utils.wakeup import WakeupRegistry

#: Expired documents are swept from a namespace once per this many writes, so a long-running
#: process does not keep every result forever (reads already ignore expired ones).
_SWEEP_EVERY = 1000


@dataclass(slots=True)
class _Entry:
    status: str
    payload: StoredPayload
    expires_at: float | None
    version: int

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(slots=True, eq=False)
class _Namespace:
    lock: threading.Lock = field(default_factory=threading.Lock)
    documents: dict[str, _Entry] = field(default_factory=dict)
    version: int = 0
    writes: int = 0


_namespaces: dict[str, _Namespace] = {}
_namespaces_lock = threading.Lock()
#: ``_wait_for_change`` calls waiting in this process, by namespace name and task id.
_wakeups = WakeupRegistry()

#: (namespace, task_id, version) of the last ``_read`` in the current task. ``wait`` reads the
#: document and then calls ``_wait_for_change``; a write landing between the two would otherwise be
#: missed until the timeout. A context variable is per asyncio task and overwritten by each read,
#: so it needs no cleanup.
_last_read: contextvars.ContextVar[tuple[_Namespace, str, int] | None] = contextvars.ContextVar(
    "celeriac_memory_last_read", default=None
)


def _namespace(name: str) -> _Namespace:
    with _namespaces_lock:
        namespace = _namespaces.get(name)
        if namespace is None:
            namespace = _namespaces[name] = _Namespace()
        return namespace


class MemoryBackend(ResultBackend):
    """Result store kept in this process's memory; shared by every instance with the same name."""

    pushes = True

    def __init__(self, url: str, options: BackendOptions) -> None:
        super().__init__(url, options)
        if options.transport_options:
            raise ImproperlyConfigured(
                "the memory result store takes no transport options, got "
                f"{sorted(key for key, _ in options.transport_options)}"
            )
        self.name = parse_memory_url(url, "result store")
        self._namespace: _Namespace | None = None

    async def connect(self) -> None:
        self._namespace = _namespace(self.name)

    async def close(self) -> None:
        self._namespace = None

    def _ns(self) -> _Namespace:
        namespace = self._namespace
        if namespace is None:
            raise exceptions.ConnectionError(
                f"result store {self.url} is not connected; call connect()"
            )
        return namespace

    async def _write(
        self, task_id: str, status: str, payload: StoredPayload, expires_at: float | None
    ) -> None:
        self._write_many(((task_id, status, payload, expires_at),))

    def _write_many(self, items: Iterable[tuple[str, str, StoredPayload, float | None]]) -> None:
        namespace = self._ns()
        changed: list[str] = []
        with namespace.lock:
            now = time.time()
            before = namespace.writes
            for task_id, status, payload, expires_at in items:
                namespace.writes += 1
                current = namespace.documents.get(task_id)
                if (
                    current is not None
                    and current.status == states.SUCCESS
                    and not current.expired(now)
                ):
                    continue  # a success is final
                namespace.version += 1
                namespace.documents[task_id] = _Entry(
                    status, payload, expires_at, namespace.version
                )
                changed.append(task_id)
            if namespace.writes // _SWEEP_EVERY != before // _SWEEP_EVERY:
                self._sweep(namespace, now)
        if changed:
            _wakeups.notify(self.name, changed)

    @staticmethod
    def _sweep(namespace: _Namespace, now: float) -> None:
        expired = [key for key, entry in namespace.documents.items() if entry.expired(now)]
        for key in expired:
            del namespace.documents[key]

    async def _read(self, task_id: str) -> StoredPayload | None:
        namespace = self._ns()
        with namespace.lock:
            entry = namespace.documents.get(task_id)
            if entry is not None and entry.expired(time.time()):
                del namespace.documents[task_id]
                entry = None
            _last_read.set((namespace, task_id, 0 if entry is None else entry.version))
            return None if entry is None else entry.payload

    async def _delete(self, task_id: str) -> None:
        namespace = self._ns()
        with namespace.lock:
            if namespace.documents.pop(task_id, None) is not None:
                namespace.version += 1

    async def _wait_for_change(self, task_id: str, timeout: float) -> None:
        namespace = self._ns()
        # Registered before the version check: a write landing after the check wakes the waiter.
        with _wakeups.waiting(self.name, (task_id,)) as waiter:
            with namespace.lock:
                entry = namespace.documents.get(task_id)
                current = 0 if entry is None else entry.version
                seen = _last_read.get()
            if (
                seen is not None
                and seen[0] is namespace
                and seen[1] == task_id
                and seen[2] != current
            ):
                return  # changed since the caller last read it
            await waiter.wait(timeout)

    async def store_many(self, metas: Iterable[dict[str, Any]]) -> None:
        """Store several result documents at once (same rules as :meth:`store` for each)."""
        expires = self.options.expires
        expires_at = None if expires is None else time.time() + expires
        items = [
            (meta["task_id"], meta["status"], self.encode_meta(meta), expires_at) for meta in metas
        ]
        self._write_many(items)
