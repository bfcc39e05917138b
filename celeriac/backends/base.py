"""The result-store contract.

A result is stored as a *result document* ("meta"), exactly as Celery writes it (celery-wire.md §6.1):
``{"status", "result", "traceback", "children", "date_done", "task_id"}`` plus ``group_id`` /
``parent_id`` when known. :class:`ResultBackend` owns the parts every store shares — encoding the
document with ``result_serializer``, refusing content types outside ``result_accept_content``,
expiry, waiting — and a store implements four byte-level primitives:

* :meth:`ResultBackend._write` — store the encoded document, **never replacing a SUCCESS** (Celery's
  rule: a success is final; a redelivered duplicate must not turn it into something else);
* :meth:`ResultBackend._read` — the stored bytes and their content type, or None;
* :meth:`ResultBackend._delete`;
* :meth:`ResultBackend._wait_for_change` — optional: block until the document may have changed.
  The default polls with a backoff; stores that can push (Redis pub/sub, RPC replies, the
  in-process memory store) override it;
* :meth:`ResultBackend.store_many` — optional: several documents in one write (the worker
  pipelines its result writes through it).

Some stores deliver a result to the caller instead of keeping it under the task id (``rpc://``
publishes it to the caller's reply queue, as Celery's ``rpc`` backend does). For them the worker
hands over each document with the task's :class:`ReplyRoute` (the message's ``reply_to`` and
``correlation_id``) through :meth:`ResultBackend.store_routed` /
:meth:`ResultBackend.store_many_routed`; every other store ignores the route. Such a store sets
:attr:`ResultBackend.uses_reply_queue`, and the app names :meth:`ResultBackend.reply_queue` as
``reply_to`` in the task messages it sends.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import time
from collections.abc import AsyncGenerator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from celeriac import codecs, states
from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.exceptions import TimeoutError


@dataclass(slots=True, frozen=True)
class BackendOptions:
    """What a result store needs from the app's configuration."""

    #: ``result_serializer``.
    serializer: str = "json"
    #: ``result_accept_content`` as content types.
    accept: frozenset[str] = frozenset({"application/json"})
    #: ``result_expires`` in seconds; None keeps results forever.
    expires: float | None = 86400.0
    #: ``result_backend_transport_options``.
    transport_options: tuple[tuple[str, Any], ...] = ()
    #: The resolved ``broker_url``: stores that talk through the broker's connection (rpc://).
    broker_url: str | None = None
    #: ``broker_transport_options`` (connection options of that broker URL).
    broker_transport_options: tuple[tuple[str, Any], ...] = ()
    #: ``result_persistent``: results that travel as messages are sent persistent (written to
    #: disk by the broker: AMQP delivery_mode 2) rather than transient.
    persistent: bool = False


@dataclass(slots=True, frozen=True)
class StoredPayload:
    """Encoded result document as a store keeps it."""

    data: bytes
    content_type: str
    content_encoding: str


@dataclass(slots=True, frozen=True)
class ReplyRoute:
    """Where the caller of a task waits for its result: the task message's reply route."""

    #: The caller's reply queue (the message's ``reply_to``).
    reply_to: str
    #: The message's ``correlation_id``; Celery's callers key replies on it.
    correlation_id: str


def reply_route(reply_to: Any, correlation_id: Any, task_id: str) -> ReplyRoute | None:
    """The reply route of a task message, or None when it names no reply queue.

    ``correlation_id`` falls back to the task id, as in Celery. Values that are not non-empty
    strings (a message from a careless producer) count as absent.
    """
    if not isinstance(reply_to, str) or not reply_to:
        return None
    if not isinstance(correlation_id, str) or not correlation_id:
        correlation_id = task_id
    return ReplyRoute(reply_to, correlation_id)


def pending_meta(task_id: str) -> dict[str, Any]:
    """The document of a task nobody has written anything about: PENDING."""
    return {
        "status": states.PENDING,
        "result": None,
        "traceback": None,
        "children": [],
        "date_done": None,
        "task_id": task_id,
    }


