"""Worker logging in Celery's format, so log tooling written for Celery keeps working.

Lines are written in batches (:class:`BatchingStreamHandler`): a worker at INFO logs two lines per
task, and a write per line cost more than the line itself — every write releases the GIL, which a
pool thread then takes, so the event loop waits to get it back. Records of WARNING and above are
written at once; INFO and DEBUG ones at most :data:`FLUSH_INTERVAL` seconds later, and all of them
when the process exits. A worker process killed outright (SIGKILL, a crash in C code) loses at most
its last :data:`FLUSH_INTERVAL` of INFO lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

#: Celery's worker log format.
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Longest a line below WARNING waits before it is written, in seconds.
FLUSH_INTERVAL = 0.05

logger = logging.getLogger("celeriac.worker")
task_logger = logging.getLogger("celeriac.task")


class CeleryFormatter(logging.Formatter):
    """:data:`LOG_FORMAT`, with the date part of ``asctime`` formatted once per second.

    A worker at INFO writes two lines per task (received, succeeded) and ``time.strftime`` was
    an eighth of the cost of each; the text is the same as ``logging.Formatter``'s.
    """

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)
        self._second = -1
        self._date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            # Handlers format under their lock: the two fields never belong to different seconds.
            self._date = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._date},{int(record.msecs):03d}"  # logging's default_msec_format


class BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes lines in batches (see the module docstring).

    Formatting happens in ``emit`` as usual (under the handler's lock, so lines keep their order);
    the text waits in memory until a record of WARNING or above, the next periodic flush (a daemon
    thread, every :data:`FLUSH_INTERVAL` seconds, started again in a forked child), an explicit
    :meth:`flush`, or ``logging.shutdown()`` at exit.
    """

    def __init__(self, stream: TextIO, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(stream)
        self.interval = interval
        self._pending: list[str] = []
        self._stop_flushing = threading.Event()
        self._start_flusher()
        os.register_at_fork(after_in_child=self._start_flusher)

    def _start_flusher(self) -> None:
        flusher = threading.Thread(
            target=self._flush_periodically, name="celeriac-log-flush", daemon=True
        )
        flusher.start()

    def _flush_periodically(self) -> None:
        while not self._stop_flushing.wait(self.interval):
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr] # created by Handler.__init__
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:  # a closed or broken stream: as logging does, never raise
                return

    def close(self) -> None:
        self._stop_flushing.set()
        self.flush()
        super().close()


def setup_logging(loglevel: str) -> None:
    """Send celeriac's logs (and the root logger's) to stderr at ``loglevel``."""
    level = loglevel.upper()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {loglevel!r}")
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(CeleryFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
