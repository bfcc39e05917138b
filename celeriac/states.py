"""Task states, with Celery's names and meanings (celery-wire.md §7).

``PENDING`` is never stored: an unknown id simply looks pending.
"""

from __future__ import annotations

from typing import Final

PENDING: Final = "PENDING"
RECEIVED: Final = "RECEIVED"
STARTED: Final = "STARTED"
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"
REVOKED: Final = "REVOKED"
RETRY: Final = "RETRY"
REJECTED: Final = "REJECTED"
IGNORED: Final = "IGNORED"

#: States after which the task will not change again.
READY_STATES: Final = frozenset({SUCCESS, FAILURE, REVOKED})
#: States still moving.
UNREADY_STATES: Final = frozenset({PENDING, RECEIVED, STARTED, REJECTED, RETRY})
#: States whose result is an exception.
EXCEPTION_STATES: Final = frozenset({RETRY, FAILURE, REVOKED})
#: States whose exception ``AsyncResult.get()`` re-raises.
PROPAGATE_STATES: Final = frozenset({FAILURE, REVOKED})

ALL_STATES: Final = frozenset(
    {PENDING, RECEIVED, STARTED, SUCCESS, FAILURE, RETRY, REVOKED, REJECTED, IGNORED}
)
