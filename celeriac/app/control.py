"""``app.control``: revoking tasks, with Celery's signatures.

``app.control.revoke(task_id | [ids], terminate=False, signal="SIGTERM")`` (and
``AsyncResult.revoke()``) keeps the ids in a *revocation store*
(:mod:`celeriac.brokers._revocations`) that every worker follows, so a revoke reaches the workers
running now, those started later and those restarted, for ``worker_revoke_expires`` seconds (3 h)
and up to ``worker_revokes_max`` ids (50,000, the newest), Celery's ``REVOKE_EXPIRES`` and
``REVOKES_MAX``. Celery broadcasts instead and keeps the ids in the memory of the workers alive at
the time.

Where the revocations are kept (:func:`revocation_store`):

=================================  ============================================================
broker                             revocations
=================================  ============================================================
``memory://name``                  in process memory, beside that broker's queues
``sqlite:///…``                    table ``revoked`` in the broker's file
``redis://…`` (and ``rediss``,     stream ``<global_keyprefix>_celeriac.revoked`` in the
``sentinel``, sockets)             broker's database
``amqp://…`` (RabbitMQ)            in the result store: memory, SQLite file or Redis database
                                   as above. RabbitMQ keeps no key-value data; with ``rpc://``
                                   results nothing can keep them: ``revoke()`` raises and the
                                   worker warns at start-up.
=================================  ============================================================

On a Redis broker the workers also hear the revokes Celery clients broadcast
(:func:`celery_broadcasts`, :mod:`celeriac.brokers._revocations_pidbox`).

A revoke also stores REVOKED as the result of every id whose result is not ready yet (as Celery
5.6's workers do on hearing a revoke), so a caller sees it at once even when the message waits
for its countdown; a worker that drops the message stores it again, and a task that was running
without ``terminate`` still stores its own result when it ends.
"""

from __future__ import annotations

import logging
import signal as signals
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from celeriac import states
from celeriac.app.aliases import BACKEND_ALIASES, BROKER_ALIASES, scheme_of
from celeriac.backends.meta import build_meta
from celeriac.brokers._revocations import MemoryRevocations, Revocation, RevocationStore
from celeriac.brokers._revocations_pidbox import PidboxRevokes
from celeriac.exceptions import CeleriacError, ImproperlyConfigured, TaskRevokedError
from celeriac.utils import sqlite
from celeriac.utils.memory_url import parse_memory_url

if TYPE_CHECKING:
    from celeriac.app.base import Celery

logger = logging.getLogger(__name__)

#: Celery's default signal for ``terminate=True``.
TERM_SIGNAME = "SIGTERM"

#: Options of Celery's broadcast that have no meaning when revocations are stored, not broadcast.
_BROADCAST_OPTIONS = (
    "destination",
    "connection",
    "channel",
    "reply",
    "timeout",
    "limit",
    "callback",
    "pattern",
    "matcher",
    "wait",  # AsyncResult.revoke's name for reply
)


def signal_name(value: Any) -> str:
    """Celery's ``signal`` argument as a signal name: ``"TERM"``, ``"SIGKILL"``, 15 …"""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signals.Signals(value).name
        except ValueError:
            pass
    elif isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in signals.Signals.__members__:
            return name
    raise ValueError(
        f"unknown signal {value!r}: give a name such as 'SIGTERM', 'TERM' or 'KILL', or a number"
    )


def signal_number(name: str) -> int:
    """The number of a signal named by :func:`signal_name`."""
    return int(signals.Signals[name])


def _task_ids(task_id: Any) -> list[str]:
    ids = [task_id] if isinstance(task_id, str) else task_id
    if not isinstance(ids, Iterable) or isinstance(ids, bytes | dict):
        raise TypeError(f"task_id must be a task id or a list of them, not {task_id!r}")
    ids = list(ids)
    for item in ids:
        if not isinstance(item, str) or not item:
            raise TypeError(f"a task id must be a non-empty string, not {item!r}")
    return list(dict.fromkeys(ids))


