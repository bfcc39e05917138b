"""Celery's signals, with Celery's names, senders and arguments: ``from celeriac.signals import …``.

Every receiver is called as ``receiver(signal=..., sender=..., **arguments)``; see
:mod:`celeriac.utils.dispatch` for ``connect``/``disconnect``/``send``.

Where each is sent, and with what (as Celery sends it):

=========================  ======================  ==================================================
signal                     sender                  arguments
=========================  ======================  ==================================================
``before_task_publish``    task name (str)         ``body`` (``(args, kwargs, embed)``), ``exchange``,
                                                   ``routing_key``, ``headers``, ``properties``,
                                                   ``declare``, ``retry_policy``; ``headers`` and
                                                   ``properties`` may be changed in place: the message
                                                   is published with them
``after_task_publish``     task name (str)         ``body``, ``exchange``, ``routing_key``, ``headers``
``task_received``          the worker              ``request`` (the worker's request: ``.id``,
                                                   ``.name``, ``.task``, ``.message``)
``task_prerun``            the task                ``task_id``, ``task``, ``args``, ``kwargs``
``task_success``           the task                ``result``, ``runtime``
``task_failure``           the task                ``task_id``, ``exception``, ``args``, ``kwargs``,
                                                   ``traceback``, ``einfo``
``task_retry``             the task                ``request`` (``self.request``), ``reason`` (the
                                                   ``Retry``), ``einfo``
``task_postrun``           the task                ``task_id``, ``task``, ``args``, ``kwargs``,
                                                   ``retval``, ``state``
``task_revoked``           the task                ``request``, ``terminated``, ``signum``,
                                                   ``expired`` (sent for an expired task)
``worker_init``            the worker              (before it connects)
``worker_process_init``    the worker's hostname   (in each ``-P prefork`` child as it starts; once,
                                                   in the worker process, for other pools)
``worker_ready``           the worker              (when it starts consuming)
``worker_shutdown``        the worker              (after it stopped and closed its connections)
=========================  ======================  ==================================================

``task_prerun``, the outcome signal and ``task_postrun`` run where the task body runs — the pool
thread of a sync task, the event loop for an ``async def`` task — in the task's own context, so a
receiver can set up per-task state (a tracing span, a database connection) that the body then sees.
They are sent before the result is stored (Celery stores first, then sends ``task_failure``).

Celery's other signals (``task_rejected``, ``setup_logging``, ``beat_init`` …) can be imported, so
modules written for Celery keep importing, but this version never sends them: connecting a
receiver to one is an error that says so, rather than a receiver that is silently never called.
"""

from __future__ import annotations

import traceback as tb
from types import TracebackType
from typing import Any

from celeriac.exceptions import ImproperlyConfigured
from celeriac.utils.dispatch import Signal

__all__ = [
    "ExceptionInfo",
    "Signal",
    "after_task_publish",
    "before_task_publish",
    "task_failure",
    "task_postrun",
    "task_prerun",
    "task_received",
    "task_retry",
    "task_revoked",
    "task_success",
    "worker_init",
    "worker_process_init",
    "worker_ready",
    "worker_shutdown",
]

# -- Task
before_task_publish = Signal(
    name="before_task_publish",
    providing_args={
        "body",
        "exchange",
        "routing_key",
        "headers",
        "properties",
        "declare",
        "retry_policy",
    },
)
after_task_publish = Signal(
    name="after_task_publish", providing_args={"body", "exchange", "routing_key", "headers"}
)
task_received = Signal(name="task_received", providing_args={"request"})
task_prerun = Signal(name="task_prerun", providing_args={"task_id", "task", "args", "kwargs"})
task_postrun = Signal(
    name="task_postrun",
    providing_args={"task_id", "task", "args", "kwargs", "retval", "state"},
)
task_success = Signal(name="task_success", providing_args={"result", "runtime"})
task_retry = Signal(name="task_retry", providing_args={"request", "reason", "einfo"})
task_failure = Signal(
    name="task_failure",
    providing_args={"task_id", "exception", "args", "kwargs", "traceback", "einfo"},
)
task_revoked = Signal(
    name="task_revoked", providing_args={"request", "terminated", "signum", "expired"}
)

# -- Worker
worker_init = Signal(name="worker_init")
worker_process_init = Signal(name="worker_process_init")
worker_ready = Signal(name="worker_ready")
worker_shutdown = Signal(name="worker_shutdown")


class _NotSent(Signal):
    """A Celery signal this version never sends: connecting to it is an error that says so."""

    def _connect(self, receiver: Any, sender: Any, weak: bool, dispatch_uid: Any) -> None:
        raise ImproperlyConfigured(
            f"celeriac does not send Celery's {self.name!r} signal in this version: "
            f"{receiver!r} would never be called"
        )


# Celery signals celeriac does not send (yet). They exist so that modules importing them keep
# importing; connecting a receiver is refused rather than left never called.
task_internal_error = _NotSent(name="task_internal_error")
task_rejected = _NotSent(name="task_rejected")
task_unknown = _NotSent(name="task_unknown")
task_sent = _NotSent(name="task_sent")
celeryd_init = _NotSent(name="celeryd_init")
celeryd_after_setup = _NotSent(name="celeryd_after_setup")
import_modules = _NotSent(name="import_modules")
worker_before_create_process = _NotSent(name="worker_before_create_process")
worker_process_shutdown = _NotSent(name="worker_process_shutdown")
worker_shutting_down = _NotSent(name="worker_shutting_down")
heartbeat_sent = _NotSent(name="heartbeat_sent")
setup_logging = _NotSent(name="setup_logging")
after_setup_logger = _NotSent(name="after_setup_logger")
after_setup_task_logger = _NotSent(name="after_setup_task_logger")
beat_init = _NotSent(name="beat_init")
beat_embedded_init = _NotSent(name="beat_embedded_init")
eventlet_pool_started = _NotSent(name="eventlet_pool_started")
eventlet_pool_preshutdown = _NotSent(name="eventlet_pool_preshutdown")
eventlet_pool_postshutdown = _NotSent(name="eventlet_pool_postshutdown")
eventlet_pool_apply = _NotSent(name="eventlet_pool_apply")
user_preload_options = _NotSent(name="user_preload_options")


class ExceptionInfo:
    """An exception with its traceback, as Celery's ``einfo`` (``billiard.einfo.ExceptionInfo``).

    ``exception``, ``type``, ``tb`` and ``traceback`` (the formatted text) as Celery names them.
    """

    __slots__ = ("exception", "tb", "traceback", "type")

    def __init__(self, exception: BaseException, traceback: str | None = None) -> None:
        self.exception = exception
        self.type: type[BaseException] = type(exception)
        self.tb: TracebackType | None = exception.__traceback__
        self.traceback = (
            traceback if traceback is not None else "".join(tb.format_exception(exception))
        )

    @property
    def exc_info(self) -> tuple[type[BaseException], BaseException, TracebackType | None]:
        """``(type, exception, traceback)`` as ``sys.exc_info()`` gives it."""
        return self.type, self.exception, self.tb

    def __str__(self) -> str:
        return self.traceback

    def __repr__(self) -> str:
        return f"<ExceptionInfo: {self.exception!r}>"
