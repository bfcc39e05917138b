"""Storage layout of the SQLite transport, and opening a database file with it.

The database file is marked as a celeriac broker (``PRAGMA application_id``) and carries its schema
version (``PRAGMA user_version``): a file that belongs to something else, or that a newer celeriac
wrote, is refused with a clear error instead of being altered. Every table and column is documented
in the ``CREATE`` statements below; SQLite keeps those comments, so ``.schema`` in the ``sqlite3``
shell shows the documentation next to the data.

A message is in one of two lanes (``messages.ready``):

* ready (1): deliverable now. The partial index ``messages_ready`` lists them per queue by
  ``priority DESC, id``, so a fetch reads exactly the rows it leases, however many messages are
  delayed or leased.
* waiting (0): delayed until ``visible_at``, or leased until ``visible_at``. The partial index
  ``messages_waiting`` lists them per queue by ``visible_at``. Every fetch first moves the due ones
  to the ready lane in the same transaction: that is how delayed messages become ready and how an
  expired lease (a dead worker) is redelivered — no reaper process is needed.

Life of a message: publish (INSERT, ready or waiting) → fetch (waiting, ``lease_token`` set,
``visible_at`` = lease end, ``delivery_count`` + 1) → ack (DELETE), or renew (later ``visible_at``),
or reject with requeue (ready, token cleared), or reject without requeue (moved to
``dead_letters``), or defer (waiting until the given time, token cleared).
"""

from __future__ import annotations

import os
import sqlite3

from celeriac.exceptions import ImproperlyConfigured

#: Bumped whenever the layout changes; a database with a higher version is refused.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of a celeriac broker database: "celb" in ASCII.
APPLICATION_ID = 0x63656C62
#: ``UPDATE … RETURNING`` (the atomic fetch) arrived in SQLite 3.35.
MIN_SQLITE_VERSION = (3, 35, 0)

TABLES = (
    """
    CREATE TABLE messages (
        id               INTEGER PRIMARY KEY, -- rowid; FIFO order within a priority. An acked
                                              -- message's id may be reused (max + 1), which is
                                              -- harmless: a lease is the pair (id, lease_token).
        queue            TEXT    NOT NULL,    -- queue name
        priority         INTEGER NOT NULL,    -- 0..255, capped by queues.max_priority; high first
        ready            INTEGER NOT NULL,    -- 1: deliverable now; 0: waiting until visible_at
        visible_at       REAL    NOT NULL,    -- UNIX time: when a waiting message becomes ready
                                              -- (ETA, or lease end); for ready ones when they did
        lease_token      TEXT,                -- token of the latest delivery; NULL when not leased.
                                              -- Kept after the lease expires until the message is
                                              -- delivered again, so a slow worker can still ack it
        delivery_count   INTEGER NOT NULL,    -- deliveries so far (0 = never delivered)
        exchange         TEXT    NOT NULL,    -- exchange it was published to ('' = default)
        routing_key      TEXT    NOT NULL,    -- routing key it was published with
        body             BLOB    NOT NULL,    -- the opaque, already encoded payload
        content_type     TEXT    NOT NULL,    -- e.g. application/json
        content_encoding TEXT    NOT NULL,    -- e.g. utf-8, binary
        headers          TEXT    NOT NULL,    -- JSON object: message headers
        properties       TEXT    NOT NULL,    -- JSON object: AMQP-style properties
        published_at     REAL    NOT NULL     -- UNIX time of the publish
    )
    """,
    # Ready messages of a queue, best first: what a fetch leases.
    """
    CREATE INDEX messages_ready ON messages (queue, priority DESC, id) WHERE ready = 1
    """,
    # Waiting messages of a queue, soonest first: what a fetch promotes, and the next due time.
    """
    CREATE INDEX messages_waiting ON messages (queue, visible_at) WHERE ready = 0
    """,
    """
    CREATE TABLE queues (
        name             TEXT    PRIMARY KEY, -- a declared queue
        max_priority     INTEGER,             -- cap on message priority (AMQP x-max-priority)
        declared_at      REAL    NOT NULL     -- UNIX time of the latest declaration
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE exchanges (
        name             TEXT    PRIMARY KEY, -- a named exchange ('' is implicit, never stored)
        type             TEXT    NOT NULL     -- direct | fanout | topic
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE bindings (
        exchange         TEXT    NOT NULL,    -- exchanges.name
        routing_key      TEXT    NOT NULL,    -- binding key (a pattern for topic exchanges)
        queue            TEXT    NOT NULL,    -- queue that receives the matching messages
        PRIMARY KEY (exchange, routing_key, queue)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE dead_letters (
        id               INTEGER PRIMARY KEY, -- newest has the highest id
        queue            TEXT    NOT NULL,    -- queue the message was rejected from
        reason           TEXT    NOT NULL,    -- why (given to reject)
        dead_lettered_at REAL    NOT NULL,    -- UNIX time of the reject
        delivery_count   INTEGER NOT NULL,    -- deliveries it had
        exchange         TEXT    NOT NULL,    -- the message, copied from its messages row:
        routing_key      TEXT    NOT NULL,    --   routing key it was published with
        body             BLOB    NOT NULL,    --   encoded payload
        content_type     TEXT    NOT NULL,    --   e.g. application/json
        content_encoding TEXT    NOT NULL,    --   e.g. utf-8
        headers          TEXT    NOT NULL,    --   JSON object
        properties       TEXT    NOT NULL,    --   JSON object
        published_at     REAL    NOT NULL     --   UNIX time of the original publish
    )
    """,
)


def open_database(path: str, *, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    """Open ``path`` as a broker database, creating the schema in a new file.

    Raises ImproperlyConfigured for a file that is not (or not yet) usable by this version, and
    lets ``sqlite3.Error`` through for the caller to translate.
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise ImproperlyConfigured(
            f"the SQLite broker needs SQLite {'.'.join(map(str, MIN_SQLITE_VERSION))} or newer "
            f"(for UPDATE … RETURNING); this Python links SQLite {sqlite3.sqlite_version}"
        )
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ImproperlyConfigured(
            f"SQLite broker database {path}: directory {directory} does not exist "
            "(celeriac does not create it)"
        )
    # isolation_level=None: no implicit transactions; writes use explicit BEGIN IMMEDIATE.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ImproperlyConfigured(
                f"SQLite broker database {path}: could not switch to WAL mode (got {mode!r}); "
                "is it on a network file system?"
            )
        conn.execute(f"PRAGMA synchronous={synchronous}")
        _ensure_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    # IMMEDIATE: processes starting together create the schema once; the others wait, then check.
    conn.execute("BEGIN IMMEDIATE")
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if application_id == 0 and version == 0:
            tables = [
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
            if tables:
                raise ImproperlyConfigured(
                    f"{path} is not a celeriac broker database (it holds tables {tables}); "
                    "give the broker a file of its own"
                )
            for statement in TABLES:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif application_id != APPLICATION_ID:
            raise ImproperlyConfigured(
                f"{path} is not a celeriac broker database (application_id {application_id:#x}); "
                "give the broker a file of its own"
            )
        elif version > SCHEMA_VERSION:
            raise ImproperlyConfigured(
                f"{path} has broker schema version {version}, written by a newer celeriac; "
                f"this version understands {SCHEMA_VERSION} — upgrade celeriac"
            )
        elif version < SCHEMA_VERSION:
            raise ImproperlyConfigured(
                f"{path} has unknown broker schema version {version} (expected {SCHEMA_VERSION})"
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
