"""The real Celery side of the interop tests: the same task names as :mod:`celeriac_interop`.

``celery -A celery_interop:app worker`` builds ``app`` from ``INTEROP_*`` environment variables;
the test process calls :func:`build_app` for its client apps. Tasks are registered per app with
``shared=False`` so that several apps in one process never borrow each other's tasks.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down
from interop_config import settings_from_env
from kombu.asynchronous import get_event_loop

SIDE = "celery"

#: Settings only Celery has: quiet deprecation notices, and no remote-control (pidbox) queues or
#: exchanges, which the tests do not use and would otherwise leave on the broker.
CELERY_ONLY = {
    "broker_connection_retry_on_startup": True,
    "worker_enable_remote_control": False,
    "worker_send_task_events": False,
}


def build_app(main: str, settings: dict[str, Any]) -> Celery:
    """A Celery app with the interop tasks, configured by ``settings``."""
    app = Celery(main, set_as_current=False)
    app.conf.update({**CELERY_ONLY, **settings})
    _register(app)
    return app


def _register(app: Celery) -> None:
    @app.task(name="interop.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.fail", shared=False)
    def fail() -> None:
        raise ValueError("bad thing")

    @app.task(name="interop.echo", shared=False)
    def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs}

    @app.task(name="interop.sleepy", shared=False)
    def sleepy(seconds: float, value: Any) -> Any:
        time.sleep(seconds)
        return value

    @app.task(name="interop.types", shared=False)
    def types(*args: Any) -> list[str]:
        # How the arguments arrived: tells a pickle/msgpack body from a JSON one.
        return [type(arg).__name__ for arg in args]

    @app.task(name="interop.clock", shared=False)
    def clock() -> float:
        return time.time()

    @app.task(name="interop.delivery", bind=True, shared=False)
    def delivery(self: Any) -> dict[str, Any]:
        info = self.request.delivery_info or {}
        return {
            "side": SIDE,
            "hostname": self.request.hostname,
            "priority": info.get("priority"),
            "routing_key": info.get("routing_key"),
        }


@worker_shutting_down.connect
def _wake_event_loop(**_: Any) -> None:
    """Let a warm shutdown take effect at once.

    Celery's signal handler only sets a flag, which the worker's event loop reads when its poll
    returns: with nothing to do that is at the next timer, up to 10 s later. Scheduling a no-op
    from another thread writes to the loop's wake-up socket, so the poll returns now.
    """
    hub = get_event_loop()
    if hub is not None:
        threading.Thread(target=hub.call_soon, args=(_noop,), daemon=True).start()


def _noop() -> None:
    pass


def __getattr__(name: str) -> Any:
    # The worker's app is built on first use, so importing build_app costs no app.
    if name == "app":
        app = build_app("celery_interop", settings_from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
