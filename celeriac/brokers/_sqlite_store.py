"""The SQL of the SQLite transport: every broker operation on one blocking connection.

A :class:`SQLiteStore` wraps one ``sqlite3`` connection and is used from one thread only (the
broker's dedicated connection thread). Every write is one ``BEGIN IMMEDIATE`` transaction, so writers
of all processes take the database's write lock up front and queue behind ``busy_timeout`` instead
of failing on a lock upgrade. The layout and the two-lane model (ready / waiting) are described in
:mod:`celeriac.brokers._sqlite_schema`.

Errors: ``sqlite3.Error`` propagates to the broker, which translates it; RoutingError and
ImproperlyConfigured are raised here for bad routes and declarations.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from celeriac.brokers import _routing
from celeriac.brokers._common import Outgoing, decode_message, delivery_tag
from celeriac.brokers.base import DeadLetter, Delivery, QueueSpec
from celeriac.exceptions import ImproperlyConfigured, RoutingError
from celeriac.utils.sqlite import immediate_transaction

Lease = tuple[int, str]

_INSERT = """
INSERT INTO messages (queue, priority, ready, visible_at, lease_token, delivery_count, exchange,
                      routing_key, body, content_type, content_encoding, headers, properties,
                      published_at)
VALUES (?1, MIN(?2, COALESCE((SELECT max_priority FROM queues WHERE name = ?1), 255)), ?3, ?4,
        NULL, 0, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
"""

# Per queue: is anything ready, and when does the first waiting message (delayed or leased) become
# ready. Both are seeks in the partial indexes; no lock is taken.
_PEEK = """
SELECT EXISTS (SELECT 1 FROM messages WHERE ready = 1 AND queue = ?1),
       (SELECT MIN(visible_at) FROM messages WHERE ready = 0 AND queue = ?1)
"""

_PROMOTE = "UPDATE messages SET ready = 1 WHERE ready = 0 AND queue = ? AND visible_at <= ?"

_RETURNED = (
    "id, queue, priority, exchange, routing_key, body, content_type, content_encoding, headers, "
    "properties, delivery_count"
)

_ACK = "DELETE FROM messages WHERE id = ? AND lease_token = ?"

_RENEW = "UPDATE messages SET ready = 0, visible_at = ? WHERE id = ? AND lease_token = ?"

_HAND_BACK = """
UPDATE messages SET ready = ?, visible_at = ?, lease_token = NULL,
                    delivery_count = delivery_count - ?
WHERE id = ? AND lease_token = ?
RETURNING queue
"""

_DEAD_LETTER = """
INSERT INTO dead_letters (queue, reason, dead_lettered_at, delivery_count, exchange, routing_key,
                          body, content_type, content_encoding, headers, properties, published_at)
SELECT queue, ?, ?, delivery_count, exchange, routing_key, body, content_type, content_encoding,
       headers, properties, published_at
FROM messages WHERE id = ? AND lease_token = ?
"""

# "Waiting" in the sense of purge and size: not under a live lease.
_PURGE_READY = "DELETE FROM messages WHERE ready = 1 AND queue = ?"
_PURGE_WAITING = """
DELETE FROM messages
WHERE ready = 0 AND queue = ? AND (lease_token IS NULL OR visible_at <= ?)
"""
_SIZE = """
SELECT (SELECT COUNT(*) FROM messages WHERE ready = 1 AND queue = ?1)
     + (SELECT COUNT(*) FROM messages
        WHERE ready = 0 AND queue = ?1 AND (lease_token IS NULL OR visible_at <= ?2))
"""


@functools.lru_cache(maxsize=32)
def _claim_sql(queue_count: int) -> str:
    """The atomic fetch: lease the best ``limit`` ready messages of ``queue_count`` queues.

    Each queue contributes its own best ``limit`` rows through its index (no sort of a backlog);
    the union is then ordered by priority, position of the queue in the fetch, and age.
    Parameters: token, lease end, then (queue, limit) per queue, then limit.
    """
    per_queue = " UNION ALL ".join(
        f"SELECT * FROM (SELECT id, priority, {position} AS position FROM messages "
        "WHERE ready = 1 AND queue = ? ORDER BY priority DESC, id LIMIT ?)"
        for position in range(queue_count)
    )
    return (
        "UPDATE messages SET ready = 0, lease_token = ?, visible_at = ?, "
        "delivery_count = delivery_count + 1 "
        f"WHERE id IN (SELECT id FROM ({per_queue}) ORDER BY priority DESC, position, id LIMIT ?) "
        f"RETURNING {_RETURNED}"
    )


class SQLiteStore:
    """Broker operations on one connection; call from a single thread.

    The connection is opened, claimed and closed by the broker's
    :class:`~celeriac.utils.sqlite.ConnectionThread`; this class only holds the SQL.
    """

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self.conn)

    # -- declarations -------------------------------------------------------------------------

    def declare(self, spec: QueueSpec) -> None:
        if self._declared(spec):
            return
        with self._write() as conn:
            if spec.exchange:
                row = conn.execute(
                    "SELECT type FROM exchanges WHERE name = ?", (spec.exchange,)
                ).fetchone()
                if row is not None and row[0] != spec.exchange_type:
                    raise ImproperlyConfigured(
                        f"exchange {spec.exchange!r} is already declared as {row[0]!r}, "
                        f"not {spec.exchange_type!r}"
                    )
                conn.execute(
                    "INSERT OR IGNORE INTO exchanges (name, type) VALUES (?, ?)",
                    (spec.exchange, spec.exchange_type),
                )
                conn.execute(
                    "INSERT OR IGNORE INTO bindings (exchange, routing_key, queue) "
                    "VALUES (?, ?, ?)",
                    (spec.exchange, spec.routing_key, spec.name),
                )
            conn.execute(
                "INSERT INTO queues (name, max_priority, declared_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET max_priority = excluded.max_priority",
                (spec.name, spec.max_priority, time.time()),
            )

    def _declared(self, spec: QueueSpec) -> bool:
        """Whether the declaration is already in place exactly (then nothing is written)."""
        conn = self.conn
        row = conn.execute(
            "SELECT max_priority FROM queues WHERE name = ?", (spec.name,)
        ).fetchone()
        if row is None or row[0] != spec.max_priority:
            return False
        if not spec.exchange:
            return True
        return (
            conn.execute(
                "SELECT 1 FROM exchanges JOIN bindings ON bindings.exchange = exchanges.name "
                "WHERE name = ? AND type = ? AND routing_key = ? AND queue = ?",
                (spec.exchange, spec.exchange_type, spec.routing_key, spec.name),
            ).fetchone()
            is not None
        )

    def _targets(
        self, exchange: str, routing_key: str, known: dict[str, tuple[str, list[tuple[str, str]]]]
    ) -> list[str]:
        if exchange == "":
            return [_routing.default_exchange_queue(routing_key)]
        found = known.get(exchange)
        if found is None:
            row = self.conn.execute(
                "SELECT type FROM exchanges WHERE name = ?", (exchange,)
            ).fetchone()
            if row is None:
                raise RoutingError(
                    f"exchange {exchange!r} is not declared; declare a queue bound to it"
                )
            bindings = self.conn.execute(
                "SELECT routing_key, queue FROM bindings WHERE exchange = ?", (exchange,)
            ).fetchall()
            found = known[exchange] = (row[0], bindings)
        return _routing.route(exchange, found[0], found[1], routing_key)

    # -- publish and fetch --------------------------------------------------------------------

    def publish(self, batch: Sequence[Outgoing]) -> set[str]:
        """Store every message of ``batch`` in one transaction; return the queues that got one."""
        touched: set[str] = set()
        with self._write() as conn:
            now = time.time()
            routes: dict[str, tuple[str, list[tuple[str, str]]]] = {}
            rows = []
            for out in batch:
                visible_at = now if out.not_before is None else out.not_before
                ready = 1 if visible_at <= now else 0
                for queue in self._targets(out.exchange, out.routing_key, routes):
                    touched.add(queue)
                    rows.append(
                        (
                            queue,
                            out.priority,
                            ready,
                            visible_at,
                            out.exchange,
                            out.routing_key,
                            out.body,
                            out.content_type,
                            out.content_encoding,
                            out.headers,
                            out.properties,
                            now,
                        )
                    )
            conn.executemany(_INSERT, rows)
        return touched

    def claim(
        self, queues: Sequence[str], limit: int, token: str, lease_for: float
    ) -> tuple[list[Delivery], float | None]:
        """Lease up to ``limit`` messages; with none, also say when the next one is due.

        A read-only peek comes first so that idle polling never takes the write lock.
        """
        now = time.time()
        anything_ready = False
        due: list[float] = []
        for queue in queues:
            has_ready, next_due = self.conn.execute(_PEEK, (queue,)).fetchone()
            anything_ready = anything_ready or bool(has_ready)
            if next_due is not None:
                due.append(next_due)
        next_due = min(due, default=None)
        if not anything_ready and (next_due is None or next_due > now):
            return [], next_due
        params: list[object] = [token, 0.0]
        for queue in queues:
            params += [queue, limit]
        params.append(limit)
        with self._write() as conn:
            now = time.time()
            params[1] = now + lease_for
            conn.executemany(_PROMOTE, [(queue, now) for queue in queues])
            rows = conn.execute(_claim_sql(len(queues)), params).fetchall()
        position = {queue: index for index, queue in enumerate(queues)}
        rows.sort(key=lambda r: (-r[2], position[r[1]], r[0]))
        return [_delivery(row, token) for row in rows], None

    # -- settling deliveries ------------------------------------------------------------------

    def ack(self, leases: Sequence[Lease]) -> None:
        with self._write() as conn:
            conn.executemany(_ACK, leases)

    def renew(self, leases: Sequence[Lease], lease_for: float) -> None:
        with self._write() as conn:
            until = time.time() + lease_for
            conn.executemany(_RENEW, [(until, message_id, token) for message_id, token in leases])

    def hand_back(
        self, leases: Iterable[Lease], visible_at: float | None, *, counted: bool
    ) -> set[str]:
        """Clear leases; ready at ``visible_at`` (None: now). Uncounted deliveries are undone."""
        touched: set[str] = set()
        with self._write() as conn:
            now = time.time()
            when = now if visible_at is None else visible_at
            ready = 1 if when <= now else 0
            undo = 0 if counted else 1
            for message_id, token in leases:
                row = conn.execute(_HAND_BACK, (ready, when, undo, message_id, token)).fetchone()
                if row is not None:
                    touched.add(row[0])
        return touched

    def dead_letter(self, lease: Lease, reason: str) -> None:
        with self._write() as conn:
            conn.execute(_DEAD_LETTER, (reason, time.time(), *lease))
            conn.execute(_ACK, lease)

    # -- inspection ---------------------------------------------------------------------------

    def purge(self, queue: str) -> int:
        with self._write() as conn:
            now = time.time()
            deleted = conn.execute(_PURGE_READY, (queue,)).rowcount
            deleted += conn.execute(_PURGE_WAITING, (queue, now)).rowcount
        return deleted

    def size(self, queue: str) -> int:
        count: int = self.conn.execute(_SIZE, (queue, time.time())).fetchone()[0]
        return count

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        rows = self.conn.execute(
            "SELECT queue, reason, dead_lettered_at, body, content_type, content_encoding, "
            "headers, properties FROM dead_letters ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            DeadLetter(
                queue=queue,
                message=decode_message(body, content_type, encoding, headers, properties),
                reason=reason,
                dead_lettered_at=at,
            )
            for queue, reason, at, body, content_type, encoding, headers, properties in rows
        ]


def _delivery(row: Any, token: str) -> Delivery:
    message_id, queue, _, exchange, routing_key, body, content_type, encoding, headers, props, n = (
        row
    )
    return Delivery(
        message=decode_message(body, content_type, encoding, headers, props),
        queue=queue,
        delivery_tag=delivery_tag(message_id, token),
        exchange=exchange,
        routing_key=routing_key,
        redelivered=n > 1,
        delivery_count=n,
        handle=(message_id, token),
    )
