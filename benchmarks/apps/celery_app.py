"""The real Celery side: ``celery -A benchmarks.apps.celery_app worker``.

The same tasks as :mod:`benchmarks.apps.celeriac_app`; ``sleep`` is a plain ``time.sleep``, since
Celery has no ``async def`` tasks: its concurrency comes from the pool (threads or processes).
Tasks are registered per app (``shared=False``) so the benchmark's client apps never borrow each
other's tasks.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from benchmarks.apps import config

#: Settings only Celery has. Remote control and events are off because the benchmark does not use
#: them and they would add pidbox/event traffic and keys to the broker; Celery's own defaults
#: are kept for everything that concerns the tasks (prefetch, acks, result storage).
CELERY_ONLY: dict[str, Any] = {
    "broker_connection_retry_on_startup": True,
    "worker_enable_remote_control": False,
    "worker_send_task_events": False,
}


def build_app(main: str, settings: dict[str, Any]) -> Celery:
    """A Celery app with the benchmark tasks, configured by ``settings``."""
    app = Celery(main, set_as_current=False)
    app.conf.update({**CELERY_ONLY, **settings})

    # Registered by calling the decorator: Celery carries no type information.
    app.task(name=config.ADD, shared=False)(add)
    app.task(name=config.SLEEP, shared=False)(sleep)
    return app


def add(x: int, y: int) -> int:
    return x + y


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def _on_ready(**_: Any) -> None:
    config.mark_ready()


def __getattr__(name: str) -> Any:
    if name == "app":
        worker_ready.connect(_on_ready, weak=False)
        app = build_app("celery_bench", config.settings_from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
