"""The worker: an asyncio process that leases task messages, runs them, stores results, acks.

Components, started in this order and stopped in reverse (see docs/worker.md for the diagram):

1. **broker** — one connection; the consumed queues are declared.
2. **result store** — one connection, shared with tasks that send tasks (``await x.adelay()``).
3. **pool** — threads for sync task bodies (async bodies run on the loop).
4. **lease keeper** — renews the leases of every message held, so a long task is never redelivered
   while this worker lives.
5. **consumer** — fetches up to ``concurrency * prefetch_multiplier`` messages, decodes them at
   once (bad ones are refused without taking a slot), and starts each in a concurrency slot.

Acknowledgement comes after the result is stored (``acks_late``, the default), so a worker that dies
at any point loses nothing: the message's lease runs out and it is delivered again.

Shutdown: the first SIGTERM/SIGINT is a *warm* shutdown — stop fetching, give every message not yet
started back to the broker, let running tasks finish, close. A second signal is a *cold* shutdown —
give back everything not finished, including running tasks, and exit now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celeriac import codecs, states
from celeriac.app.calling import CALL_OPTIONS
from celeriac.app.canvas import Signature
from celeriac.app.queues import queue_spec
from celeriac.backends.base import ReplyRoute, ResultBackend, reply_route
from celeriac.backends.meta import build_meta
from celeriac.brokers.base import Broker, Delivery, QueueSpec
from celeriac.exceptions import (
    CeleriacError,
    ConnectionError,
    EncodeError,
    ImproperlyConfigured,
    Retry,
    TaskRevokedError,
)
from celeriac.signals import (
    task_received,
    task_revoked,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from celeriac.utils.redact import redact_url
from celeriac.worker import execution
from celeriac.worker.finisher import Finisher
from celeriac.worker.logs import logger
from celeriac.worker.pools import ThreadPool, check_pool
from celeriac.worker.request import Refusal, Request, prepare

if TYPE_CHECKING:
    from celeriac.app.base import Celery

#: Content types whose decoding can execute code chosen by whoever wrote the message.
UNSAFE_CONTENT = frozenset({"application/x-python-serialize"})

#: Seconds a fetch waits for messages before checking for shutdown.
FETCH_WAIT = 0.5


def default_hostname() -> str:
    """``celeriac@<host>``."""
    return f"celeriac@{socket.gethostname()}"


def expand_hostname(template: str) -> str:
    """Celery's ``-n`` placeholders: ``%h`` full host, ``%n`` short name, ``%d`` domain."""
    host = socket.gethostname()
    name, _, domain = host.partition(".")
    return template.replace("%h", host).replace("%n", name).replace("%d", domain)


