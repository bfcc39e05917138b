"""What celeriac's SQLite stores share: URLs, options, opening a file, one thread per connection.

The SQLite broker and the SQLite result store keep different data but handle their files the same
way, so a user learns one set of rules and a fix lands in both:

* :mod:`.config` — the ``sqlite:///relative`` / ``sqlite:////absolute`` URL forms, the transport
  options ``synchronous`` and ``busy_timeout``, and :class:`FileFormat`, which says what one kind of
  file holds (schema, version, its ``application_id`` mark, what it is called in messages);
* :mod:`.files` — opening a file: SQLite version check, claiming it (create the schema in an empty
  file, refuse anyone else's), WAL, ``synchronous``; and translating driver errors;
* :mod:`.thread` — :class:`ConnectionThread`: one connection used from one dedicated thread, reopened
  in a child after ``fork()``.

Each store keeps its own schema, with its documentation, next to the code that uses it.
"""

from celeriac.utils.sqlite.config import (
    OPTIONS,
    URL_FORMS,
    FileFormat,
    Settings,
    parse_options,
    parse_url,
)
from celeriac.utils.sqlite.files import immediate_transaction, open_file, rollback, translate_error
from celeriac.utils.sqlite.thread import ConnectionThread

__all__ = [
    "OPTIONS",
    "URL_FORMS",
    "ConnectionThread",
    "FileFormat",
    "Settings",
    "immediate_transaction",
    "open_file",
    "parse_options",
    "parse_url",
    "rollback",
    "translate_error",
]