# -- where revocations are kept --------------------------------------------------------------------

_UNAVAILABLE = (
    "revoke needs somewhere to keep the revoked ids: the broker {broker} keeps no key-value data "
    "and the result store {backend} keeps results only in the callers' reply queues. Use a "
    "Redis or SQLite result store (result_backend = 'redis://…' or 'sqlite:///…'), or a Redis "
    "or SQLite broker."
)


def revocation_store(app: Celery) -> RevocationStore | None:
    """A new, unconnected store of the app's revocations; None where nothing can keep them.

    The broker keeps them when it can (memory, SQLite, Redis), else the result store. Clients and
    workers of one configuration choose the same place.
    """
    broker_url = app.conf.resolved_broker_url()
    broker = BROKER_ALIASES.get(scheme_of(broker_url), "")
    options = app.broker_options().transport_options
    if broker.startswith("celeriac.brokers.memory:"):
        return MemoryRevocations(f"broker:{parse_memory_url(broker_url, 'broker')}")
    if broker.startswith("celeriac.brokers.sqlite:"):
        from celeriac.brokers._revocations_sqlite import SQLiteRevocations
        from celeriac.brokers._sqlite_schema import BROKER_FILE
        from celeriac.brokers.sqlite import parse_sqlite_url

        settings = sqlite.parse_options(options, BROKER_FILE)
        return SQLiteRevocations(parse_sqlite_url(broker_url), BROKER_FILE, settings)
    if broker.startswith("celeriac.brokers.redis:"):
        return _redis(broker_url, options, "broker")
    backend_url = app.conf.resolved_result_backend()
    backend = BACKEND_ALIASES.get(scheme_of(backend_url), "")
    results_options = dict(app.conf.result_backend_transport_options)
    if backend.startswith("celeriac.backends.memory:"):
        return MemoryRevocations(f"results:{parse_memory_url(backend_url, 'result store')}")
    if backend.startswith("celeriac.backends.sqlite:"):
        from celeriac.backends.sqlite import RESULT_STORE_FILE
        from celeriac.backends.sqlite import parse_url as parse_results_url
        from celeriac.brokers._revocations_sqlite import SQLiteRevocations

        settings = sqlite.parse_options(results_options, RESULT_STORE_FILE)
        return SQLiteRevocations(parse_results_url(backend_url), RESULT_STORE_FILE, settings)
    if backend.startswith("celeriac.backends.redis:"):
        return _redis(backend_url, results_options, "result store")
    return None


def celery_broadcasts(app: Celery, hostname: str) -> PidboxRevokes | None:
    """Where the worker ``hostname`` hears revokes that Celery clients broadcast: on a Redis
    broker, kombu's pub/sub mailbox; elsewhere nowhere (None)."""
    broker_url = app.conf.resolved_broker_url()
    if not BROKER_ALIASES.get(scheme_of(broker_url), "").startswith("celeriac.brokers.redis:"):
        return None
    from celeriac.utils.redis_url import parse_redis_url

    target, rest = parse_redis_url(broker_url, app.broker_options().transport_options)
    return PidboxRevokes(target, _prefix(rest), hostname)


def unavailable_reason(app: Celery) -> str:
    """Why :func:`revocation_store` found no store for the app's configuration."""
    from celeriac.utils.redact import redact_url

    return _UNAVAILABLE.format(
        broker=redact_url(app.conf.resolved_broker_url()),
        backend=redact_url(app.conf.resolved_result_backend()),
    )


def _redis(url: str, options: dict[str, Any], role: str) -> RevocationStore:
    from celeriac.brokers._revocations_redis import RedisRevocations
    from celeriac.utils.redis_url import parse_redis_url

    target, rest = parse_redis_url(url, options, role=role)
    return RedisRevocations(target, _prefix(rest), role)


