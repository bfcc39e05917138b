"""The celeriac side of the interop tests: the same task names as :mod:`celery_interop`.

``celeriac -A celeriac_interop:app worker`` builds ``app`` from ``INTEROP_*`` environment
variables; the test process calls :func:`build_app` for its client apps.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from interop_config import settings_from_env

from celeriac import Celery

SIDE = "celeriac"


def build_app(main: str, settings: dict[str, Any]) -> Celery:
    """A celeriac app with the interop tasks, configured by ``settings``."""
    app = Celery(main, set_as_current=False, **settings)
    _register(app)
    return app


def _register(app: Celery) -> None:
    @app.task(name="interop.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="interop.fail")
    def fail() -> None:
        raise ValueError("bad thing")

    @app.task(name="interop.echo")
    def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs}

    @app.task(name="interop.sleepy")
    def sleepy(seconds: float, value: Any) -> Any:
        time.sleep(seconds)
        return value

    @app.task(name="interop.types")
    def types(*args: Any) -> list[str]:
        return [type(arg).__name__ for arg in args]

    @app.task(name="interop.clock")
    def clock() -> float:
        return time.time()

    @app.task(name="interop.delivery", bind=True)
    def delivery(self: Any) -> dict[str, Any]:
        info = self.request.delivery_info or {}
        return {
            "side": SIDE,
            "hostname": self.request.hostname,
            "priority": info.get("priority"),
            "routing_key": info.get("routing_key"),
        }

    @app.task(name="interop.async_add")
    async def async_add(x: int, y: int) -> int:
        await asyncio.sleep(0.01)
        return x + y

    @app.task(name="test_celery.add_together")
    def add_together(x: int, y: int) -> int:
        # The task of the design notes' protocol-1 message.
        return x + y


def __getattr__(name: str) -> Any:
    if name == "app":
        app = build_app("celeriac_interop", settings_from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
