"""Storage layout of the SQLite transport: the file format :data:`BROKER_FILE`.

The database file is marked as a celeriac broker (``PRAGMA application_id``) and carries its schema
version (``PRAGMA user_version``): a file that belongs to something else, or that a newer celeriac
wrote, is refused with a clear error instead of being altered (see :mod:`celeriac.utils.sqlite`,
which opens the file). Every table and column is documented
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

from celeriac.utils.sqlite import FileFormat

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


#: What :class:`celeriac.utils.sqlite.ConnectionThread` needs to open, claim and check the file.
BROKER_FILE = FileFormat(
    role="broker",
    application_id=APPLICATION_ID,
    schema_version=SCHEMA_VERSION,
    schema=TABLES,
    min_sqlite_version=MIN_SQLITE_VERSION,
    needs="UPDATE … RETURNING",
    options_setting="broker_transport_options",
)
