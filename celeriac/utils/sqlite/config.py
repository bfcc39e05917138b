"""URLs, transport options and file formats of celeriac's SQLite stores.

Configuration mistakes are caught when a store is created, before any file is touched, and every
message says which store complained and which setting to change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celeriac.exceptions import ImproperlyConfigured
from celeriac.utils.suggest import did_you_mean

_SCHEME = "sqlite:///"
URL_FORMS = "sqlite:///relative/path.sqlite3 or sqlite:////absolute/path.sqlite3"

#: The transport options every SQLite store takes, and what they mean (shown for a typo).
OPTIONS: dict[str, str] = {
    "busy_timeout": "seconds to wait for another process's write lock, default 5",
    "synchronous": '"NORMAL" (default) or "FULL" for durability against power loss',
}
_SYNCHRONOUS = ("NORMAL", "FULL")


@dataclass(frozen=True, slots=True)
class FileFormat:
    """One kind of celeriac SQLite file: its schema and the mark that says a file is one.

    ``PRAGMA application_id`` marks the kind and ``PRAGMA user_version`` the schema version, so a
    store refuses a file that belongs to another program, to another kind of store, or to a newer
    celeriac, instead of altering it.
    """

    #: What the store is called in messages: "broker", "result store".
    role: str
    #: ``PRAGMA application_id`` of such files (four ASCII letters, by convention).
    application_id: int
    #: ``PRAGMA user_version``: bumped whenever the layout changes.
    schema_version: int
    #: ``CREATE`` statements run once, in an empty file.
    schema: tuple[str, ...]
    #: Oldest SQLite library that has every feature the store's SQL uses.
    min_sqlite_version: tuple[int, int, int]
    #: That feature, for the message when the library is older.
    needs: str
    #: The setting that holds the store's transport options.
    options_setting: str

    @property
    def label(self) -> str:
        """``SQLite <role>``, how messages name the store."""
        return f"SQLite {self.role}"


@dataclass(frozen=True, slots=True)
class Settings:
    """The transport options, checked."""

    #: ``PRAGMA synchronous``: NORMAL or FULL.
    synchronous: str = "NORMAL"
    #: Seconds a statement waits for another connection's lock before it fails.
    busy_timeout: float = 5.0


def parse_url(url: str, fmt: FileFormat) -> str:
    """The absolute path named by ``sqlite:///relative`` or ``sqlite:////absolute``.

    A relative path is taken from the working directory at the time of the call. Query strings and
    in-memory or URI databases are refused: options belong in the options setting, and a database
    that lives in one connection cannot be shared by clients and workers.
    """
    if not isinstance(url, str) or not url.startswith(_SCHEME):
        raise ImproperlyConfigured(
            f"expected a {fmt.label} URL of the form {URL_FORMS}, got {url!r}"
        )
    path = url[len(_SCHEME) :]
    if "?" in path or "#" in path:
        raise ImproperlyConfigured(
            f"{fmt.label} URL {url!r} has a query or fragment, which is not supported: set options "
            f"in {fmt.options_setting}; expected {URL_FORMS}"
        )
    if not path or path.endswith("/"):
        raise ImproperlyConfigured(f"{fmt.label} URL {url!r} names no file; expected {URL_FORMS}")
    if ":memory:" in path or path.startswith("file:"):
        raise ImproperlyConfigured(
            f"{fmt.label} URL {url!r}: an in-memory or URI database is private to one process and "
            f"cannot be shared by clients and workers; use memory:// within one process, or "
            f"{URL_FORMS}"
        )
    return os.path.abspath(path)


def parse_options(
    options: Mapping[str, Any] | Iterable[tuple[str, Any]], fmt: FileFormat
) -> Settings:
    """Check the transport options (a mapping or ``(name, value)`` pairs); refuse unknown ones.

    An unknown option is an error rather than ignored, so a typo cannot silently leave the default.
    """
    given = dict(options)
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        described = "; ".join(f"{name}: {meaning}" for name, meaning in OPTIONS.items())
        raise ImproperlyConfigured(
            f"unknown {fmt.label} transport option(s) {unknown} in {fmt.options_setting}."
            f"{did_you_mean(unknown[0], OPTIONS)} Known options: {described}"
        )
    synchronous = given.get("synchronous", "NORMAL")
    if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
        raise ImproperlyConfigured(
            f"{fmt.label} transport option synchronous must be one of {list(_SYNCHRONOUS)}, "
            f"got {synchronous!r}"
        )
    busy_timeout = given.get("busy_timeout", 5.0)
    if (
        not isinstance(busy_timeout, int | float)
        or isinstance(busy_timeout, bool)
        or not math.isfinite(busy_timeout)
        or busy_timeout <= 0
    ):
        raise ImproperlyConfigured(
            f"{fmt.label} transport option busy_timeout must be a positive number of seconds, "
            f"got {busy_timeout!r}"
        )
    return Settings(synchronous=synchronous.upper(), busy_timeout=float(busy_timeout))
