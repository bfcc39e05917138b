"""Opening a celeriac SQLite file, transactions on it, and what its driver errors mean.

Several processes open the same file at once (workers starting together, clients), so every step
here is safe to race: the schema is created under the write lock, and the switch to WAL is retried
while another process holds the file.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

from celeriac.exceptions import CeleriacError, ConnectionError, ImproperlyConfigured
from celeriac.utils.sqlite.config import FileFormat, Settings

#: Longest pause between two attempts to switch a file to WAL.
_MAX_WAL_PAUSE = 0.05

#: Page cache per connection, in KiB. SQLite's default (2 MiB) fills as a worker runs and shows up
#: as resident memory that grows for the first hundred thousand tasks; the queue and result tables
#: are hot at their ends only, so a quarter of it costs no measurable speed (drain 3,500 tasks/s
#: either way) and keeps the worker's memory flat (+5 % after 100,000 tasks instead of +16 %).
PAGE_CACHE_KIB = 512


def open_file(path: str, fmt: FileFormat, settings: Settings) -> sqlite3.Connection:
    """Open ``path`` as a file of ``fmt``, creating the schema in a new file.

    Raises ImproperlyConfigured for a file this version cannot use (someone else's, a newer
    schema, a missing directory, an old SQLite library); lets ``sqlite3.Error`` through for the
    caller to translate with :func:`translate_error`. The connection has no implicit
    transactions: a write is one statement, or :func:`immediate_transaction`.
    """
    if sqlite3.sqlite_version_info < fmt.min_sqlite_version:
        raise ImproperlyConfigured(
            f"the {fmt.label} needs SQLite {'.'.join(map(str, fmt.min_sqlite_version))} or newer "
            f"(for {fmt.needs}); this Python links SQLite {sqlite3.sqlite_version}"
        )
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise ImproperlyConfigured(
            f"{fmt.label} {path}: directory {directory} does not exist (celeriac does not create it)"
        )
    conn = sqlite3.connect(path, timeout=settings.busy_timeout, isolation_level=None)
    try:
        # Claim first: a file that is not ours is refused before anything changes it (the journal
        # mode is a setting of the file).
        _claim(conn, path, fmt)
        _enable_wal(conn, path, fmt, settings.busy_timeout)
        conn.execute(f"PRAGMA synchronous = {settings.synchronous}")
        conn.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception.

    IMMEDIATE takes the write lock up front, so writers of all processes queue behind
    ``busy_timeout`` instead of failing when a read transaction would have to be upgraded.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so itself.

    SQLite ends some failed transactions by itself (e.g. on SQLITE_FULL); a second ROLLBACK would
    then fail and hide the original error.
    """
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def translate_error(
    exc: sqlite3.Error,
    fmt: FileFormat,
    path: str,
    busy_timeout: float,
    error: type[CeleriacError] = ConnectionError,
) -> CeleriacError:
    """The celeriac error (``error``) for a driver error, naming the file and, for a lock, why."""
    if _is_busy(exc):
        return error(
            f"{fmt.label} {path}: the database stayed locked for longer than "
            f"busy_timeout={busy_timeout:g}s (is a process holding a long write transaction?): "
            f"{exc}"
        )
    return error(f"{fmt.label} {path}: {type(exc).__name__}: {exc}")


def _is_busy(exc: sqlite3.Error) -> bool:
    name: str = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


def _claim(conn: sqlite3.Connection, path: str, fmt: FileFormat) -> None:
    """Create the schema in an empty file; refuse a file of anything else or of a newer schema."""
    # IMMEDIATE: processes starting together on a new file create the schema once; the others wait
    # for the lock, then find it made.
    with immediate_transaction(conn):
        (application_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if application_id == 0 and version == 0:
            tables = [
                name
                for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            if tables:
                raise ImproperlyConfigured(
                    f"{path} is not a celeriac {fmt.role} database (it holds tables {tables}); "
                    f"give the {fmt.role} a file of its own"
                )
            for statement in fmt.schema:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {fmt.application_id}")
            conn.execute(f"PRAGMA user_version = {fmt.schema_version}")
        elif application_id != fmt.application_id:
            raise ImproperlyConfigured(
                f"{path} is not a celeriac {fmt.role} database (application_id "
                f"{application_id:#x}; each celeriac store marks its files); give the {fmt.role} "
                "a file of its own"
            )
        elif version > fmt.schema_version:
            raise ImproperlyConfigured(
                f"{path} has {fmt.role} schema version {version}, written by a newer celeriac; "
                f"this version understands {fmt.schema_version} — upgrade celeriac"
            )
        elif version < fmt.schema_version:
            raise ImproperlyConfigured(
                f"{path} has unknown {fmt.role} schema version {version} "
                f"(expected {fmt.schema_version})"
            )


def _enable_wal(conn: sqlite3.Connection, path: str, fmt: FileFormat, busy_timeout: float) -> None:
    """Switch the file to WAL (a persistent setting), waiting out concurrent first connects.

    WAL lets readers run beside the writer. Changing the journal mode needs the file to itself, and
    SQLite reports "database is locked" at once instead of calling the busy handler when another
    process does the same (two workers starting on a new file): retry until ``busy_timeout``.
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.001
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            break
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, _MAX_WAL_PAUSE)
    if str(mode).lower() != "wal":
        raise ImproperlyConfigured(
            f"{fmt.label} {path}: could not switch to WAL mode (got {mode!r}); "
            "is it on a network file system?"
        )
