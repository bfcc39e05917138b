"""``Celery`` (also ``App``): configuration, the task registry, and connections per event loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload, runtime_checkable

from celeriac import codecs
from celeriac._portal import portal
from celeriac.app import aliases, calling, queues, routing, shared
from celeriac.app.config import Settings
from celeriac.app.control import Control
from celeriac.app.publishing import RetryPolicy, publish_with_retry, publish_with_retry_sync
from celeriac.app.registry import TaskRegistry
from celeriac.app.result import AsyncResult
from celeriac.app.task import P, R, Task
from celeriac.backends.base import BackendOptions, ResultBackend
from celeriac.brokers.base import Broker, BrokerOptions, PublishRequest, QueueSpec
from celeriac.exceptions import ImproperlyConfigured
from celeriac.protocol import TaskMessage, wire
from celeriac.protocol.envelope import TransportMessage
from celeriac.signals import after_task_publish, before_task_publish

T = TypeVar("T")

#: Messages per :meth:`Broker.publish_many` call when many are sent together (a group). One call
#: is one round trip and one commit; past a few thousand messages a bigger call gains little and
#: holds the broker (a Redis script, an SQLite write transaction) for longer.
PUBLISH_BATCH = 1000


@dataclass(slots=True)
class _LoopConnections:
    """The broker and result store connections of one event loop."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    broker: Broker | None = None
    backend: ResultBackend | None = None
    declared: set[str] = field(default_factory=set)


@runtime_checkable
class SyncPublisher(Protocol):
    """A broker that also publishes on a synchronous caller's own thread (Redis)."""

    def declare_sync(self, queue: QueueSpec) -> None: ...

    def publish_many_sync(self, items: Sequence[PublishRequest]) -> None: ...

    def close_sync(self) -> None: ...


@runtime_checkable
class SyncResults(Protocol):
    """A result store that also reads and waits on a synchronous caller's own thread (Redis).

    Both methods return None when the store finds it cannot serve synchronous callers after all
    (a server without what they need); callers then go through the portal for good.
    """

    def get_sync(self, task_id: str) -> dict[str, Any] | None: ...

    def wait_sync(
        self, task_id: str, timeout: float | None = None, interval: float = 0.5
    ) -> dict[str, Any] | None: ...

    def close_sync(self) -> None: ...


@dataclass(slots=True)
class _SyncClients:
    """The broker and result store synchronous callers use on their own threads, in one process.

    Synchronous calls (``delay()``, ``get()``) would otherwise run on the portal's event loop
    (:mod:`celeriac._portal`), paying for two thread hand-offs per call. Transports that offer
    blocking methods (:class:`SyncPublisher`, :class:`SyncResults`) are used directly instead;
    every other transport, and what these do not cover, keeps the portal.
    """

    #: The fork count (:data:`_forks`) of the process they belong to.
    forks: int
    #: Whether the broker was looked at (it is None when it has no synchronous methods).
    broker_known: bool = False
    broker: SyncPublisher | None = None
    store_known: bool = False
    store: SyncResults | None = None
    #: Queues declared through the synchronous broker.
    declared: set[str] = field(default_factory=set)


#: Guards the creation of each app's _SyncClients; made anew in a forked child, where a thread
#: of the parent may have held it.
_sync_lock = threading.Lock()
#: Forks between the first process and this one: _SyncClients of another count are a parent's.
#: (Cheaper than ``os.getpid()``, a system call, on every synchronous call.)
_forks = 0


def _after_fork() -> None:
    global _sync_lock, _forks  # noqa: PLW0603 - process-wide state, renewed after fork()
    _sync_lock = threading.Lock()
    _forks += 1


os.register_at_fork(after_in_child=_after_fork)


