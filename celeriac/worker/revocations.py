"""The revoked ids a worker knows, kept current by following the app's revocation store.

At start-up the worker loads every live revocation (before it fetches its first message, so a
task revoked while no worker ran is never started), then a listener task follows the store
(:meth:`RevocationStore.read <celeriac.brokers._revocations.RevocationStore.read>`): at once on
Redis and within one process, within half a second across processes on SQLite. Checking a message
is a dict lookup (:meth:`RevokedTasks.get`), never a round trip.

The ids are kept like the store keeps them: at most ``worker_revokes_max``, the newest, each
forgotten when it expires. A revocation with ``terminate=True`` that arrives while the listener
runs is handed to the worker (``on_terminate``), which stops the task if it runs it.

When the store cannot be reached the listener logs it and keeps trying, backing off; it reads
from where it stopped, so nothing revoked in between is missed (on SQLite and Redis).

On a Redis broker a second listener hears the revokes that Celery clients broadcast
(:mod:`celeriac.brokers._revocations_pidbox`). Those are kept in this worker's memory only, as
Celery's workers keep them, for ``worker_revoke_expires`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from celeriac.app.control import TERM_SIGNAME, signal_name
from celeriac.brokers._revocations import Revocation, RevocationStore
from celeriac.brokers._revocations_pidbox import PidboxRevokes
from celeriac.exceptions import CeleriacError
from celeriac.worker.logs import logger

#: Longest a read of the store waits for news before it is started again.
READ_WAIT = 1.0
#: Longest a starting worker waits to be subscribed to Celery's broadcasts.
BROADCASTS_WAIT = 5.0


class RevokedTasks:
    """Revocations known to this worker, by task id, oldest first."""

    def __init__(
        self,
        store: RevocationStore,
        *,
        limit: int,
        lifetime: float,
        on_terminate: Callable[[Revocation], None],
        broadcasts: PidboxRevokes | None = None,
    ) -> None:
        self.store = store
        self.limit = limit
        #: Seconds a revoke heard from a Celery broadcast is kept (``worker_revoke_expires``).
        self.lifetime = lifetime
        self._on_terminate = on_terminate
        self._broadcasts = broadcasts
        self._known: dict[str, Revocation] = {}
        self._cursor: str | None = None
        self._listeners: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._known)

    def get(self, task_id: str) -> Revocation | None:
        """The live revocation of ``task_id``, or None."""
        revocation = self._known.get(task_id)
        if revocation is not None and revocation.expired(time.time()):
            del self._known[task_id]
            return None
        return revocation

    async def start(self) -> None:
        """Connect and load every live revocation; then follow the store in the background."""
        await self.store.connect()
        try:
            found, self._cursor = await self.store.read(None, 0)
        except BaseException:
            await self.store.close()
            raise
        self._add(found)
        if found:
            logger.info("Loaded %d revoked task id(s) from %s.", len(found), self.store.describe)
        self._listeners.append(asyncio.create_task(self._follow(), name="celeriac-revocations"))
        broadcasts = self._broadcasts
        if broadcasts is not None:
            self._listeners.append(
                asyncio.create_task(self._hear_celery(broadcasts), name="celeriac-pidbox")
            )
            # Ready means listening: a Celery client's revoke sent from then on is heard.
            try:
                await asyncio.wait_for(broadcasts.subscribed.wait(), BROADCASTS_WAIT)
            except TimeoutError:
                logger.warning("Not listening to %s yet; going on.", broadcasts.describe)

    async def stop(self) -> None:
        """Stop following and close the connection."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await self.store.close()

    def _add(self, revocations: Iterable[Revocation]) -> None:
        for revocation in revocations:
            # Re-inserted, so the order stays that of the latest revoke of each id.
            self._known.pop(revocation.task_id, None)
            self._known[revocation.task_id] = revocation
        while len(self._known) > self.limit:
            del self._known[next(iter(self._known))]

    async def _follow(self) -> None:
        backoff = 1.0
        failing = False
        while True:
            assert self._cursor is not None
            try:
                found, self._cursor = await self.store.read(self._cursor, READ_WAIT)
            except CeleriacError as exc:
                if not failing:
                    logger.warning(
                        "Cannot read revoked task ids from %s (%s); retrying.",
                        self.store.describe,
                        exc,
                    )
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if failing:
                logger.info("Reading revoked task ids from %s again.", self.store.describe)
                failing, backoff = False, 1.0
            if found:
                self._heard(found, "")

    async def _hear_celery(self, broadcasts: PidboxRevokes) -> None:
        """Revokes broadcast by Celery clients: kept in this worker's memory, as Celery's do."""
        async for command in broadcasts.listen():
            name: str | None = None
            if command.terminate:
                try:
                    name = signal_name(command.signal or TERM_SIGNAME)
                except ValueError as exc:
                    logger.error(
                        "A Celery broadcast asks to terminate with %s; not terminated.", exc
                    )
            expires_at = time.time() + self.lifetime
            revocations = [
                Revocation(task_id, expires_at, name is not None, name)
                for task_id in command.task_ids
            ]
            self._heard(revocations, " (broadcast by Celery)")

    def _heard(self, revocations: list[Revocation], source: str) -> None:
        self._add(revocations)
        logger.info("Tasks flagged as revoked%s: %s", source, _some_ids(revocations))
        for revocation in revocations:
            if revocation.terminate:
                try:
                    self._on_terminate(revocation)
                except Exception:
                    logger.exception("Could not terminate task %s", revocation.task_id)


def _some_ids(revocations: list[Revocation], shown: int = 10) -> str:
    """The ids for a log line: the first few of a large batch, and how many more."""
    text = ", ".join(r.task_id for r in revocations[:shown])
    if len(revocations) > shown:
        text += f" and {len(revocations) - shown} more"
    return text
