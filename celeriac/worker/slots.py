"""Concurrency slots and prefetch budgets: how many tasks run at once, and from which queues.

A worker has three kinds of limit (docs/worker.md, "Concurrency"):

* **the pool's** — ``-c`` / ``worker_concurrency``: sync task bodies running at once, on the pool's
  threads or child processes. This is Celery's ``-c``, unchanged.
* **async** — ``--async-concurrency`` / ``worker_async_concurrency``: ``async def`` bodies running
  at once on the event loop. They need no thread or process, so there can be hundreds. The
  default is ``max(-c, 100)``: an all-async app is fast out of the box, and ``-c 500`` (what an
  async app needed before this limit existed) still runs 500. With ``-P solo`` the default is to
  share the pool's single slot, since solo means one task at a time.
* **per queue** — ``-Q cpu:4,io:500``: the tasks of a queue named with ``:N`` run at most N at
  once, sync or async, in slots of their own; the queues without ``:N`` share the two limits
  above. Celery has no equivalent (its issue #1599): there, each limit is a worker of its own.

The queues that share one set of slots form a :class:`QueueGroup`: the queues without ``:N`` are
the default group, each queue with ``:N`` a group of its own. A group has its own prefetch budget
and its own consumer loop (``Worker._consume``), so a group whose slots are all busy and whose
prefetch is full never keeps another from fetching. In the common case, one group, this is exactly
one consumer loop and one budget as before.

**Prefetch.** A group holds at most ``slots * worker_prefetch_multiplier`` messages not finished
yet, counting the slots its tasks use: a queue's own ``N``; in the default group, ``-c`` for sync
tasks and the async limit for ``async def`` tasks. An app without async tasks thus prefetches
``concurrency * multiplier`` exactly as Celery does, and an all-async app never counts pool slots
it does not use. With both kinds, which task comes next is known only once its message is decoded,
so the budget follows what runs (:meth:`QueueGroup.budget`): the pool's share while only sync
tasks run, the async share while only async tasks run, both while both do. A backlog of sync tasks
is then held as Celery holds it, from the first fetch on (a worker starting on a backlog of long
sync tasks does not take the async share of it away from other workers), and a flood of async
tasks is fetched in batches sized for its own limit, whatever the other kind's idle slots: when a
fetch of the pool's share brings async tasks while none runs, the rest of their budget is fetched
before any of them starts (:meth:`QueueGroup.expects_async`). Only on a transport that fixes its
consumers' prefetch by the first fetch (AMQP's ``basic.qos``) does the first fetch ask for the
bigger share (:attr:`QueueGroup.bigger_first`).

**Fetching ahead.** The prefetch is a count, which is what bounds the wait of the messages a
worker holds as long as tasks take a while. For short tasks the count bounds little: eight no-op
tasks are done in well under a millisecond, and a worker that fetches the next eight only once
those are done spends its time waiting for the broker's reply instead of working. So while a
group's queues have a backlog (its last fetch was full) and its tasks are short — their run time
averages at most :data:`AHEAD_HORIZON` per slot's share of the prefetch, and one ended within that
time — the group may hold one more prefetch's worth: the next batch is fetched while the current
one runs. Those messages would all have started within a few milliseconds anyway. As soon as tasks
take longer, or none has ended for that long (every slot busy with a long one), the count is
Celery's again; what was fetched ahead then waits like any prefetched message, at most one
prefetch more than Celery would hold. Off with ``worker_prefetch_ahead = False``. On AMQP, whose
broker pushes deliveries within the consumers' ``basic.qos``, fetching ahead takes more of what
the broker has already pushed to this worker (when ``basic.qos`` is bigger than the budget, as
after a first fetch of an app's async share), and never more than ``basic.qos``.

**Pool size.** The threads pool gets a thread for every sync slot: ``-c`` for the default group
plus each queue's own ``N`` (threads are started only when a sync task needs one, so a queue of
async tasks costs none). A ``prefork`` pool starts its children up front, so it keeps ``-c``
children and every queue's sync tasks share them; ``solo`` keeps its one thread.

**Sync slots on a queueing pool.** The threads and solo pools queue the jobs they cannot start yet
and run them in order as threads come free (:mod:`celeriac.worker.pools`, "Queued jobs"). When
that pool alone keeps sync bodies to ``-c`` — the default group is the only one, and async tasks
have slots of their own — the sync slot no longer waits: it only counts the sync handlers under
way (:attr:`Slots.pool_gates_sync`), and a sync task goes to the pool as soon as it is admitted,
where a thread that finishes one task takes the next without a round trip through the event loop.
Queues with ``:N`` keep real slots: their tasks share the pool's threads, and only a slot of their
own keeps each to its ``N``; so does ``-P solo`` when async tasks share its one slot.

Per message the cost is a lookup of the semaphore for the task's kind and a few integer updates
(:meth:`QueueGroup.fetched`, :meth:`QueueGroup.handed_over`, :meth:`QueueGroup.ended`): no await
and no round trip beyond the semaphore itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celeriac.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from celeriac.app.task import Task

#: Async bodies run at once by default, unless ``-c`` is higher (see the module docstring).
DEFAULT_ASYNC_CONCURRENCY = 100

#: The size of a sync slot that only counts, its pool keeping the limit (never reached: a group
#: holds at most its prefetch).
_COUNT_ONLY = 1 << 30

#: How much work a batch fetched ahead may stand for: the average run time of the group's tasks
#: times the prefetch multiplier (one slot's share of the batch), and how recently a task must have
#: ended (see "Fetching ahead" in the module docstring).
AHEAD_HORIZON = 0.005

#: Weight of the newest run time in the group's moving average of them.
_RUNTIME_WEIGHT = 0.125


def parse_queues(text: str) -> tuple[list[str], dict[str, int]]:
    """``-Q cpu:4,io:500,celery``: the queue names, and the limits of those given one.

    Raises ImproperlyConfigured with one line naming the faulty item: a limit that is not a whole
    number >= 1, a queue without a name, a queue listed twice.
    """
    names: list[str] = []
    limits: dict[str, int] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, colon, given = item.partition(":")
        name, given = name.strip(), given.strip()
        if not name:
            raise ImproperlyConfigured(f"{item!r}: the queue name is missing before ':'")
        if colon:
            limits[name] = _queue_limit(name, given)
        if name in names:
            raise ImproperlyConfigured(f"queue {name!r} is listed twice")
        names.append(name)
    return names, limits


def _queue_limit(name: str, given: str) -> int:
    if not (given.isascii() and given.isdigit()):
        raise ImproperlyConfigured(
            f"{name}:{given}: {given!r} is not a whole number of tasks; write {name}:N with "
            "N >= 1 (a queue name cannot contain ':' here)"
        )
    if int(given) < 1:
        raise ImproperlyConfigured(f"{name}:{given}: a queue runs at least 1 task at once")
    return int(given)


def _check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ImproperlyConfigured(f"{what} must be an integer >= 1, not {value!r}")
    return value


class Slot(asyncio.Semaphore):
    """A semaphore that knows its size, so a group can tell whether any task holds it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size

    def unused(self) -> bool:
        """No task holds a slot (nor waits for one: waiting needs every slot taken)."""
        # asyncio keeps the free count in ``_value`` (declared in typeshed) and offers no
        # public accessor; reading it costs nothing, where counting ourselves would cost an
        # override of acquire() on every task.
        return self._value >= self.size