class Celery:
    """A celeriac application: ``Celery(main, broker=..., backend=..., **settings)``.

    With no broker or backend configured (and no ``CELERIAC_BROKER_URL`` /
    ``CELERIAC_RESULT_BACKEND``), tasks go through SQLite files in the working directory, so a
    new project needs no server.
    """

    def __init__(
        self,
        main: str | None = None,
        broker: str | None = None,
        backend: str | None = None,
        *,
        include: Sequence[str] | None = None,
        config_source: Any = None,
        set_as_current: bool = True,
        **settings: Any,
    ) -> None:
        self.main = main
        self.conf = Settings()
        if config_source is not None:
            self.conf.from_object(config_source)
        preset: dict[str, Any] = dict(settings)
        if broker is not None:
            preset["broker_url"] = broker
        if backend is not None:
            preset["result_backend"] = backend
        if include is not None:
            preset["include"] = list(include)
        self.conf.update(preset)
        self.tasks = TaskRegistry()
        self._connections: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _LoopConnections
        ] = weakref.WeakKeyDictionary()
        self._connections_lock = threading.Lock()
        self._pid = os.getpid()
        self._sync_clients: _SyncClients | None = None
        if set_as_current:
            shared.set_current(self)
        shared.on_app_created(self)

    def __repr__(self) -> str:
        return f"<Celery {self.main or '__main__'} at {id(self):#x}>"

    # -- configuration ---------------------------------------------------------------------------

    def config_from_object(self, obj: Any, silent: bool = False) -> None:
        """Load settings from a module, object or dotted path (``"proj.celeryconfig"``)."""
        try:
            self.conf.from_object(obj)
        except ImproperlyConfigured:
            if not silent:
                raise

    def config_from_envvar(self, variable_name: str, silent: bool = False) -> None:
        """Load settings from the module named by environment variable ``variable_name``."""
        module_name = os.environ.get(variable_name)
        if not module_name:
            if silent:
                return
            raise ImproperlyConfigured(
                f"environment variable {variable_name!r} is not set: it should name a module "
                "with celeriac settings"
            )
        self.config_from_object(module_name, silent=silent)

    def import_default_modules(self) -> None:
        """Import the modules named by ``imports`` and ``include`` (the worker does this)."""
        for name in [*self.conf.imports, *self.conf.include]:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ImproperlyConfigured(
                    f"cannot import {name!r} (from imports/include): {exc}"
                ) from exc

    # -- tasks -----------------------------------------------------------------------------------

    def gen_task_name(self, name: str, module: str) -> str:
        """``module.name``; a task defined in ``__main__`` takes the app's ``main`` as module."""
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{name}"

    def _register_function(
        self, fun: Callable[..., Any], options: Mapping[str, Any]
    ) -> Task[Any, Any]:
        task = Task._build(self, fun, options)
        self.tasks.register(task)
        return task

    @overload
    def task(self, fun: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, /, **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, *args: Any, **options: Any) -> Any:  # type: ignore[misc]
        """Register a function as a task: ``@app.task`` or ``@app.task(name=..., bind=True, ...)``."""

        def decorate(fun: Callable[P, R]) -> Task[P, R]:
            if not callable(fun):
                raise ImproperlyConfigured(f"@task decorates functions, not {fun!r}")
            return self._register_function(fun, options)

        if len(args) == 1 and callable(args[0]) and not options:
            return decorate(args[0])
        if args:
            raise TypeError("app.task() takes options as keyword arguments only")
        return decorate

    # -- connections -----------------------------------------------------------------------------

    def _loop_connections(self) -> _LoopConnections:
        if os.getpid() != self._pid:  # forked: the parent's connections are not ours
            self._pid = os.getpid()
            self._connections = weakref.WeakKeyDictionary()
        loop = asyncio.get_running_loop()
        with self._connections_lock:
            conns = self._connections.get(loop)
            if conns is None:
                conns = self._connections[loop] = _LoopConnections()
        return conns

    def broker_options(self) -> BrokerOptions:
        """The broker settings as the transports take them."""
        extras = dict(self.conf.broker_transport_options)
        visibility = extras.pop("visibility_timeout", 30.0)
        polling = extras.pop("polling_interval", 0.05)
        return BrokerOptions(
            visibility_timeout=float(visibility),
            polling_interval=float(polling),
            transport_options=extras,
        )

    def backend_options(self) -> BackendOptions:
        """The result settings as the stores take them."""
        return BackendOptions(
            serializer=self.conf.result_serializer,
            accept=codecs.resolve_accept(self.conf.resolved_result_accept()),
            # Celery: None or 0 keeps results for ever.
            expires=self.conf.result_expires or None,
            transport_options=tuple(sorted(self.conf.result_backend_transport_options.items())),
            broker_url=self.conf.resolved_broker_url(),
            broker_transport_options=tuple(sorted(self.conf.broker_transport_options.items())),
            persistent=self.conf.result_persistent,
        )

    def create_broker(self) -> Broker:
        """A new, unconnected broker for the configured URL."""
        url = self.conf.resolved_broker_url()
        broker: Broker = aliases.broker_class(url)(url, self.broker_options())
        return broker

    def create_result_store(self) -> ResultBackend:
        """A new, unconnected result store for the configured URL."""
        url = self.conf.resolved_result_backend()
        backend: ResultBackend = aliases.backend_class(url)(url, self.backend_options())
        return backend

    async def abroker(self) -> Broker:
        """The connected broker of the running event loop."""
        conns = self._loop_connections()
        if conns.broker is None:
            async with conns.lock:
                if conns.broker is None:
                    conns.broker = await _connected(self.create_broker())
        return conns.broker

    async def aresult_store(self) -> ResultBackend:
        """The connected result store of the running event loop."""
        conns = self._loop_connections()
        if conns.backend is None:
            async with conns.lock:
                if conns.backend is None:
                    conns.backend = await _connected(self.create_result_store())
        return conns.backend

    def use_connections(self, broker: Broker | None, backend: ResultBackend | None) -> None:
        """Let the running loop share already connected instances (the worker's own)."""
        conns = self._loop_connections()
        conns.broker = broker or conns.broker
        conns.backend = backend or conns.backend

    @property
    def backend(self) -> ResultBackend:
        """The result store used by synchronous calls."""
        return self.run_sync(self.aresult_store())

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of this app for a synchronous caller."""
        return portal.call(coro)

    # -- synchronous callers on their own thread -----------------------------------------------

    def _sync(self) -> _SyncClients:
        clients = self._sync_clients
        if clients is not None and clients.forks == _forks:
            return clients
        with _sync_lock:
            clients = self._sync_clients
            if clients is None or clients.forks != _forks:
                # Forked: the parent's connections are left to the parent, unused and unclosed.
                clients = self._sync_clients = _SyncClients(_forks)
            return clients

    def _sync_broker(self) -> SyncPublisher | None:
        """The broker publishing on the caller's thread, or None: publish through the portal."""
        clients = self._sync()
        if not clients.broker_known:
            with _sync_lock:
                if not clients.broker_known:
                    broker = self.create_broker()
                    clients.broker = broker if isinstance(broker, SyncPublisher) else None
                    clients.broker_known = True
        return clients.broker

    def _sync_store(self) -> SyncResults | None:
        """The result store reading on the caller's thread, or None: read through the portal."""
        clients = self._sync()
        if not clients.store_known:
            with _sync_lock:
                if not clients.store_known:
                    store = self.create_result_store()
                    clients.store = store if isinstance(store, SyncResults) else None
                    clients.store_known = True
        return clients.store

    def _no_sync_store(self, store: SyncResults) -> None:
        """The store cannot serve synchronous callers on this server: use the portal from now."""
        clients = self._sync()
        if clients.store is store:
            clients.store = None
        store.close_sync()

    def _read_result_sync(self, task_id: str) -> dict[str, Any] | None:
        """The current document of ``task_id`` read on this thread; None: ask the portal."""
        store = self._sync_store()
        if store is None:
            return None
        meta = store.get_sync(task_id)
        if meta is None:
            self._no_sync_store(store)
        return meta

    def _wait_result_sync(
        self, task_id: str, timeout: float | None, interval: float
    ) -> dict[str, Any] | None:
        """Wait on this thread for ``task_id`` to finish; its document, or None: ask the portal."""
        store = self._sync_store()
        if store is None:
            return None
        meta = store.wait_sync(task_id, timeout, interval)
        if meta is None:
            self._no_sync_store(store)
        return meta

    async def aclose(self) -> None:
        """Close the connections of the running event loop."""
        conns = self._loop_connections()
        broker, backend = conns.broker, conns.backend
        conns.broker = conns.backend = None
        conns.declared.clear()
        if broker is not None:
            await broker.close()
        if backend is not None:
            await backend.close()

    def close(self) -> None:
        """Close the connections used by synchronous calls."""
        clients, self._sync_clients = self._sync_clients, None
        if clients is not None and clients.forks == _forks:
            if clients.broker is not None:
                clients.broker.close_sync()
            if clients.store is not None:
                clients.store.close_sync()
        if portal.started:  # else no synchronous call went through it: nothing to close there
            self.run_sync(self.aclose())

    # -- sending -----------------------------------------------------------------------------------

    async def _publish(self, outgoing: calling.Outgoing) -> None:
        await self._publish_many((outgoing,))

    async def _publish_many(self, outgoings: Sequence[calling.Outgoing]) -> None:
        """Publish messages in batches, one call of the broker per destination (a group's members).

        Every message is encoded before anything is sent, so an argument that does not serialize
        raises with nothing published. The messages of one route and publish retry policy then go
        to :meth:`Broker.publish_many` in batches of up to :data:`PUBLISH_BATCH`; each batch is
        stored whole or not at all and is retried as one while the broker is unreachable. A batch
        that still fails raises, and batches stored before it stay stored. As for a single call,
        ``before_task_publish`` is sent for each message before it is published (before the first
        batch) and ``after_task_publish`` for each message once its batch is stored.
        """
        if any(outgoing.message.reply_to is None for outgoing in outgoings):
            reply_to = await self._reply_queue()
            for outgoing in outgoings:
                if outgoing.message.reply_to is None:
                    outgoing.message.reply_to = reply_to
        for batch in _batches(outgoings, self._encode(outgoings)):
            await self._publish_batch(batch)

    def _publish_sync(self, outgoings: Sequence[calling.Outgoing]) -> bool:
        """:meth:`_publish_many` on the caller's thread, for synchronous callers.

        Returns False, having done nothing, when the broker cannot publish from this thread or
        the result store answers through a reply queue (rpc://, which lives on the portal's loop
        and is named in the messages): the caller then publishes through the portal. Otherwise
        everything happens as there — encoding first, the signals, batches, declarations and the
        retry policy — and True is returned once every batch is stored.
        """
        broker = self._sync_broker()
        if broker is None or _uses_reply_queue(self.conf.resolved_result_backend()):
            return False
        declared = self._sync().declared
        for batch in _batches(outgoings, self._encode(outgoings)):
            route = batch[0][0].route
            requests, what = _requests(batch)

            def attempt(route: routing.Route = route, requests: _Requests = requests) -> None:
                if route.exchange and route.queue not in declared:
                    broker.declare_sync(self._declaration(route))
                    declared.add(route.queue)
                broker.publish_many_sync(requests)

            publish_with_retry_sync(attempt, batch[0][0].retry_policy, what)
            _announce_published(batch)
        return True

    def _encode(self, outgoings: Sequence[calling.Outgoing]) -> list[TransportMessage]:
        """Every message encoded, then ``before_task_publish`` sent for each."""
        # Encoding errors are the caller's and are raised at once; only reaching the broker
        # (connecting, declaring, publishing) is retried.
        encoded = [
            wire.encode(o.message, serializer=o.serializer, compression=o.compression)
            for o in outgoings
        ]
        if before_task_publish.receivers:
            for outgoing, transport_message in zip(outgoings, encoded, strict=True):
                # Receivers may change headers and properties in place (tracing context, for
                # one): the message is published with them. The body is already encoded: it is
                # for reading.
                route = outgoing.route
                before_task_publish.send(
                    sender=outgoing.message.task,
                    body=_signal_body(outgoing.message),
                    exchange=route.exchange,
                    routing_key=route.routing_key,
                    headers=transport_message.headers,
                    properties=transport_message.properties,
                    declare=[self._declaration(route)] if route.exchange else [],
                    retry_policy=dataclasses.asdict(outgoing.retry_policy),
                )
        return encoded

    async def _publish_batch(self, batch: Sequence[_Encoded]) -> None:
        """Publish messages that share one route and retry policy in one broker call."""
        route = batch[0][0].route
        requests, what = _requests(batch)

        async def attempt() -> None:
            broker = await self.abroker()
            conns = self._loop_connections()
            if route.exchange and route.queue not in conns.declared:
                await broker.declare(self._declaration(route))
                conns.declared.add(route.queue)
            await broker.publish_many(requests)

        await publish_with_retry(attempt, batch[0][0].retry_policy, what)
        _announce_published(batch)

    async def _reply_queue(self) -> str | None:
        """The result store's reply queue for ``reply_to`` (rpc://), None for stores that keep
        results by task id. It is declared before the task is sent, so the result cannot come
        back before there is a queue to receive it."""
        backend = self._loop_connections().backend
        if backend is None:
            if not _uses_reply_queue(self.conf.resolved_result_backend()):
                return None  # no need to connect a store only to hear it has no queue
            backend = await self.aresult_store()
        return await backend.reply_queue()

    def _declaration(self, route: routing.Route) -> QueueSpec:
        """How a client declares the queue of a route through a named exchange."""
        if queues.defined_queue(self.conf, route.queue) is not None:
            return queues.queue_spec(self.conf, route.queue)
        return QueueSpec(name=route.queue, exchange=route.exchange, routing_key=route.routing_key)

    def _prepare(
        self,
        name: str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: dict[str, Any],
    ) -> calling.Outgoing:
        task = options.pop("_task", None)
        if task is None:
            task = self.tasks.get(name)
        return calling.build(self.conf, name, args, kwargs, options, task)

    def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send task ``name`` (it need not be registered here) and return its result handle."""
        outgoing = self._prepare(name, args, kwargs, options)
        if not self._publish_sync((outgoing,)):
            self.run_sync(self._publish(outgoing))
        return AsyncResult(outgoing.message.id, app=self)

    async def asend_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """``send_task`` for asyncio callers."""
        outgoing = self._prepare(name, args, kwargs, options)
        await self._publish(outgoing)
        return AsyncResult(outgoing.message.id, app=self)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        """The result handle of task ``task_id``."""
        return AsyncResult(task_id, app=self)

    @property
    def control(self) -> Control:
        """Remote control: ``app.control.revoke(task_id, terminate=False)``."""
        return Control(self)

    async def apurge(self, queues: Sequence[str] | None = None) -> int:
        """Delete every waiting message of ``queues`` (default queue if none)."""
        broker = await self.abroker()
        total = 0
        for queue in queues or [self.conf.task_default_queue]:
            total += await broker.purge(queue)
        return total


App = Celery

_C = TypeVar("_C", Broker, ResultBackend)


@functools.lru_cache(maxsize=16)
def _uses_reply_queue(url: str) -> bool:
    """Whether the store of ``url`` takes results through reply queues (asked on every call of a
    client that never reads a result: the class lookup is done once per URL)."""
    return bool(aliases.backend_class(url).uses_reply_queue)


def _signal_body(message: TaskMessage) -> tuple[Any, ...]:
    """The body as the publish signals show it: Celery's protocol 2 ``(args, kwargs, embed)``."""
    embed = {
        "callbacks": message.callbacks,
        "errbacks": message.errbacks,
        "chain": message.chain,
        "chord": message.chord,
    }
    return (message.args, message.kwargs, embed)


