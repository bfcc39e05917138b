"""The worker's log lines: Celery's format, whatever shortcut writes them."""

from __future__ import annotations

import io
import logging
import os
import time

from celeriac.worker.logs import LOG_FORMAT, BatchingStreamHandler, CeleryFormatter


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


class _Stream(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("celeriac.worker", level, __file__, 1, message, (), None)


def test_info_lines_are_written_together_within_the_interval() -> None:
    stream = _Stream()
    handler = BatchingStreamHandler(stream, interval=0.1)
    try:
        for i in range(50):
            handler.handle(_record(logging.INFO, f"line {i}"))
        assert stream.getvalue() == ""  # not yet: waiting for the next flush
        deadline = time.monotonic() + 2
        while not stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue().splitlines() == [f"line {i}" for i in range(50)]
        assert stream.writes == 1
    finally:
        handler.close()


def test_warnings_are_written_at_once_after_what_came_before() -> None:
    stream = _Stream()
    handler = BatchingStreamHandler(stream, interval=60)
    try:
        handler.handle(_record(logging.INFO, "received"))
        handler.handle(_record(logging.WARNING, "soft time limit"))
        assert stream.getvalue().splitlines() == ["received", "soft time limit"]
        handler.handle(_record(logging.INFO, "succeeded"))
    finally:
        handler.close()  # what is left is written on close (logging.shutdown at exit)
    assert stream.getvalue().splitlines() == ["received", "soft time limit", "succeeded"]


def test_a_forked_child_flushes_its_own_lines() -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = BatchingStreamHandler(stream, interval=0.05)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its flusher thread was started again after the fork
            try:
                handler.handle(_record(logging.INFO, "from the child"))
                time.sleep(0.5)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        stream.close()
        with os.fdopen(read_end) as lines:
            assert lines.read() == "from the child\n"
    finally:
        handler._stop_flushing.set()