def _prefix(options: dict[str, Any]) -> str:
    """The ``global_keyprefix`` of Redis transport options, as the Redis broker uses it."""
    prefix = options.get("global_keyprefix") or ""
    if not isinstance(prefix, str):
        raise ImproperlyConfigured(f"global_keyprefix must be a string, got {prefix!r}")
    return prefix


# -- app.control -------------------------------------------------------------------------------------


class Control:
    """``app.control``: revoke tasks (Celery's ``celery.app.control.Control``, revoke part)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def revoke(
        self,
        task_id: str | Iterable[str],
        destination: Any = None,
        terminate: bool = False,
        signal: str | int = TERM_SIGNAME,
        **kwargs: Any,
    ) -> None:
        """Revoke a task by id (or a list of ids): no worker runs it from now on.

        A worker that receives the message afterwards drops it and stores REVOKED; with
        ``terminate=True`` a worker running it stops it (the pool decides how: the event loop
        cancels an ``async def`` task). Returns once the revocation is stored, so it holds for
        every worker, including those not started yet.

        Celery's broadcast options (``destination``, ``reply``, ``connection`` …) are refused:
        there is no broadcast to address or to wait for.
        """
        self.app.run_sync(self.arevoke(task_id, destination, terminate, signal, **kwargs))

    async def arevoke(
        self,
        task_id: str | Iterable[str],
        destination: Any = None,
        terminate: bool = False,
        signal: str | int = TERM_SIGNAME,
        **kwargs: Any,
    ) -> None:
        """``revoke`` for asyncio callers."""
        refuse_broadcast_options("revoke", destination=destination, **kwargs)
        if not isinstance(terminate, bool):
            raise TypeError(f"terminate must be True or False, not {terminate!r}")
        name = signal_name(signal)
        ids = _task_ids(task_id)
        if not ids:
            return
        store = revocation_store(self.app)
        if store is None:
            raise ImproperlyConfigured(unavailable_reason(self.app))
        conf = self.app.conf
        expires_at = time.time() + conf.worker_revoke_expires
        revocations = [
            Revocation(i, expires_at, terminate, name if terminate else None) for i in ids
        ]
        # REVOKED first: a worker that terminates the task on hearing of the revocation stores
        # its own, more precise reason ("terminated") after this one, never before.
        await self._mark_revoked(ids)
        await store.connect()
        try:
            await store.revoke(revocations, limit=conf.worker_revokes_max)
        finally:
            await store.close()

    def terminate(
        self,
        task_id: str | Iterable[str],
        destination: Any = None,
        signal: str | int = TERM_SIGNAME,
        **kwargs: Any,
    ) -> None:
        """``revoke(task_id, terminate=True, signal=signal)``, as in Celery."""
        self.revoke(task_id, destination, True, signal, **kwargs)

    async def _mark_revoked(self, ids: list[str]) -> None:
        """Store REVOKED for the ids whose result is not ready (a SUCCESS is never replaced)."""
        try:
            backend = await self.app.aresult_store()
            if backend.uses_reply_queue:
                return  # results travel to the caller's queue; the worker reports the revoke
            metas = []
            for task_id in ids:
                current = await backend.get(task_id)
                if current["status"] not in states.READY_STATES:
                    metas.append(build_meta(task_id, states.REVOKED, TaskRevokedError("revoked")))
            if metas:
                await backend.store_many(metas)
        except CeleriacError as exc:
            # The revocation is what matters: workers that drop the tasks store REVOKED too.
            logger.warning("Revoking %s: could not store REVOKED as their result: %s", ids, exc)


def refuse_broadcast_options(call: str, **options: Any) -> None:
    """Refuse Celery's broadcast options given a value (None and False are their defaults)."""
    for name, value in options.items():
        if name not in _BROADCAST_OPTIONS:
            raise TypeError(f"{call}() got an unexpected keyword argument {name!r}")
        if value is not None and value is not False:
            raise ValueError(
                f"{call}({name}={value!r}): an option of Celery's broadcast. celeriac stores "
                "revocations where every worker reads them: there is no broadcast to address, "
                "and revoke() returns once every worker will honour it"
            )
