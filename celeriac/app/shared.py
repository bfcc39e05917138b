"""``shared_task`` and the current app, for libraries that do not know which app will run them."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celeriac.app.base import Celery
    from celeriac.app.task import Task

_lock = threading.Lock()
_current: Celery | None = None
_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
#: Every ``@shared_task``: (function, options), registered on each app as it is created.
_shared: list[tuple[Callable[..., Any], dict[str, Any]]] = []


def current_app() -> Celery:
    """The most recently created app (one named "default" is created if there is none)."""
    global _current
    with _lock:
        app = _current
    if app is None:
        from celeriac.app.base import Celery

        app = Celery("default")
    return app


def set_current(app: Celery) -> None:
    """Make ``app`` the current app."""
    global _current
    with _lock:
        _current = app


def on_app_created(app: Celery) -> None:
    """Register every shared task with a new app."""
    with _lock:
        _apps.add(app)
        pending = list(_shared)
    for fun, options in pending:
        app._register_function(fun, options)


class SharedTask:
    """What ``@shared_task`` returns: the task of the same name in the current app."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _task(self) -> Task[Any, Any]:
        return current_app().tasks[self._name]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._task(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._task()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<@shared_task: {self._name}>"


def shared_task(*args: Any, **options: Any) -> Any:
    """Declare a task usable with any app: ``@shared_task`` or ``@shared_task(**options)``."""

    def decorate(fun: Callable[..., Any]) -> SharedTask:
        with _lock:
            _shared.append((fun, options))
            apps = list(_apps)
        name = ""
        for app in apps:
            name = app._register_function(fun, options).name
        if not name:
            name = current_app()._register_function(fun, options).name
        return SharedTask(name)

    if len(args) == 1 and callable(args[0]) and not options:
        return decorate(args[0])
    if args:
        raise TypeError("shared_task() takes options as keyword arguments only")
    return decorate
