"""Worker logging in Celery's format, so log tooling written for Celery keeps working."""

from __future__ import annotations

import logging
import sys

#: Celery's worker log format.
LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

logger = logging.getLogger("celeriac.worker")
task_logger = logging.getLogger("celeriac.task")


def setup_logging(loglevel: str) -> None:
    """Send celeriac's logs (and the root logger's) to stderr at ``loglevel``."""
    level = loglevel.upper()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {loglevel!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
