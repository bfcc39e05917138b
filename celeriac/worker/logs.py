"""Worker logging in Celery's format, so log tooling written for Celery keeps working."""

from __future__ import annotations

import logging
import sys
import time

#: Celery's worker log format.
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

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


def setup_logging(loglevel: str) -> None:
    """Send celeriac's logs (and the root logger's) to stderr at ``loglevel``."""
    level = loglevel.upper()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {loglevel!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CeleryFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
