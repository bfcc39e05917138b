"""Finding the app named by ``-A``: ``module``, ``module.attr``, ``module:attr`` (Celery's forms).

With a bare module, the app is its ``app`` or ``celery`` attribute, or the only ``Celery`` instance
in it; if that attribute is a module (``proj.celery``), the search continues inside it, as in Celery.
The working directory is put on ``sys.path`` first, so ``-A tasks`` finds ``./tasks.py``.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any

from celeriac.app.base import Celery


class AppNotFound(Exception):
    """``-A`` names nothing usable; the message is one line for the user."""


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            return None  # the module itself is missing, not something it imports
        raise AppNotFound(f"Importing {name!r} failed: {exc}") from exc
    except Exception as exc:
        raise AppNotFound(f"Importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def _app_in(module: ModuleType, spec: str) -> Celery:
    for attr in ("app", "celery"):
        value = getattr(module, attr, None)
        if isinstance(value, Celery):
            return value
        if isinstance(value, ModuleType):
            return _app_in(value, spec)
    found = [v for v in vars(module).values() if isinstance(v, Celery)]
    if len(found) == 1:
        return found[0]
    if found:
        raise AppNotFound(f"{spec!r} holds several apps; name one as {spec}:<attribute>")
    raise AppNotFound(
        f"No celeriac app found in module {module.__name__!r} (looked for 'app' and 'celery')"
    )


def _check(value: Any, spec: str) -> Celery:
    if isinstance(value, ModuleType):
        return _app_in(value, spec)
    if isinstance(value, Celery):
        return value
    raise AppNotFound(f"{spec!r} is a {type(value).__name__}, not a celeriac app")


def find_app(spec: str) -> Celery:
    """The app named by ``spec``."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        module = _import(module_name)
        if module is None:
            raise AppNotFound(f"The module {module_name!r} was not found.")
        try:
            return _check(getattr(module, attr), spec)
        except AttributeError:
            raise AppNotFound(f"Module {module_name!r} has no attribute {attr!r}.") from None
    module = _import(spec)
    if module is not None:
        return _app_in(module, spec)
    if "." in spec:
        module_name, _, attr = spec.rpartition(".")
        parent = _import(module_name)
        if parent is not None:
            if not hasattr(parent, attr):
                raise AppNotFound(f"Module {module_name!r} has no attribute {attr!r}.")
            return _check(getattr(parent, attr), spec)
    raise AppNotFound(f"The module {spec!r} was not found.")