#: A message to publish and its encoded form.
_Encoded = tuple[calling.Outgoing, TransportMessage]
_Requests = list[PublishRequest]


def _requests(batch: Sequence[_Encoded]) -> tuple[_Requests, str]:
    """The broker's requests for a batch of one route, and how errors name the batch."""
    first = batch[0][0]
    route = first.route
    requests = [
        PublishRequest(message, route.exchange, route.routing_key, outgoing.not_before)
        for outgoing, message in batch
    ]
    what = f"task {first.message.task}[{first.message.id}]"
    if len(batch) > 1:
        what += f" and {len(batch) - 1} more to {route.routing_key!r}"
    return requests, what


def _announce_published(batch: Sequence[_Encoded]) -> None:
    """``after_task_publish`` for each message of a stored batch."""
    if not after_task_publish.receivers:
        return
    route = batch[0][0].route
    for outgoing, message in batch:
        after_task_publish.send(
            sender=outgoing.message.task,
            body=_signal_body(outgoing.message),
            exchange=route.exchange,
            routing_key=route.routing_key,
            headers=message.headers,
        )


def _batches(
    outgoings: Sequence[calling.Outgoing], encoded: Sequence[TransportMessage]
) -> list[list[_Encoded]]:
    """The messages grouped by route and retry policy, in order, cut to :data:`PUBLISH_BATCH`."""
    if len(outgoings) == 1:
        return [[(outgoings[0], encoded[0])]]
    groups: dict[tuple[routing.Route, RetryPolicy], list[_Encoded]] = {}
    for outgoing, message in zip(outgoings, encoded, strict=True):
        groups.setdefault((outgoing.route, outgoing.retry_policy), []).append((outgoing, message))
    return [
        items[start : start + PUBLISH_BATCH]
        for items in groups.values()
        for start in range(0, len(items), PUBLISH_BATCH)
    ]


async def _connected(connection: _C) -> _C:
    try:
        await connection.connect()
    except BaseException:
        # Release whatever the failed attempt opened; the next call starts afresh.
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection
