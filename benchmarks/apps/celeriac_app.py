"""The celeriac side: ``celeriac -A benchmarks.apps.celeriac_app worker``.

``add`` is the no-op task of every throughput scenario; ``sleep`` is the I/O-bound one, written as
celeriac users would write it: ``async def`` with ``asyncio.sleep``, so 500 of them wait together
on the worker's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.apps import config
from celeriac import Celery
from celeriac.signals import worker_ready


def build_app(main: str, settings: dict[str, Any]) -> Celery:
    """A celeriac app with the benchmark tasks, configured by ``settings``."""
    app = Celery(main, set_as_current=False, **settings)

    @app.task(name=config.ADD)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name=config.SLEEP)
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    return app


def _on_ready(**_: Any) -> None:
    config.mark_ready()


def __getattr__(name: str) -> Any:
    # Built on first use, not at import: the benchmark process imports this module for
    # build_app() without a worker's BENCH_* environment.
    if name == "app":
        worker_ready.connect(_on_ready)
        app = build_app("celeriac_bench", config.settings_from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
