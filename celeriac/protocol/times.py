"""ISO-8601 timestamps as Celery writes and reads them in task messages.

Celery writes ``eta``/``expires`` with ``datetime.isoformat()`` on tz-aware UTC values, e.g.
``2026-11-23T22:09:16.419419+00:00`` (celery-wire.md §2.2). Readers must also accept what older or
foreign producers send: naive values (UTC for protocol v2; local time for a v1 body with
``utc: false``), ``Z`` suffixes and other offsets. :func:`datetime.fromisoformat` handles all of
these since Python 3.11, so no third-party parser is needed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo

__all__ = ["as_utc", "format_iso8601", "milliseconds_until", "parse_iso8601"]

_ONE_MS = timedelta(milliseconds=1)


def parse_iso8601(text: str) -> datetime:
    """Parse an ISO-8601 timestamp; the result is naive when the text has no offset.

    Raises :class:`ValueError` (with the offending text) when ``text`` is not ISO-8601.
    """
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}") from None


def as_utc(value: datetime, naive_tz: tzinfo | None = UTC) -> datetime:
    """Return ``value`` as a tz-aware UTC datetime.

    A naive value is taken to be in ``naive_tz``; ``None`` means the system's local zone (what
    Celery means by "local time" for a v1 message sent with ``utc: false``).
    """
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        if naive_tz is None:
            # astimezone() on a naive datetime interprets it in the system local zone.
            return value.astimezone(UTC)
        value = value.replace(tzinfo=naive_tz)
    return value.astimezone(UTC)


def format_iso8601(value: datetime) -> str:
    """Format as Celery does, always with an explicit ``+00:00`` (naive values are taken as UTC).

    A naive timestamp on the wire would be read as *local* time by some consumers (a v1 reader with
    ``utc: false``), so celeriac never writes one.
    """
    return as_utc(value).isoformat()


def milliseconds_until(when: datetime, now: datetime) -> int:
    """Whole milliseconds from ``now`` to ``when``, 0 when ``when`` is already past.

    This is the AMQP ``expiration`` property: kombu writes ``str(int(seconds * 1000))``; integer
    timedelta arithmetic gives the same number without float rounding.
    """
    delta = as_utc(when) - as_utc(now)
    return max(0, delta // _ONE_MS)
