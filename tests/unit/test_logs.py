"""The worker's log lines: Celery's format, whatever shortcut writes them."""

from __future__ import annotations

import logging

from celeriac.worker.logs import LOG_FORMAT, CeleryFormatter


def test_lines_are_what_logging_formatter_writes_across_seconds() -> None:
    ours, reference = CeleryFormatter(), logging.Formatter(LOG_FORMAT)
    # Same second twice (the cached date), the next second, a millisecond edge, another day.
    for created in (1_700_000_000.1234, 1_700_000_000.9999, 1_700_000_001.0005, 1_700_086_400.5):
        record = logging.LogRecord(
            "celeriac.worker", logging.INFO, __file__, 1, "Task %s", ("x",), None
        )
        record.created = created
        record.msecs = (created - int(created)) * 1000
        assert ours.format(record) == reference.format(record)
    record.created, record.msecs = 1_700_000_000.25, 250.0
    assert ours.formatTime(record, "%H") == reference.formatTime(record, "%H")
