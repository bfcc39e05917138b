"""The celeriac exception tree.

Every error celeriac raises derives from :class:`CeleriacError`. Names that exist in Celery keep
Celery's name and meaning (``NotRegistered``, ``TimeLimitExceeded``, ``TaskRevokedError`` …), so that
``except`` clauses written for Celery keep working after ``from celeriac.exceptions import …``.

Exceptions that mirror one of Celery's are written into result documents with
``exc_module = "celery.exceptions"`` (see :data:`CELERY_COMPATIBLE`), so a real Celery client reading
a result stored by a celeriac worker re-raises its own class, and vice versa.
"""

from __future__ import annotations

import builtins
from typing import Any


class CeleriacError(Exception):
    """Base class of every celeriac error."""


class ImproperlyConfigured(CeleriacError):
    """A setting, option or URL is wrong. The message says which and what to do."""


class ConnectionError(CeleriacError):
    """The broker or result store could not be reached (the driver's error is the ``__cause__``)."""


class PublishError(CeleriacError):
    """A message could not be stored by the broker; it was **not** sent."""


class RoutingError(PublishError):
    """No queue is bound for the exchange and routing key a message was published to."""


class ContentDisallowed(CeleriacError):
    """A message or result has a content type that is not in the accept list; it was not decoded."""


class DecodeError(CeleriacError):
    """A payload could not be decoded (bad encoding, corrupt compression, malformed data)."""


class EncodeError(CeleriacError):
    """A value could not be encoded with the chosen serializer; nothing was published."""


class InvalidTaskError(CeleriacError):
    """A task message does not have the shape of a Celery task message (protocol v1 or v2)."""


class NotRegistered(CeleriacError, KeyError):
    """The task name is not registered with the app or worker."""

    def __str__(self) -> str:
        return f"Task of kind {self.args[0]!r} never registered, please make sure it's imported."


class TimeoutError(CeleriacError, builtins.TimeoutError):
    """An operation (usually ``AsyncResult.get``) did not finish in time."""


class TaskError(CeleriacError):
    """Base of errors that describe what happened to a task."""


class TaskRevokedError(TaskError):
    """The task was revoked or expired and never ran (Celery's name)."""


class TimeLimitExceeded(TaskError):
    """The task's hard time limit was exceeded."""


class SoftTimeLimitExceeded(TaskError):
    """Raised inside a task when its soft time limit is exceeded."""


class WorkerLostError(TaskError):
    """The worker running the task died."""


class Retry(TaskError):
    """Raised by ``Task.retry`` to tell the worker the task is being retried."""

    def __init__(
        self, message: str | None = None, exc: BaseException | None = None, when: Any = None
    ) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        #: Replacement arguments and extra ``apply_async`` options for the retried message.
        self.args_override: list[Any] | None = None
        self.kwargs_override: dict[str, Any] | None = None
        self.options: dict[str, Any] = {}
        super().__init__(message, exc, when)

    def __str__(self) -> str:
        return self.message or "Retry"


class MaxRetriesExceededError(TaskError):
    """The task was retried ``max_retries`` times already."""


class RemoteTaskError(TaskError):
    """A task failed with an exception type that could not be rebuilt safely on this side.

    celeriac never imports a module named in a result document (the CVE-2021-23727 class of
    attacks), so an exception whose class is not a built-in, one of celeriac's, or already imported
    in this process is raised as this class, carrying the remote type, module and arguments.
    """

    def __init__(self, exc_type: str, exc_module: str | None, exc_args: Any) -> None:
        self.exc_type = exc_type
        self.exc_module = exc_module
        self.exc_args = exc_args
        super().__init__(exc_type, exc_module, exc_args)

    def __str__(self) -> str:
        where = f"{self.exc_module}.{self.exc_type}" if self.exc_module else self.exc_type
        args = self.exc_args
        text = ", ".join(str(a) for a in args) if isinstance(args, list | tuple) else str(args)
        return f"{where}: {text}" if text else where


#: celeriac classes that mirror a class of ``celery.exceptions``; written to and read from result
#: documents under that module name so both implementations re-raise their own class.
CELERY_COMPATIBLE: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (
        NotRegistered,
        TimeoutError,
        TaskRevokedError,
        TimeLimitExceeded,
        SoftTimeLimitExceeded,
        WorkerLostError,
        Retry,
        MaxRetriesExceededError,
        ImproperlyConfigured,
        InvalidTaskError,
    )
}


class UnknownOptionError(ImproperlyConfigured, TypeError):
    """A task option or call option that celeriac does not know; raised, never ignored."""