class Worker:
    """``celeriac -A app worker``, as an object: ``Worker(app, queues=["celery"]).start()``."""

    def __init__(
        self,
        app: Celery,
        *,
        queues: list[str] | None = None,
        concurrency: int | None = None,
        pool: str = "threads",
        hostname: str | None = None,
        prefetch_multiplier: int | None = None,
    ) -> None:
        self.app = app
        self.queues = queues or [app.conf.task_default_queue]
        self.pool_name = check_pool(pool)
        if self.pool_name == "solo":
            concurrency = 1
        self.concurrency = concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
        multiplier = prefetch_multiplier or app.conf.worker_prefetch_multiplier
        self.prefetch = self.concurrency * multiplier
        self.hostname = expand_hostname(hostname) if hostname else default_hostname()
        self.accept = codecs.resolve_accept(app.conf.accept_content)
        self.broker: Broker | None = None
        self.backend: ResultBackend | None = None
        self.pool: ThreadPool | None = None
        self.finisher: Finisher | None = None
        #: Messages held (leased) by this worker, by delivery tag.
        self._held: dict[str, Delivery] = {}
        #: Handlers of messages not started yet (waiting for a slot).
        self._waiting: dict[str, asyncio.Task[None]] = {}
        #: Handlers of messages whose task is running.
        self._running: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(self.concurrency)
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._cold = False
        #: Set once the worker consumes (for embedding it: tests, other programs).
        self.ready = threading.Event()
        self.processed = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> int:
        """Run until a signal stops the worker; the process exit status."""
        return asyncio.run(self.run())

    async def run(self) -> int:
        """Start the components, consume until stopped, stop the components.

        ``worker_init`` is sent first and ``worker_shutdown`` last, whatever happens between.
        """
        if worker_init.receivers:
            worker_init.send(sender=self)
        try:
            return await self._run()
        finally:
            if worker_shutdown.receivers:
                worker_shutdown.send(sender=self)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        broker = self.app.create_broker()
        backend = self.app.create_result_store()
        if not await self._connect("broker", broker.url, lambda: self._open_broker(broker)):
            await broker.close()
            self._remove_signals(loop)
            return 0
        self.broker = broker
        if not await self._connect("result store", backend.url, backend.connect):
            await broker.close()
            await backend.close()
            self._remove_signals(loop)
            return 0
        self.backend = backend
        self.app.use_connections(broker, backend)
        self.finisher = Finisher(broker, backend)
        self.pool = ThreadPool(self.concurrency)
        if worker_process_init.receivers:
            # Celery sends it in each pool process; here the worker process runs the tasks itself.
            worker_process_init.send(sender=self.hostname)
        keeper = asyncio.create_task(self._keep_leases(), name="celeriac-lease-keeper")
        self._warn_about_unsafe_content()
        logger.info("%s ready.", self.hostname)
        if worker_ready.receivers:
            worker_ready.send(sender=self)
        self.ready.set()
        try:
            await self._consume()
        finally:
            await self._shutdown()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            self.pool.shutdown(wait=not self._cold)
            await broker.close()
            await backend.close()
            self._remove_signals(loop)
        logger.info("%s stopped (%d tasks processed).", self.hostname, self.processed)
        return 0

    async def _open_broker(self, broker: Broker) -> None:
        await broker.connect()
        await self._declare_queues(broker)

    async def _declare_queues(self, broker: Broker) -> None:
        for queue in self.queues:
            await broker.declare(self._queue_spec(queue))

    async def _connect(self, what: str, url: str, open_: Callable[[], Awaitable[None]]) -> bool:
        """Open a connection, retrying with backoff while the server is unreachable.

        A worker started before its broker (a container starting first, a broker restarting)
        waits for it rather than exiting. Returns False when a stop came first.
        """
        delay = 1.0
        while True:
            try:
                await open_()
                return True
            except ConnectionError as exc:
                if self._stop.is_set():
                    return False
                logger.error(
                    "Cannot connect to the %s at %s (%s); retrying in %.0fs.",
                    what,
                    redact_url(url),
                    exc,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return False
            delay = min(delay * 2, 30.0)

    def _warn_about_unsafe_content(self) -> None:
        """Say loudly when the worker will decode content that can run code."""
        unsafe = sorted(self.accept & UNSAFE_CONTENT)
        if unsafe:
            logger.warning(
                "accept_content includes %s: anyone who can write to the broker can run code in "
                "this worker. Accept only json unless every producer is trusted.",
                ", ".join(unsafe),
            )

    def _queue_spec(self, queue: str) -> QueueSpec:
        """A consumed queue as Celery declares it (see :func:`celeriac.app.queues.queue_spec`)."""
        return queue_spec(self.app.conf, queue)

    def stop(self, cold: bool = False) -> None:
        """Ask the worker to stop: warm (finish running tasks) or cold (give them back)."""
        if self._stop.is_set() or cold:
            if not self._cold:
                logger.warning("Cold shutdown: giving running tasks back to the broker.")
            self._cold = True
            for handler in list(self._running.values()):
                handler.cancel()
        else:
            logger.warning("Warm shutdown: finishing running tasks (signal again to stop now).")
        self._stop.set()
        self._room.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGQUIT, self.stop, True)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (embedded in tests or another program)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)

    # -- consuming -----------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self.broker is not None
        backoff = 0.5
        rotation = 0
        lost = False
        while not self._stop.is_set():
            room = self.prefetch - len(self._held)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            # Rotate the queue order between fetches so a busy first queue cannot starve the rest.
            order = self.queues[rotation:] + self.queues[:rotation]
            rotation = (rotation + 1) % len(self.queues)
            try:
                deliveries = await self.broker.fetch(order, room, FETCH_WAIT)
            except CeleriacError as exc:
                logger.error("Cannot fetch from the broker (%s); retrying in %.1fs.", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                lost = True
                continue
            if lost:
                # Back after an outage: the broker may have restarted without its bindings.
                lost = False
                logger.info("Connection to the broker is back; consuming again.")
                try:
                    await self._declare_queues(self.broker)
                except CeleriacError as exc:
                    logger.warning("Could not declare the queues again: %s", exc)
            backoff = 0.5
            for delivery in deliveries:
                self._held[delivery.delivery_tag] = delivery
                handler = asyncio.create_task(self._handle(delivery))
                self._waiting[delivery.delivery_tag] = handler

    async def _handle(self, delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        try:
            outcome = prepare(self.app, delivery, self.accept, self.hostname)
            if isinstance(outcome, Refusal):
                await self._refuse(delivery, outcome)
                return
            if await self._deferred_or_expired(outcome):
                return
            logger.info("Task %s received", outcome)
            if task_received.receivers:
                task_received.send(sender=self, request=outcome)
            for note in outcome.unsupported():
                logger.warning("Task %s: %s by this version of celeriac.", outcome, note)
            async with self._slots:
                if self.broker is not None and self.broker.is_lost(delivery):
                    # The broker took it back with a lost connection and delivers it again:
                    # running this copy too would run the task twice.
                    logger.info("Task %s was taken back by the broker; not starting it", outcome)
                    return
                self._waiting.pop(tag, None)
                self._running[tag] = asyncio.current_task()  # type: ignore[assignment]
                meta, ack = await self._execute(outcome)
            # The slot is free for the next task while the result is stored and the message
            # acked; the message stays held (and counted against the prefetch) until then.
            assert self.finisher is not None
            await self.finisher.finish(meta, ack, _route_of(outcome))
        except asyncio.CancelledError:
            # Warm shutdown before the task started, or cold shutdown while it ran: the message
            # goes back to the broker and runs again (a cancelled handler has nothing to finish).
            await self._give_back(delivery)
        except CeleriacError as exc:
            logger.error(
                "Message %s not finished (%s); it stays with the broker and will be delivered again.",
                tag,
                exc,
            )
        except Exception:
            logger.exception("Internal error handling message %s; it will be delivered again.", tag)
        finally:
            self._waiting.pop(tag, None)
            self._running.pop(tag, None)
            self._held.pop(tag, None)
            self._room.set()

    async def _give_back(self, delivery: Delivery) -> None:
        assert self.broker is not None
        try:
            await self.broker.reject(delivery, requeue=True, reason="worker shutdown")
        except CeleriacError as exc:
            logger.warning(
                "Could not give back %s (%s); its lease will expire.", delivery.delivery_tag, exc
            )

    async def _refuse(self, delivery: Delivery, refusal: Refusal) -> None:
        assert self.broker is not None
        logger.error(
            "Rejecting message %s from queue %r: %s",
            delivery.delivery_tag,
            delivery.queue,
            refusal.reason,
        )
        if refusal.task_id is not None:
            properties = delivery.message.properties
            route = reply_route(
                properties.get("reply_to"), properties.get("correlation_id"), refusal.task_id
            )
            await self._store(build_meta(refusal.task_id, states.FAILURE, refusal.error), route)
        await self.broker.reject(delivery, requeue=False, reason=refusal.reason)

    async def _deferred_or_expired(self, request: Request) -> bool:
        """Handle a message that arrived before its ETA or after its expiry time."""
        assert self.broker is not None
        message = request.message
        now = datetime.now(UTC)
        if message.expires is not None and message.expires <= now:
            logger.info("Task %s expired at %s: revoked, not run", request, message.expires)
            if task_revoked.receivers:
                task_revoked.send(
                    sender=request.task,
                    request=request.context(),
                    terminated=False,
                    signum=None,
                    expired=True,
                )
            if not request.ignores_result():
                await self._store(
                    build_meta(message.id, states.REVOKED, TaskRevokedError("expired")),
                    _route_of(request),
                )
            await self.broker.ack([request.delivery])
            return True
        if message.eta is not None and message.eta > now + timedelta(milliseconds=5):
            # Never hold a delayed message in memory: it waits in the broker until due.
            await self.broker.defer(request.delivery, message.eta.timestamp())
            return True
        return False

    # -- running and finishing ---------------------------------------------------------------------

    async def _execute(self, request: Request) -> tuple[dict[str, Any] | None, Delivery | None]:
        """Run the task; the result document to store and the delivery to ack afterwards."""
        assert self.broker is not None and self.pool is not None and self.finisher is not None
        task = request.task
        ignore = request.ignores_result()
        acks_late = task.resolved_acks_late()
        if not acks_late:
            await self.broker.ack([request.delivery])
        if task.resolved_track_started() and not ignore:
            await self._store(
                build_meta(
                    request.id, states.STARTED, {"pid": os.getpid(), "hostname": self.hostname}
                ),
                _route_of(request),
            )
        outcome = await execution.run(request, self.pool)
        self.processed += 1
        for unraised in outcome.unraised:
            # retry(throw=False): sent as asked, whatever the body did afterwards (Celery's rule).
            try:
                await self._send_retry(request, unraised)
            except (ImproperlyConfigured, EncodeError) as exc:
                logger.error("Task %s: retry(throw=False) could not be sent: %s", request, exc)
        meta: dict[str, Any] | None = None
        if outcome.retry is not None:
            try:
                meta = await self._retry(request, outcome)
            except (ImproperlyConfigured, EncodeError) as exc:
                # Nothing was sent (bad retry options, new arguments that do not serialize): the
                # task fails with that error instead of being redelivered to fail the same way.
                outcome = execution.failed(outcome, exc)
        if outcome.state == states.SUCCESS:
            logger.info("Task %s succeeded in %.4fs: %r", request, outcome.runtime, outcome.value)
            if not ignore:
                meta = self._meta(request, states.SUCCESS, outcome.value)
            await self._send_callbacks(request, outcome.value)
        elif outcome.state == states.FAILURE:
            logger.error(
                "Task %s raised unexpected: %r\n%s",
                request,
                outcome.value,
                outcome.traceback,
            )
            if not ignore or task.resolved_store_errors():
                meta = self._meta(request, states.FAILURE, outcome.value, outcome.traceback)
            await self._send_errbacks(request)
        # Result first, then the ack: a crash in between redelivers, it never loses.
        return meta, request.delivery if acks_late else None

    def _meta(
        self, request: Request, state: str, value: Any, traceback: str | None = None
    ) -> dict[str, Any]:
        message = request.message
        extended = None
        if self.app.conf.result_extended:
            extended = {
                "name": message.task,
                "args": message.args,
                "kwargs": message.kwargs,
                "worker": self.hostname,
                "retries": message.retries,
                "queue": request.delivery.routing_key or request.delivery.queue,
            }
        return build_meta(
            message.id,
            state,
            value,
            traceback=traceback,
            group_id=message.group,
            parent_id=message.parent_id,
            extended=extended,
        )

    async def _store(self, meta: dict[str, Any], route: ReplyRoute | None) -> None:
        assert self.finisher is not None
        await self.finisher.store(meta, route)

    async def _retry(self, request: Request, outcome: execution.Outcome) -> dict[str, Any] | None:
        """Publish the retried message (it waits in the broker); the RETRY document to store."""
        retry = outcome.retry
        assert retry is not None
        await self._send_retry(request, retry)
        logger.info("Task %s retry: %s", request, retry)
        if request.ignores_result():
            return None
        cause = retry.exc if retry.exc is not None else retry
        return self._meta(request, states.RETRY, cause, outcome.traceback)

    async def _send_retry(self, request: Request, retry: Retry) -> None:
        """Send the message of a retry like any call (publish signals, publish retries)."""
        outgoing = execution.retry_outgoing(self.app, request, retry, self.hostname)
        await self.app._publish(outgoing)

    async def _send_linked(
        self, signatures: list[dict[str, Any]], first_arg: Any, request: Request
    ) -> None:
        for raw in signatures:
            sig = Signature(raw, app=self.app)
            options = {k: v for k, v in sig.options.items() if k in CALL_OPTIONS}
            dropped = sorted(set(sig.options) - set(options))
            if dropped:
                logger.warning(
                    "Linked task %s: options not understood and not applied: %s", sig.task, dropped
                )
            args = list(sig.args) if sig.immutable else [first_arg, *sig.args]
            options.setdefault("parent_id", request.id)
            options.setdefault("root_id", request.message.root_id or request.id)
            try:
                await self.app.asend_task(sig.task, args, sig.kwargs, **options)
            except CeleriacError as exc:
                logger.error("Could not send linked task %s of %s: %s", sig.task, request, exc)

    async def _send_callbacks(self, request: Request, value: Any) -> None:
        if request.message.callbacks:
            await self._send_linked(request.message.callbacks, value, request)

    async def _send_errbacks(self, request: Request) -> None:
        # Errbacks travel the old, wire-portable way: the failed task's id is the first argument.
        if request.message.errbacks:
            await self._send_linked(request.message.errbacks, request.id, request)

    # -- leases and shutdown ---------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        assert self.broker is not None
        period = max(self.app.broker_options().visibility_timeout / 3, 0.05)
        while True:
            await asyncio.sleep(period)
            held = list(self._held.values())
            if not held:
                continue
            try:
                await self.broker.renew(held)
            except CeleriacError as exc:
                logger.warning("Could not renew %d leases: %s", len(held), exc)

    async def _shutdown(self) -> None:
        waiting = list(self._waiting.values())
        for handler in waiting:
            handler.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        # A handler cancelled before its first step never runs, so it cannot give its message
        # back itself (this happens to the messages of a fetch that returned as the stop came).
        for tag, delivery in list(self._held.items()):
            if tag not in self._running:
                del self._held[tag]
                await self._give_back(delivery)
        running = list(self._running.values())
        if running:
            logger.info("Waiting for %d running task(s) to finish.", len(running))
        await asyncio.gather(*running, return_exceptions=True)


def _route_of(request: Request) -> ReplyRoute | None:
    """Where the caller of ``request`` waits for its result (rpc://): the message's reply route."""
    message = request.message
    return reply_route(message.reply_to, message.correlation_id, message.id)


logging.getLogger("asyncio").setLevel(logging.WARNING)
# The AMQP transport reports connection losses itself; aiormq's tracebacks would only repeat them.
logging.getLogger("aiormq").setLevel(logging.CRITICAL)