class QueueGroup:
    """Queues fetched together: their slots, their prefetch budget, their consumer's state.

    The counts are kept by the worker as messages move: :meth:`fetched` when the consumer gets
    them, the semaphore of :meth:`slot` while a task runs, :meth:`handed_over` once its result
    and ack are given to the finisher, :meth:`ended` when its handler ends.
    """

    __slots__ = (
        "_fetched_once",
        "_last_ended",
        "_rotation",
        "adaptive",
        "ahead",
        "async_share",
        "async_slots",
        "backlog",
        "bigger_first",
        "finishing",
        "held",
        "idle",
        "limit",
        "multiplier",
        "name",
        "prefetch",
        "queues",
        "room",
        "runtime",
        "slots",
        "sync_share",
        "sync_slots",
        "waiting",
    )

    def __init__(
        self,
        queues: Sequence[str],
        *,
        limit: int | None,
        multiplier: int,
        sync_slots: Slot,
        async_slots: Slot,
        sync_share: int,
        async_share: int,
    ) -> None:
        self.queues = list(queues)
        #: The queue's own ``:N``; None for the default group.
        self.limit = limit
        self.name = queues[0] if limit is not None else "default"
        self.sync_slots = sync_slots
        self.async_slots = async_slots
        #: Slots of each kind the prefetch covers (0: the app has no task of that kind).
        self.sync_share = sync_share
        self.async_share = async_share
        #: Every slot the group's tasks can use, and the prefetch that covers them all.
        self.slots = sync_share + async_share
        self.multiplier = multiplier
        self.prefetch = self.slots * multiplier
        #: Whether the budget follows the kinds of task running (see :meth:`budget`).
        self.adaptive = sync_share > 0 and async_share > 0 and sync_slots is not async_slots
        #: Messages fetched and not ended yet (waiting, running or being finished).
        self.held = 0
        #: Of those, the ones handed to the finisher: done, their ack on its way.
        self.finishing = 0
        #: Of those, the ones not started yet (waiting for a slot, a rate limit, ...).
        self.waiting = 0
        #: Whether the last fetch got all it asked for: the queues have more.
        self.backlog = False
        self._fetched_once = False
        #: Whether the first fetch asks for the bigger share (see :meth:`budget`): set by the
        #: worker for a transport that fixes its consumers' prefetch by the first fetch.
        self.bigger_first = False
        #: Whether the group may fetch ahead while its tasks are short (see "Fetching ahead" in the
        #: module docstring): set by the worker from ``worker_prefetch_ahead``.
        self.ahead = False
        #: Moving average of the run times of the group's tasks (None until one has ended), and
        #: when the last one ended (``time.monotonic()``).
        self.runtime: float | None = None
        self._last_ended = 0.0
        #: Set when room may have been freed (or to wake the consumer, e.g. to stop).
        self.room = asyncio.Event()
        #: Set while the group's consumer waits for room, so no fetch of its is under way.
        self.idle = asyncio.Event()
        self._rotation = 0

    def slot(self, is_async: bool) -> Slot:
        """The semaphore a task of this kind runs under (a queue's own limit covers both)."""
        slot = self.async_slots if is_async else self.sync_slots
        if self.adaptive and slot.unused():
            # The first task of its kind: the budget grows (see budget()); the consumer, which
            # may be waiting for room, looks again once this task holds its slot.
            self.room.set()
        return slot

    def budget(self, assume_async: bool = False) -> int:
        """The slots the prefetch covers now (``assume_async``: as if an async task ran).

        All of them, except in the default group of an app with both kinds of task: there, the
        pool's slots while sync tasks run, the async slots while ``async def`` tasks run, both
        while both run, and the pool's alone while nothing runs. So sync traffic is prefetched as
        Celery does (``concurrency * multiplier``) and async traffic by its own limit, however
        many slots of the other kind sit idle; a queue that mixes both gets both budgets while
        both run.

        The first fetch asks for the pool's share like any fetch while nothing runs, unless
        :attr:`bigger_first`: then for the bigger of the two shares, as if that kind ran, because
        the transport sizes its consumers by it (AMQP's ``basic.qos``, see
        :mod:`celeriac.brokers.amqp`) and the async share would never be fetched otherwise.
        """
        if not self.adaptive:
            return self.slots
        if self.bigger_first and not self._fetched_once:
            return max(self.sync_share, self.async_share)
        if self.async_slots.unused() and not assume_async:
            return self.sync_share
        if self.sync_slots.unused():
            return self.async_share
        return self.slots

    def room_to_fetch(self, assume_async: bool = False) -> int:
        """How many messages to fetch now; 0 to wait for more room (``assume_async``: see
        :meth:`budget`).

        The prefetch (:meth:`budget` x ``worker_prefetch_multiplier``) counts the messages of
        tasks not finished yet: waiting for a slot or running. A task that is done, whose result
        is being stored and whose message is being acked in the finisher's next batch, is not
        counted (up to another prefetch of them), so the next messages are fetched while the
        last ones are finished; Celery, which acks a finished task at once, does not count it
        either. And while the queues have a backlog (the last fetch was full) and a slot's worth
        of messages waits, the fetch waits until half the prefetch is free: fewer, bigger fetches.
        While tasks are short, one more prefetch's worth may be held (see "Fetching ahead" in the
        module docstring).
        """
        slots = self.budget(assume_async)
        prefetch = slots * self.multiplier
        room = prefetch - self.held + min(self.finishing, prefetch)
        if self.backlog and not assume_async and self._short_tasks():
            room += prefetch  # one batch ahead (see "Fetching ahead" in the module docstring)
        if self.backlog and room < max(prefetch // 2, 1) and self.waiting >= slots:
            return 0
        return room

    def ran(self, runtime: float) -> None:
        """A task of the group ended after running ``runtime`` seconds."""
        average = self.runtime
        self.runtime = (
            runtime if average is None else average + (runtime - average) * _RUNTIME_WEIGHT
        )
        self._last_ended = time.monotonic()

    def _short_tasks(self) -> bool:
        """Whether the group may fetch ahead now: on, its tasks short, and one ended lately."""
        average = self.runtime
        return (
            self.ahead
            and average is not None
            and average * self.multiplier <= AHEAD_HORIZON
            and time.monotonic() - self._last_ended <= AHEAD_HORIZON
        )

    def fetch_order(self) -> list[str]:
        """The group's queues, rotated by one at each fetch so a busy first queue cannot starve
        the others."""
        queues = self.queues
        if len(queues) == 1:
            return queues
        start = self._rotation
        self._rotation = (start + 1) % len(queues)
        return queues[start:] + queues[:start]

    def fetched(self, count: int, asked: int) -> None:
        """``count`` messages were fetched, of ``asked``."""
        self.held += count
        self.waiting += count
        self.backlog = count >= asked
        self._fetched_once = True

    def expects_async(self, deliveries: Iterable[Any], is_async: Callable[[Any], bool]) -> bool:
        """Whether ``deliveries``, just fetched while no async task runs, hold one: then the
        consumer fetches at once what :meth:`room_to_fetch` gives with ``assume_async``.

        So a flood of async tasks that starts with a fetch of the pool's share is fetched whole
        before any of it starts, rather than its first few ahead of the rest.
        """
        if not self.adaptive or not self.async_slots.unused():
            return False
        return any(map(is_async, deliveries))

    def handed_over(self) -> None:
        """A task's result and ack went to the finisher: its room can be fetched for again."""
        self.finishing += 1
        self.room.set()

    def ended(self, handed_over: bool) -> None:
        """A message's handler ended (finished, refused, deferred, given back...)."""
        self.held -= 1
        if handed_over:
            self.finishing -= 1
        self.room.set()


class Slots:
    """Every :class:`QueueGroup` of a worker, built from its options (see the module docstring)."""

    def __init__(
        self,
        queues: Sequence[str],
        *,
        concurrency: int,
        pool: str,
        multiplier: int,
        tasks: Iterable[Task[..., Any]],
        async_concurrency: int | None = None,
        queue_concurrency: Mapping[str, int] | None = None,
        pool_queues_jobs: bool = False,
    ) -> None:
        """``pool_queues_jobs``: the pool queues the jobs it cannot start yet (threads, solo)."""
        self.concurrency = _check_count(concurrency, "concurrency")
        self.pool = pool
        multiplier = _check_count(multiplier, "prefetch_multiplier")
        own = self._check_queues(queues, queue_concurrency or {})
        kinds = {task.is_async for task in tasks}
        has_async = True in kinds
        has_sync = False in kinds or not kinds
        #: Whether async bodies share the pool's slots (solo without an async limit given).
        self.shared = pool == "solo" and async_concurrency is None
        #: Whether the pool alone keeps sync bodies to ``-c``, the sync slot only counting (see
        #: "Sync slots on a queueing pool" in the module docstring).
        self.pool_gates_sync = pool_queues_jobs and not self.shared and not own
        sync_slots = Slot(_COUNT_ONLY if self.pool_gates_sync else concurrency)
        if self.shared:
            self.async_concurrency = concurrency
            async_slots = sync_slots
        else:
            if async_concurrency is None:
                async_concurrency = max(concurrency, DEFAULT_ASYNC_CONCURRENCY)
            self.async_concurrency = _check_count(async_concurrency, "async_concurrency")
            async_slots = Slot(self.async_concurrency)
        self.groups: list[QueueGroup] = []
        shared_queues = [queue for queue in queues if queue not in own]
        if shared_queues:
            self.groups.append(
                QueueGroup(
                    shared_queues,
                    limit=None,
                    multiplier=multiplier,
                    sync_slots=sync_slots,
                    async_slots=async_slots,
                    sync_share=concurrency if has_sync or self.shared else 0,
                    async_share=self.async_concurrency if has_async and not self.shared else 0,
                )
            )
        for queue, limit in own.items():
            slot = Slot(limit)
            self.groups.append(
                QueueGroup(
                    [queue],
                    limit=limit,
                    multiplier=multiplier,
                    sync_slots=slot,
                    async_slots=slot,
                    sync_share=limit,
                    async_share=0,
                )
            )
        self._by_queue = {queue: group for group in self.groups for queue in group.queues}
        #: Messages held at most, over every group (what the rate limits size their share on).
        self.prefetch = sum(group.prefetch for group in self.groups)
        #: Sync bodies the pool must run at once (see the module docstring, "Pool size").
        self.pool_size = concurrency
        if pool == "threads":
            default = concurrency if shared_queues else 0
            self.pool_size = default + sum(own.values())

    @staticmethod
    def _check_queues(queues: Sequence[str], limits: Mapping[str, int]) -> dict[str, int]:
        if not queues:
            raise ImproperlyConfigured("a worker needs at least one queue to consume")
        seen: set[str] = set()
        for queue in queues:
            if queue in seen:
                raise ImproperlyConfigured(f"queue {queue!r} is listed twice")
            seen.add(queue)
        own: dict[str, int] = {}
        for queue, limit in limits.items():
            if queue not in seen:
                raise ImproperlyConfigured(
                    f"queue_concurrency names queue {queue!r}, which this worker does not consume "
                    f"(its queues: {', '.join(queues)})"
                )
            own[queue] = _check_count(limit, f"the concurrency of queue {queue!r}")
        # In the order of the queues, so the groups (and the log lines) follow the command line.
        return {queue: own[queue] for queue in queues if queue in own}

    def group_of(self, queue: str) -> QueueGroup:
        """The group consuming ``queue``; the default group (else the first) for any other."""
        group = self._by_queue.get(queue)
        if group is not None:
            return group
        return self.groups[0]

    def wake(self) -> None:
        """Wake every consumer loop (to stop, or to fetch again)."""
        for group in self.groups:
            group.room.set()

    def fetching(self) -> QueueGroup | None:
        """A group whose consumer may be fetching now (not waiting for room), if any."""
        for group in self.groups:
            if not group.idle.is_set():
                return group
        return None

    def by_size(self) -> list[QueueGroup]:
        """The groups, biggest first fetch first: the order their consumers start in, so that a
        transport that sizes its consumers by the first fetch (AMQP's ``basic.qos``) sizes them
        for the group that needs the most."""
        return sorted(self.groups, key=lambda group: group.room_to_fetch(), reverse=True)

    def describe(self) -> list[str]:
        """What limits apply, one line for the default group and one per queue with its own."""
        lines: list[str] = []
        for group in self.groups:
            names = ", ".join(group.queues)
            if group.limit is None:
                if self.shared:
                    what = f"{self.concurrency} task(s) at once, sync or async ({self.pool} pool)"
                else:
                    what = (
                        f"{self.concurrency} sync task(s) at once ({self.pool} pool), "
                        f"{self.async_concurrency} async def task(s) at once (event loop)"
                    )
                lines.append(f"Concurrency of {names}: {what}; {_prefetch(group)}.")
            else:
                shared_pool = ""
                if self.pool != "threads":
                    unit = "process(es)" if self.pool == "prefork" else "thread"
                    shared_pool = (
                        f"; its sync tasks run on the {self.pool} pool's {self.concurrency} "
                        f"{unit}, shared by every queue"
                    )
                lines.append(
                    f"Concurrency of queue {names}: {group.limit} task(s) at once, sync or async, "
                    f"in its own slots{shared_pool}; prefetch {group.prefetch}."
                )
        if self.pool == "threads" and self.pool_size != self.concurrency:
            lines.append(
                f"Pool: up to {self.pool_size} threads for sync tasks (a thread for every sync "
                "slot, started when needed)."
            )
        return lines


def _prefetch(group: QueueGroup) -> str:
    if group.adaptive:
        return (
            f"prefetch {group.sync_share * group.multiplier} while only sync tasks run, "
            f"{group.async_share * group.multiplier} while only async def tasks run, "
            f"{group.prefetch} while both do"
        )
    return f"prefetch {group.prefetch}"
