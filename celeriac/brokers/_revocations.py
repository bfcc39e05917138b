"""Revoked task ids, kept where every worker and client finds them: the revocation store contract.

``app.control.revoke(id)`` must reach every worker, including those started later or restarted:
Celery broadcasts the id to the workers alive at that moment and keeps it in their memory only
(a worker started afterwards runs the task). celeriac stores it next to the messages instead —
in the broker (memory, SQLite, Redis) or, when the broker has no storage of its own (RabbitMQ),
in the result store — and every worker follows the store. Which store serves an app is chosen in
:mod:`celeriac.app.control`.

The contract is a bounded, expiring, ordered log of :class:`Revocation` records:

* :meth:`RevocationStore.revoke` appends records. Revoking an id again appends it again (a later
  ``terminate=True`` must reach the workers even when the id is already revoked). Every write also
  drops what expired and keeps at most ``limit`` records, the newest: the store stays bounded
  whoever writes to it (Celery's ``REVOKES_MAX`` and ``REVOKE_EXPIRES``, :data:`REVOKES_MAX` and
  :data:`REVOKE_EXPIRES`).
* :meth:`RevocationStore.read` returns the live records after a *cursor* (every live one when the
  cursor is None: what a starting worker loads) and the cursor to read from next. It waits up to
  ``timeout`` for new records, so a worker learns of a revoke as soon as the store can tell it:
  at once within one process, through Redis streams at once across processes, and within
  :data:`POLL_INTERVAL` where other processes can only be polled (SQLite).

A worker keeps what it read in memory (:mod:`celeriac.worker.revocations`), so checking a message
is a dict lookup, never a round trip. This module also holds the in-process store of ``memory://``.
"""

from __future__ import annotations

import abc
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from celeriac.exceptions import ConnectionError
from celeriac.utils.wakeup import WakeupRegistry

#: Celery's ``REVOKES_MAX``: revocations kept (the newest); setting ``worker_revokes_max``.
REVOKES_MAX = 50_000
#: Celery's ``REVOKE_EXPIRES``: seconds a revocation lasts; setting ``worker_revoke_expires``.
REVOKE_EXPIRES = 3 * 3600.0
#: Seconds between two looks at a store that other processes change and that cannot push (SQLite).
#: A revoke is rare and a look finds nothing almost every time (one indexed read), so this is
#: cheap; it bounds how late a worker of another process hears of a revoke, and a message is
#: checked again right before it starts.
POLL_INTERVAL = 0.5


@dataclass(slots=True, frozen=True)
class Revocation:
    """One ``revoke()``d task id."""

    task_id: str
    #: UNIX time after which the revocation is forgotten.
    expires_at: float
    #: Whether a worker running the task must stop it (``terminate=True``).
    terminate: bool = False
    #: The signal named by the caller when ``terminate`` (``"SIGTERM"``), else None.
    signal: str | None = None

    def expired(self, now: float) -> bool:
        """Whether the revocation no longer applies at ``now``."""
        return self.expires_at <= now


class RevocationStore(abc.ABC):
    """One connection to where revocations are kept. Used from one event loop per instance."""

    #: Where the revocations are kept, for logs (``"SQLite broker /path"``).
    describe: str = ""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection (and create the storage when needed)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection; safe to call twice."""

    @abc.abstractmethod
    async def revoke(self, revocations: Sequence[Revocation], *, limit: int) -> None:
        """Append ``revocations`` (but those already expired); then drop the expired ones and
        all but the newest ``limit``."""

    @abc.abstractmethod
    async def read(self, cursor: str | None, timeout: float) -> tuple[list[Revocation], str]:
        """Live revocations appended after ``cursor``, oldest first, and the next cursor.

        ``cursor=None`` returns every live revocation at once. Otherwise waits up to ``timeout``
        seconds for the first new one and returns ``[]`` (with the same cursor) when none came.
        """


# -- memory:// -----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Log:
    """The revocations of one memory namespace: insertion-ordered, one entry per task id."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: task id -> (sequence number, revocation); a revoke again moves the id to the end.
    entries: dict[str, tuple[int, Revocation]] = field(default_factory=dict)
    sequence: int = 0


class _Logs:
    """The process-global logs, by namespace."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logs: dict[str, _Log] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    def named(self, name: str) -> _Log:
        with self._lock:
            log = self._logs.get(name)
            if log is None:
                log = self._logs[name] = _Log()
            return log

    def _after_fork(self) -> None:
        # A forked child gets a copy of the logs; locks held by the parent's threads are reset.
        self._lock = threading.Lock()
        for log in self._logs.values():
            log.lock = threading.Lock()


_logs = _Logs()
#: Readers waiting in this process, by store (a memory namespace, an SQLite file's path), on the
#: one channel ``"revoked"``: a revoke of this process wakes them at once.
wakeups = WakeupRegistry()
_CHANNEL = "revoked"


class MemoryRevocations(RevocationStore):
    """Revocations in this process's memory, shared by every instance with the same namespace.

    The namespace names the memory broker (or result store) they belong to, so a client and an
    in-process worker of one ``memory://name`` share them, as they share its queues. Layout: one
    dict per namespace, ``task_id -> (sequence, Revocation)`` in the order of the latest revoke of
    each id; cursors are sequence numbers.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.describe = f"memory {namespace}"
        self._log: _Log | None = None

    async def connect(self) -> None:
        self._log = _logs.named(self.namespace)

    async def close(self) -> None:
        self._log = None

    def _connected(self) -> _Log:
        if self._log is None:
            raise ConnectionError(f"revocations of {self.describe} are not connected")
        return self._log

    async def revoke(self, revocations: Sequence[Revocation], *, limit: int) -> None:
        log = self._connected()
        with log.lock:
            now = time.time()
            for revocation in revocations:
                if revocation.expired(now):
                    continue
                log.entries.pop(revocation.task_id, None)
                log.sequence += 1
                log.entries[revocation.task_id] = (log.sequence, revocation)
            for task_id in [k for k, (_, r) in log.entries.items() if r.expired(now)]:
                del log.entries[task_id]
            while len(log.entries) > limit:
                del log.entries[next(iter(log.entries))]
        wakeups.notify(self.namespace, (_CHANNEL,))

    def _after(self, log: _Log, cursor: int) -> tuple[list[Revocation], int]:
        now = time.time()
        with log.lock:
            newer: list[Revocation] = []
            # Newest last: walk back only as far as the cursor.
            for sequence, revocation in reversed(log.entries.values()):
                if sequence <= cursor:
                    break
                if not revocation.expired(now):
                    newer.append(revocation)
            newer.reverse()
            return newer, max(cursor, log.sequence)

    async def read(self, cursor: str | None, timeout: float) -> tuple[list[Revocation], str]:
        log = self._connected()
        if cursor is None:
            found, last = self._after(log, 0)
            return found, str(last)
        start = int_cursor(cursor)
        # Registered before looking, so a revoke between the look and the wait still wakes it.
        with wakeups.waiting(self.namespace, (_CHANNEL,)) as waiter:
            found, last = self._after(log, start)
            if not found and await waiter.wait(timeout):
                found, last = self._after(log, start)
        return found, str(last)


def int_cursor(cursor: str) -> int:
    """The cursor of a store that numbers its revocations (memory, SQLite)."""
    try:
        return int(cursor)
    except ValueError:
        raise ValueError(f"not a revocation cursor of this store: {cursor!r}") from None