class ResultBackend(abc.ABC):
    """Template for result stores. Used from one event loop per instance, like brokers."""

    #: Whether :meth:`wait` is woken by the store rather than by polling.
    pushes: bool = False
    #: Whether results reach the caller through a reply queue named in each task message
    #: (:meth:`reply_queue`), so documents must be stored with their :class:`ReplyRoute`.
    uses_reply_queue: bool = False

    def __init__(self, url: str, options: BackendOptions) -> None:
        self.url = url
        self.options = options

    # -- primitives a store implements -------------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection and create the storage the store needs."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection."""

    @abc.abstractmethod
    async def _write(
        self, task_id: str, status: str, payload: StoredPayload, expires_at: float | None
    ) -> None:
        """Store ``payload`` for ``task_id`` unless the stored status is already SUCCESS."""

    @abc.abstractmethod
    async def _read(self, task_id: str) -> StoredPayload | None:
        """The stored payload of ``task_id`` if present and not expired."""

    @abc.abstractmethod
    async def _delete(self, task_id: str) -> None:
        """Remove whatever is stored for ``task_id``."""

    async def _wait_for_change(self, task_id: str, timeout: float) -> None:
        """Return when the document of ``task_id`` may have changed, or after ``timeout``."""
        await asyncio.sleep(timeout)

    async def _read_many(self, task_ids: Sequence[str]) -> list[StoredPayload | None]:
        """The stored payloads of ``task_ids``, in order (None where nothing is stored).

        One :meth:`_read` after another by default; stores that can read many keys in one round
        trip (``MGET``, ``WHERE task_id IN``) override it.
        """
        return [await self._read(task_id) for task_id in task_ids]

    # -- the shared part -----------------------------------------------------------------------

    def encode_meta(self, meta: dict[str, Any]) -> StoredPayload:
        """Encode a result document with ``result_serializer``."""
        encoded = codecs.dumps(meta, self.options.serializer)
        return StoredPayload(encoded.data, encoded.content_type, encoded.content_encoding)

    def decode_meta(self, payload: StoredPayload) -> dict[str, Any]:
        """Decode a stored document, refusing content types outside ``result_accept_content``."""
        meta = codecs.loads(
            payload.data, payload.content_type, payload.content_encoding, self.options.accept
        )
        if not isinstance(meta, dict) or "status" not in meta:
            from celeriac.exceptions import DecodeError

            raise DecodeError(f"stored result is not a result document: {type(meta).__name__}")
        return meta

    async def store(self, meta: dict[str, Any]) -> None:
        """Store a result document (``meta["task_id"]`` names the task)."""
        expires = self.options.expires
        expires_at = None if expires is None else time.time() + expires
        await self._write(meta["task_id"], meta["status"], self.encode_meta(meta), expires_at)

    async def store_many(self, metas: Sequence[dict[str, Any]]) -> None:
        """Store several documents; stores that can override this to write them in one go."""
        for meta in metas:
            await self.store(meta)

    async def store_routed(self, meta: dict[str, Any], route: ReplyRoute | None) -> None:
        """Store a document of a task whose message gave ``route``; stores that keep results by
        task id ignore the route."""
        await self.store(meta)

    async def store_many_routed(
        self, items: Sequence[tuple[dict[str, Any], ReplyRoute | None]]
    ) -> None:
        """:meth:`store_many` for documents paired with their task's reply route."""
        await self.store_many([meta for meta, _ in items])

    async def reply_queue(self) -> str | None:
        """The reply queue to name as ``reply_to`` in outgoing task messages, ready to receive.

        None for stores that keep results by task id (all but those with
        :attr:`uses_reply_queue`).
        """
        return None

    async def get(self, task_id: str) -> dict[str, Any]:
        """The current document of ``task_id``; PENDING when nothing is stored."""
        payload = await self._read(task_id)
        return pending_meta(task_id) if payload is None else self.decode_meta(payload)

    async def get_many(self, task_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The current documents of ``task_ids``, in order; PENDING where nothing is stored."""
        payloads = await self._read_many(task_ids)
        return [
            pending_meta(task_id) if payload is None else self.decode_meta(payload)
            for task_id, payload in zip(task_ids, payloads, strict=True)
        ]

    async def wait(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        states_wanted: Collection[str] = states.READY_STATES,
    ) -> dict[str, Any]:
        """Wait until the task reaches one of ``states_wanted``; return its document.

        Polling stores start checking every millisecond and back off geometrically to
        ``interval``, so a fast task is seen almost at once without hammering the store.
        Raises :class:`celeriac.exceptions.TimeoutError` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while True:
            meta = await self.get(task_id)
            if meta["status"] in states_wanted:
                return meta
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"The operation timed out waiting for task {task_id}.")
            else:
                left = interval
            if self.pushes:
                await self._wait_for_change(task_id, left)
            else:
                await self._wait_for_change(task_id, min(pause, left, interval))
                pause = min(pause * 2, interval)

    async def wait_many(
        self,
        task_ids: Sequence[str],
        timeout: float | None = None,
        interval: float = 0.5,
        states_wanted: Collection[str] = states.READY_STATES,
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Yield ``(task_id, document)`` for each task as it reaches one of ``states_wanted``.

        Documents come in the order the tasks finish, each id once. Raises
        :class:`celeriac.exceptions.TimeoutError` once ``timeout`` seconds have passed with tasks
        still unfinished (``0``: look once, never wait). Iterate it inside
        ``contextlib.aclosing`` when the loop may stop early, so that waits still in progress end
        at once rather than when the generator is collected.

        All documents are first read in one batch (:meth:`get_many`), so tasks already finished
        cost nothing more. Then a store that pushes (:attr:`pushes`) waits for each remaining
        task with :meth:`wait`, all at once; a polling store reads all the remaining documents
        in one batch per poll, starting after a millisecond and backing off to ``interval``:
        never one wait per task in sequence.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ids = list(dict.fromkeys(task_ids))
        pending: list[str] = []
        for task_id, meta in zip(ids, await self.get_many(ids), strict=True):
            if meta["status"] in states_wanted:
                yield task_id, meta
            else:
                pending.append(task_id)
        if self.pushes:
            async for item in self._wait_each(pending, deadline, interval, states_wanted):
                yield item
            return
        pause = 0.001
        while pending:
            left = _time_left(deadline, len(pending))
            await asyncio.sleep(min(pause, interval, interval if left is None else left))
            pause = min(pause * 2, interval)
            still: list[str] = []
            for task_id, meta in zip(pending, await self.get_many(pending), strict=True):
                if meta["status"] in states_wanted:
                    yield task_id, meta
                else:
                    still.append(task_id)
            pending = still

    async def _wait_each(
        self,
        task_ids: Sequence[str],
        deadline: float | None,
        interval: float,
        states_wanted: Collection[str],
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """:meth:`wait` for every task at once (stores that push); yield them as they finish."""
        if not task_ids:
            return
        finished: asyncio.Queue[tuple[str, dict[str, Any]] | BaseException] = asyncio.Queue()

        async def wait_one(task_id: str) -> None:
            try:
                meta = await self.wait(task_id, None, interval, states_wanted)
            except Exception as exc:  # handed to the reader, which raises it
                finished.put_nowait(exc)
            else:
                finished.put_nowait((task_id, meta))

        waits = [asyncio.create_task(wait_one(task_id)) for task_id in task_ids]
        try:
            for unfinished in range(len(task_ids), 0, -1):
                left = _time_left(deadline, unfinished)
                try:
                    item = await asyncio.wait_for(finished.get(), left)
                except builtins.TimeoutError:
                    raise _timed_out(unfinished) from None
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def forget(self, task_id: str) -> None:
        """Remove the stored result of ``task_id``."""
        await self._delete(task_id)

    def rate_limiter(self) -> RateLimiterStore | None:
        """The store of cluster-wide rate limits kept here, or None if this store keeps none.

        Workers use it when their broker keeps no counters (RabbitMQ); Redis and SQLite result
        stores offer one.
        """
        return None


def _time_left(deadline: float | None, unfinished: int) -> float | None:
    """Seconds until ``deadline`` (None: no deadline); TimeoutError once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(unfinished)
    return left


def _timed_out(unfinished: int) -> TimeoutError:
    return TimeoutError(f"The operation timed out waiting for {unfinished} task(s) to finish.")
