"""The worker: an asyncio process that leases task messages, runs them, stores results, acks.

Components, started in this order and stopped in reverse (see docs/worker.md for the diagram):

1. **broker** — one connection; the consumed queues are declared.
2. **result store** — one connection, shared with tasks that send tasks (``await x.adelay()``).
3. **revoked task ids** — loaded before the first fetch, then followed
   (:mod:`celeriac.worker.revocations`); a revoked message is dropped, a task revoked with
   ``terminate=True`` is stopped.
4. **pool** — threads, or child processes with ``-P prefork``, for sync task bodies (async bodies
   run on the loop); see :mod:`celeriac.worker.pools`.
5. **lease keeper** — renews the leases of every message held, so a long task is never redelivered
   while this worker lives.
6. **consumer** — fetches up to its prefetch (``concurrency * prefetch_multiplier`` for sync
   tasks, the async limit's share while ``async def`` tasks run), decodes the messages at once
   (bad ones are refused without taking a slot), and starts each in a concurrency slot: sync tasks
   in the pool's, ``async def`` tasks in their own. A queue given its own limit (``-Q io:500``)
   has its own slots, prefetch and consumer loop (:mod:`celeriac.worker.slots`).
   A rate-limited message waits for its grant before it asks for a slot
   (:mod:`celeriac.worker.ratelimit`).

Acknowledgement comes after the result is stored (``acks_late``, the default), so a worker that dies
at any point loses nothing: the message's lease runs out and it is delivered again. A message
delivered more than ``max_deliveries`` times is dead-lettered instead of run (it keeps killing its
worker), and a redelivered one runs alone, so that healthy messages are not counted with it
(:meth:`Worker._admit`).

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
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from celeriac import codecs, states
from celeriac.app import chains
from celeriac.app.calling import CALL_OPTIONS
from celeriac.app.canvas import Signature
from celeriac.app.control import (
    TERM_SIGNAME,
    celery_broadcasts,
    revocation_store,
    signal_number,
    unavailable_reason,
)
from celeriac.app.queues import queue_spec
from celeriac.backends.base import ReplyRoute, ResultBackend, reply_route
from celeriac.backends.meta import build_meta
from celeriac.brokers._revocations import Revocation
from celeriac.brokers.base import Broker, Delivery, QueueSpec
from celeriac.exceptions import (
    CeleriacError,
    ConnectionError,
    EncodeError,
    ImproperlyConfigured,
    Retry,
    RoutingError,
    TaskRevokedError,
    WorkerLostError,
)
from celeriac.signals import (
    ExceptionInfo,
    task_failure,
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
from celeriac.worker.pools import (
    JobWithdrawn,
    Pool,
    check_pool,
    create_pool,
    pool_options,
    queues_jobs,
)
from celeriac.worker.ratelimit import RateLimits
from celeriac.worker.request import Refusal, Request, prepare
from celeriac.worker.revocations import RevokedTasks
from celeriac.worker.slots import QueueGroup, Slots

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
    """``celeriac -A app worker``, as an object: ``Worker(app, queues=["celery"]).start()``.

    ``async_concurrency`` is ``--async-concurrency``; ``queue_concurrency`` maps queues of
    ``queues`` to their own limits, as ``-Q io:500`` does (see :mod:`celeriac.worker.slots`).
    """

    def __init__(
        self,
        app: Celery,
        *,
        queues: list[str] | None = None,
        concurrency: int | None = None,
        pool: str = "threads",
        hostname: str | None = None,
        prefetch_multiplier: int | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        async_concurrency: int | None = None,
        queue_concurrency: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.queues = queues or [app.conf.task_default_queue]
        self.pool_name = check_pool(pool)
        if self.pool_name == "solo":
            concurrency = 1
        self.concurrency = concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
        #: Concurrency slots and prefetch budget of each group of queues (celeriac.worker.slots).
        self.slots = Slots(
            self.queues,
            concurrency=self.concurrency,
            pool=self.pool_name,
            multiplier=prefetch_multiplier or app.conf.worker_prefetch_multiplier,
            tasks=app.tasks.values(),
            async_concurrency=(
                async_concurrency
                if async_concurrency is not None
                else app.conf.worker_async_concurrency
            ),
            queue_concurrency=queue_concurrency,
            pool_queues_jobs=queues_jobs(self.pool_name),
        )
        #: ``async def`` bodies run at once on the event loop (queues without a limit of their own).
        self.async_concurrency = self.slots.async_concurrency
        self.pool_options = pool_options(
            app,
            self.pool_name,
            self.slots.pool_size,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
        )
        self.prefetch = self.slots.prefetch
        self.hostname = expand_hostname(hostname) if hostname else default_hostname()
        self.accept = codecs.resolve_accept(app.conf.accept_content)
        self.broker: Broker | None = None
        self.backend: ResultBackend | None = None
        self.pool: Pool | None = None
        self.finisher: Finisher | None = None
        #: Messages held (leased) by this worker, by delivery tag.
        self._held: dict[str, Delivery] = {}
        #: Handlers of messages not started yet (waiting for a slot).
        self._waiting: dict[str, asyncio.Task[None]] = {}
        #: Handlers of messages whose task is running (or, for a sync task handed to a pool that
        #: queues jobs, queued there: then its tag is in ``_queued_in_pool`` too).
        self._running: dict[str, asyncio.Task[None]] = {}
        #: Delivery tags of sync tasks handed to the pool and not taken by a pool thread yet. A
        #: pool thread removes the tag as it takes the job (see :meth:`_still_wanted`).
        self._queued_in_pool: set[str] = set()
        #: Rate limits of the tasks (read at start); None when no task has one.
        self._rate_limits: RateLimits | None = None
        #: Delivery tag of the redelivered message running alone here (see :meth:`_admit`).
        self._alone: str | None = None
        self._stop = asyncio.Event()
        self._cold = False
        #: Revoked task ids, followed from the broker or result store (None: nowhere to keep them).
        self._revoked: RevokedTasks | None = None
        #: Requests of the running tasks by delivery tag, until their body ended (for terminate).
        self._running_requests: dict[str, Request] = {}
        #: Running tasks being stopped by a revoke with terminate=True: request and signal number.
        self._terminating: dict[str, tuple[Request, int]] = {}
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
        # Before connecting: a cluster-wide limit without a shared store is refused at once.
        self._rate_limits = RateLimits.for_worker(self.app, broker, backend, self.prefetch)
        if not await self._connect("broker", broker.url, lambda: self._open_broker(broker)):
            await broker.close()
            self._remove_signals(loop)
            return 0
        self.broker = broker
        for group in self.slots.groups:
            group.bigger_first = broker.prefetch_fixed_by_first_fetch
            group.ahead = self.app.conf.worker_prefetch_ahead
        if not await self._connect("result store", backend.url, backend.connect):
            await broker.close()
            await backend.close()
            self._remove_signals(loop)
            return 0
        self.backend = backend
        self.app.use_connections(broker, backend)
        if not await self._start_revocations():
            await broker.close()
            await backend.close()
            self._remove_signals(loop)
            return 0
        # A task handed to the finisher frees room for the next fetch: its handler says so to
        # its queue group (QueueGroup.handed_over), which knows whose room it is.
        self.finisher = Finisher(broker, backend)
        self.pool = create_pool(self.pool_name, self.app, self.hostname, self.pool_options)
        try:
            await self.pool.start()
        except BaseException:
            if self._revoked is not None:
                await self._revoked.stop()
            await broker.close()
            await backend.close()
            self._remove_signals(loop)
            raise
        if self.pool.in_worker_process and worker_process_init.receivers:
            # Celery sends it in each pool process (prefork does); with threads the worker
            # process runs the tasks itself.
            worker_process_init.send(sender=self.hostname)
        keeper = asyncio.create_task(self._keep_leases(), name="celeriac-lease-keeper")
        self._warn_about_unsafe_content()
        for line in self.slots.describe():
            logger.info("%s", line)
        logger.info("%s ready.", self.hostname)
        if worker_ready.receivers:
            worker_ready.send(sender=self)
        self.ready.set()
        try:
            await self._consume()
        finally:
            await self._shutdown()
            if self._revoked is not None:
                await self._revoked.stop()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await self.pool.stop(cold=self._cold)
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
            if self.pool is not None:
                # Queued jobs no thread has taken are given back unused (uncounted), not
                # cancelled as if they had started.
                self.pool.withdraw_queued()
            for tag, handler in list(self._running.items()):
                if tag not in self._queued_in_pool:
                    handler.cancel()
        else:
            logger.warning("Warm shutdown: finishing running tasks (signal again to stop now).")
        self._stop.set()
        self.slots.wake()

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
        """One consumer loop per group of queues with its own slots (one, unless ``-Q q:N``)."""
        groups = self.slots.by_size()
        if len(groups) == 1:
            await self._consume_group(groups[0])
            return
        async with asyncio.TaskGroup() as consumers:
            for group in groups:
                consumers.create_task(
                    self._consume_group(group), name=f"celeriac-consumer-{group.name}"
                )

    async def _consume_group(self, group: QueueGroup) -> None:
        assert self.broker is not None
        # Its create_task, not asyncio's: that looks the loop up for every message.
        create_task = asyncio.get_running_loop().create_task
        backoff = 0.5
        lost = False
        while not self._stop.is_set():
            room = group.room_to_fetch()
            if room <= 0 or self._alone is not None:
                # Full, or a redelivered message runs alone: fetch nothing until it is done.
                group.room.clear()
                group.idle.set()
                await group.room.wait()
                group.idle.clear()
                continue
            order = group.fetch_order()
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
            group.fetched(len(deliveries), room)
            more: list[Delivery] = []
            try:
                if group.expects_async(deliveries, self._runs_async):
                    more = await self._fetch_async_share(group, order)
            finally:  # (a shutdown during that fetch still hands these over)
                for delivery in [*deliveries, *more]:
                    self._held[delivery.delivery_tag] = delivery
                    handler = create_task(self._handle(delivery, group))
                    self._waiting[delivery.delivery_tag] = handler

    def _runs_async(self, delivery: Delivery) -> bool:
        """Whether the message names an ``async def`` task of this app (protocol v2 headers; a
        v1 message names its task in its body, and counts as sync here)."""
        name = delivery.message.headers.get("task")
        task = self.app.tasks.get(name) if isinstance(name, str) else None
        return task is not None and task.is_async

    async def _fetch_async_share(self, group: QueueGroup, order: list[str]) -> list[Delivery]:
        """The rest of an async flood's budget, without waiting, before its first tasks start
        (see :meth:`QueueGroup.expects_async`); nothing if that fetch fails (the next one is the
        consumer's usual)."""
        assert self.broker is not None
        room = group.room_to_fetch(assume_async=True)
        if room <= 0:
            return []
        try:
            more = await self.broker.fetch(order, room, 0)
        except CeleriacError as exc:
            logger.warning("Cannot fetch from the broker (%s); retrying.", exc)
            return []
        group.fetched(len(more), room)
        return more

    async def _handle(self, delivery: Delivery, group: QueueGroup | None = None) -> None:
        tag = delivery.delivery_tag
        if group is None:
            group = self.slots.group_of(delivery.queue)
        handed_over = False
        finishing = False
        try:
            outcome = prepare(self.app, delivery, self.accept, self.hostname)
            if isinstance(outcome, Refusal):
                await self._refuse(delivery, outcome)
                return
            if await self._discard_if_revoked(outcome):
                return
            if await self._deferred_or_expired(outcome):
                return
            if not await self._admit(outcome):
                return
            if self._rate_limits is not None and not await self._rate_limits.admit(outcome):
                return  # deferred to the broker until about its turn
            logger.info("Task %s received", outcome)
            if task_received.receivers:
                task_received.send(sender=self, request=outcome)
            for note in outcome.unsupported():
                logger.warning("Task %s: %s by this version of celeriac.", outcome, note)
            if self._alone == tag:
                await self._wait_until_alone(tag)
            async with group.slot(outcome.task.is_async):
                if self.broker is not None and self.broker.is_lost(delivery):
                    # The broker took it back with a lost connection and delivers it again:
                    # running this copy too would run the task twice.
                    logger.info("Task %s was taken back by the broker; not starting it", outcome)
                    return
                if await self._discard_if_revoked(outcome):
                    return  # revoked while it waited for a slot
                handler = self._waiting.pop(tag, None)  # this task (tags are unique)
                if handler is not None:
                    group.waiting -= 1
                self._running[tag] = handler or cast("asyncio.Task[None]", asyncio.current_task())
                self._running_requests[tag] = outcome
                try:
                    meta, ack = await self._execute(outcome, group)
                except JobWithdrawn:
                    await self._not_started(outcome)
                    return
            # The slot is free for the next task while the result is stored and the message
            # acked; the message stays held until then (counted against the prefetch unless
            # it is acked then). The handler ends here: the finisher's batch ends the rest.
            assert self.finisher is not None
            if meta is None and ack is None:
                return
            if ack is not None:
                group.handed_over()
                handed_over = True
            self.finisher.hand_over(
                meta, ack, _route_of(outcome), partial(self._finished, tag, group, handed_over)
            )
            finishing = True
        except asyncio.CancelledError:
            terminated = self._terminating.pop(tag, None)
            if terminated is not None:
                # Stopped by revoke(terminate=True): it is over, not to be run again.
                await self._end_terminated(*terminated)
            else:
                # Warm shutdown before the task started, or cold shutdown while it ran: the
                # message goes back to the broker and runs again (nothing to finish).
                await self._give_back(delivery)
        except Exception as exc:
            self._not_finished(tag, exc, "handling")
        finally:
            if self._waiting.pop(tag, None) is not None:
                group.waiting -= 1
            self._queued_in_pool.discard(tag)
            self._running.pop(tag, None)
            self._running_requests.pop(tag, None)
            self._terminating.pop(tag, None)
            if not finishing:
                self._held.pop(tag, None)
                group.ended(handed_over)

    def _finished(
        self, tag: str, group: QueueGroup, handed_over: bool, error: BaseException | None
    ) -> None:
        """The finisher's batch that held the result and ack of ``tag`` ended."""
        if error is not None and not isinstance(error, asyncio.CancelledError):
            self._not_finished(tag, error, "finishing")
        self._held.pop(tag, None)
        group.ended(handed_over)

    @staticmethod
    def _not_finished(tag: str, error: BaseException, doing: str) -> None:
        """Log why the message ``tag`` was not finished: the broker delivers it again. A store or
        broker error is told in one line, anything else (a bug) with its traceback."""
        if isinstance(error, CeleriacError):
            logger.error(
                "Message %s not finished (%s); it stays with the broker and will be delivered again.",
                tag,
                error,
            )
        else:
            logger.error(
                "Internal error %s message %s; it will be delivered again.",
                doing,
                tag,
                exc_info=error,
            )

    async def _not_started(self, request: Request) -> None:
        """The pool gave back the job of ``request`` unstarted: found revoked or taken back by the
        broker as a thread took it, else withdrawn (shutdown)."""
        assert self.broker is not None
        if await self._discard_if_revoked(request):
            return
        if self.broker.is_lost(request.delivery):
            logger.info("Task %s was taken back by the broker; not starting it", request)
            return
        await self._give_back(request.delivery)

    def _still_wanted(self, request: Request) -> bool:
        """On a pool thread, as it takes the job of ``request``: whether to start it. Reads only
        (a set, a dict, a flag), so it needs nothing from the event loop."""
        tag = request.delivery.delivery_tag
        self._queued_in_pool.discard(tag)
        assert self.broker is not None
        if self.broker.is_lost(request.delivery):
            return False
        return self._revoked is None or self._revoked.get(request.id) is None

    async def _give_back(self, delivery: Delivery) -> None:
        assert self.broker is not None
        tag = delivery.delivery_tag
        try:
            if tag in self._running and tag not in self._queued_in_pool:
                # Cold shutdown of a running task: this delivery was used, so it counts.
                await self.broker.reject(delivery, requeue=True, reason="worker shutdown")
            else:
                # Never started: handed back unused, it does not count as a delivery, so
                # restarts (deploys) cannot add up to a message's max_deliveries.
                await self.broker.defer(delivery, time.time())
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
        if message.expires is None and message.eta is None:
            return False
        now = datetime.now(UTC)
        if message.expires is not None and message.expires <= now:
            logger.info("Task %s expired at %s: revoked, not run", request, message.expires)
            await self._announce_revoked(request, "expired", None)
            return True
        if message.eta is not None and message.eta > now + timedelta(milliseconds=5):
            # Never hold a delayed message in memory: it waits in the broker until due.
            await self.broker.defer(request.delivery, message.eta.timestamp())
            return True
        return False

    # -- poison messages ---------------------------------------------------------------------------

    async def _admit(self, request: Request) -> bool:
        """Whether to run ``request`` here; if not, it has been dealt with.

        A message delivered more than ``max_deliveries`` times is dead-lettered and its result set
        to FAILURE: its task never finished, and each time its worker died or gave it back.

        A redelivered message (``delivery_count`` > 1) may be the one that killed its last worker,
        so it runs *alone*: it waits until nothing else is held here, the consumer fetches nothing
        meanwhile, and messages that arrive meanwhile are handed back unused (uncounted). If it
        kills this worker too, only its own count goes up. Without this, healthy messages held
        beside a poison message would be counted with it at every crash and dead-lettered with it;
        with it, they are counted once, then each runs alone and succeeds. A sync task on
        ``-P prefork`` is exempt: its body runs in a child whose death ends nothing else.
        """
        assert self.broker is not None
        delivery = request.delivery
        cap = request.task.resolved_max_deliveries()
        if cap is not None and delivery.delivery_count > cap:
            await self._dead_letter_poison(request, cap)
            return False
        if self._alone is not None:
            logger.debug("Task %s handed back: a redelivered message runs alone here", request)
            await self.broker.defer(delivery, time.time())
            return False
        if delivery.delivery_count > 1 and self._runs_in_worker_process(request):
            tag = delivery.delivery_tag
            self._alone = tag
            handler = asyncio.current_task()
            assert handler is not None
            handler.add_done_callback(lambda _: self._end_alone(tag))
        return True

    def _runs_in_worker_process(self, request: Request) -> bool:
        """Whether the body of ``request`` runs in this process, so its crash ends every task here.

        A sync body on ``-P prefork`` runs in a child: if it dies, only its own message is counted
        (the pool reports it as worker-lost), so it need not run alone.
        """
        return request.task.is_async or self.pool is None or self.pool.in_worker_process

    async def _wait_until_alone(self, tag: str) -> None:
        """Wait until the handler of ``tag`` is the only one left (the others finish or leave)
        and the consumer has stopped, then have the broker give back what it prefetched for this
        worker, if it does so."""
        while True:
            others = [h for t, h in (*self._waiting.items(), *self._running.items()) if t != tag]
            if others:
                await asyncio.wait(others)
            elif self.finisher is not None and self.finisher.busy:
                await self.finisher.idle()  # messages still being finished are held here too
            elif (fetching := self.slots.fetching()) is not None:
                # A fetch under way when this message was admitted: what it brings is handed
                # back, but it must be fetched (leased) and handed back first.
                await fetching.idle.wait()
            else:
                break
        # AMQP pushes messages ahead of any fetch; were this worker to die holding them, they
        # would be counted as deliveries too. Lease-based transports hold nothing unfetched.
        assert self.broker is not None
        await self.broker.release_prefetched()

    def _end_alone(self, tag: str) -> None:
        if self._alone == tag:
            self._alone = None
            self.slots.wake()  # the consumers fetch again

    async def _dead_letter_poison(self, request: Request, cap: int) -> None:
        """Dead-letter a message that was delivered ``cap`` times without finishing."""
        assert self.broker is not None
        delivery = request.delivery
        count = delivery.delivery_count
        what = f"delivered {count - 1} times without finishing (max_deliveries={cap})"
        logger.error(
            "Task %s was %s (each time the process running it died, or it was given back). "
            "Dead-lettered on delivery %d instead of being run again.",
            request,
            what,
            count,
        )
        error = WorkerLostError(f"Task {request.name}[{request.id}] was {what}; dead-lettered")
        task = request.task
        self._send_task_failure(request, error, None)
        if not request.ignores_result() or task.resolved_store_errors():
            await self._store(self._meta(request, states.FAILURE, error), _route_of(request))
        await self._send_errbacks(request, error)
        await self.broker.reject(delivery, requeue=False, reason=f"poison message: {what}")

    def _send_task_failure(
        self, request: Request, error: BaseException, traceback: str | None
    ) -> None:
        """``task_failure`` for a task whose body could not send it (it never ran, or its process
        died)."""
        if task_failure.receivers:
            task_failure.send(
                sender=request.task,
                task_id=request.id,
                exception=error,
                args=request.message.args,
                kwargs=request.message.kwargs,
                traceback=error.__traceback__,
                einfo=ExceptionInfo(error, traceback),
            )

    async def _requeue_lost(self, request: Request, outcome: execution.Outcome) -> None:
        """The process running the task died: the message goes back to the queue, counted."""
        assert self.broker is not None
        cap = request.task.resolved_max_deliveries()
        logger.error(
            "Task %s: the process running it died (%s); delivery %d of at most %s goes back to "
            "the queue.",
            request,
            outcome.value,
            request.delivery.delivery_count,
            "unlimited" if cap is None else cap,
        )
        await self.broker.reject(request.delivery, requeue=True, reason="worker lost")

    # -- revoked tasks -------------------------------------------------------------------------------

    async def _start_revocations(self) -> bool:
        """Load the revoked ids and follow them; False if a stop came while waiting for the store.

        Loaded before the first fetch, so a task revoked while no worker ran never starts.
        """
        store = revocation_store(self.app)
        if store is None:
            logger.warning("Revoking tasks is not available: %s", unavailable_reason(self.app))
            return True
        revoked = RevokedTasks(
            store,
            limit=self.app.conf.worker_revokes_max,
            lifetime=self.app.conf.worker_revoke_expires,
            on_terminate=self._terminate,
            broadcasts=celery_broadcasts(self.app, self.hostname),
        )
        if not await self._connect("revocation store", store.describe, revoked.start):
            return False
        self._revoked = revoked
        return True

    async def _discard_if_revoked(self, request: Request) -> bool:
        """Drop a revoked task's message: REVOKED stored, ``task_revoked`` sent, message acked.

        A dict lookup when the task is not revoked: no round trip, and no await, so nothing can
        happen between a negative check and the start of the task.
        """
        if self._revoked is None or self._revoked.get(request.id) is None:
            return False
        logger.info("Discarding revoked task: %s", request)
        await self._announce_revoked(request, "revoked", None)
        return True

    def _terminate(self, revocation: Revocation) -> None:
        """``revoke(terminate=True)``: stop the task if it runs here.

        Cancelling its handler stops the run (the event loop cancels an ``async def`` body; the
        pool stops a sync one as far as it can); the handler then stores REVOKED and acks
        (:meth:`_end_terminated`) instead of giving the message back as a cold shutdown would.
        """
        name = revocation.signal or TERM_SIGNAME
        for tag, request in list(self._running_requests.items()):
            handler = self._running.get(tag)
            if request.id != revocation.task_id or handler is None or tag in self._terminating:
                continue
            logger.info("Terminating %s (%s)", request, name)
            self._terminating[tag] = (request, signal_number(name))
            handler.cancel()

    async def _end_terminated(self, request: Request, signum: int) -> None:
        try:
            await self._announce_revoked(request, "terminated", signum)
        except CeleriacError as exc:
            logger.error(
                "Task %s was terminated, but could not be marked REVOKED (%s); its message "
                "will be delivered again and discarded.",
                request,
                exc,
            )

    async def _announce_revoked(self, request: Request, reason: str, signum: int | None) -> None:
        """REVOKED stored (unless results are ignored), the message acked, ``task_revoked`` sent.

        ``reason`` is Celery's: "revoked" for a message dropped before it ran, "expired" for one
        that arrived after its ``expires`` time, "terminated" for a task stopped while it ran.
        """
        assert self.broker is not None
        task = request.task
        if task_revoked.receivers:
            task_revoked.send(
                sender=task,
                request=request.context(),
                terminated=signum is not None,
                signum=signum,
                expired=reason == "expired",
            )
        if not request.ignores_result() or task.resolved_store_errors():
            meta = self._meta(request, states.REVOKED, TaskRevokedError(reason))
            await self._store(meta, _route_of(request))
        # A task that is not acks_late was acked before it started.
        if signum is None or task.resolved_acks_late():
            await self.broker.ack([request.delivery])

    # -- running and finishing ---------------------------------------------------------------------

    async def _execute(
        self, request: Request, group: QueueGroup
    ) -> tuple[dict[str, Any] | None, Delivery | None]:
        """Run the task; the result document to store and the delivery to ack afterwards."""
        assert self.broker is not None and self.pool is not None and self.finisher is not None
        task = request.task
        ignore = request.ignores_result()
        acks_late = task.resolved_acks_late()
        track_started = task.resolved_track_started() and not ignore
        broker = self.broker

        async def before_start() -> None:
            if not acks_late:
                await broker.ack([request.delivery])
            if track_started:
                await self._store(
                    build_meta(
                        request.id, states.STARTED, {"pid": os.getpid(), "hostname": self.hostname}
                    ),
                    _route_of(request),
                )

        first = before_start if not acks_late or track_started else None
        if self.slots.pool_gates_sync and not task.is_async:
            # Queued in the pool: what must happen at the start happens when a thread takes it.
            self._queued_in_pool.add(request.delivery.delivery_tag)
            outcome = await execution.run(
                request,
                self.pool,
                wanted=lambda: self._still_wanted(request),
                before_start=first,
            )
        else:
            if first is not None:
                await first()
            outcome = await execution.run(request, self.pool)
        # The body ended: from now on a revoke has nothing to terminate (its outcome stands).
        self._running_requests.pop(request.delivery.delivery_tag, None)
        self.processed += 1
        group.ran(outcome.runtime)
        if outcome.worker_lost:
            if acks_late and task.resolved_reject_on_worker_lost():
                await self._requeue_lost(request, outcome)
                return None, None
            # Its process died before it could send task_failure: sent here, as Celery does.
            self._send_task_failure(request, outcome.value, outcome.traceback)
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
            await self._send_errbacks(request, outcome.value, outcome.traceback)
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
        if request.message.chain:
            await self._send_next_step(request, value)

    async def _send_next_step(self, request: Request, value: Any) -> None:
        """Continue the message's chain with the result (before it is stored, as Celery does).

        A step that cannot be sent (its arguments do not serialize, bad options, a chord) fails
        the rest of the chain, so its caller learns why. A broker that stays unreachable raises:
        the message is not acked and runs again, as for a retry that cannot be sent.
        """
        message = request.message
        assert message.chain
        try:
            prepared = chains.next_step(
                self.app, message.chain, value, message.id, message.root_id or message.id
            )
            await self.app._publish_many(prepared.outgoings)
        except (ImproperlyConfigured, EncodeError, RoutingError, NotImplementedError) as exc:
            logger.error("Task %s: the next step of its chain cannot be sent: %s", request, exc)
            await self._fail_chain(request, exc, None, failed=False)

    async def _fail_chain(
        self, request: Request, exc: BaseException, traceback: str | None, *, failed: bool
    ) -> None:
        """Store ``exc`` for every task the rest of the chain would have run (Celery's rule):
        whoever waits for the chain's result gets the error instead of waiting for ever.

        When the task itself ``failed``, its own document goes first, in the same write, so that
        a caller woken by the last result already finds the failure where it happened.
        """
        documents: list[tuple[dict[str, Any], ReplyRoute | None]] = []
        if failed and (not request.ignores_result() or request.task.resolved_store_errors()):
            own = self._meta(request, states.FAILURE, exc, traceback)
            documents.append((own, _route_of(request)))
        for task_id, reply_to in chains.waiting_tasks(request.message.chain or ()):
            meta = build_meta(task_id, states.FAILURE, exc, traceback=traceback)
            documents.append((meta, reply_route(reply_to, task_id, task_id)))
        await asyncio.gather(*(self._store(meta, route) for meta, route in documents))

    async def _send_errbacks(
        self, request: Request, exc: BaseException | None = None, traceback: str | None = None
    ) -> None:
        # Errbacks travel the old, wire-portable way: the failed task's id is the first argument.
        if request.message.errbacks:
            await self._send_linked(request.message.errbacks, request.id, request)
        if exc is not None and request.message.chain:
            await self._fail_chain(request, exc, traceback, failed=True)

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
        if self.pool is not None:
            # Jobs queued in the pool have not started: they go back as the waiting ones do.
            withdrawn = [self._running[tag] for tag in self._queued_in_pool if tag in self._running]
            self.pool.withdraw_queued()
            waiting.extend(withdrawn)
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
        if self.finisher is not None:
            # Results being stored and messages being acked: their batches end by themselves
            # (or fail, the messages then staying with the broker).
            await self.finisher.idle()


def _route_of(request: Request) -> ReplyRoute | None:
    """Where the caller of ``request`` waits for its result (rpc://): the message's reply route."""
    message = request.message
    return reply_route(message.reply_to, message.correlation_id, message.id)


logging.getLogger("asyncio").setLevel(logging.WARNING)
# The AMQP transport reports connection losses itself; aiormq's tracebacks would only repeat them.
logging.getLogger("aiormq").setLevel(logging.CRITICAL)
