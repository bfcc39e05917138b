"""Optional dependencies, imported only when the feature that needs them is used."""

from __future__ import annotations

import importlib
from types import ModuleType

from celeriac.exceptions import ImproperlyConfigured


def optional_module(*names: str, purpose: str, package: str, install: str) -> ModuleType:
    """The first importable module of ``names``, or an error saying what to install.

    ``purpose`` says what needs it ("the yaml serializer"), ``package`` what it is called on the
    package index, ``install`` the argument to give ``pip install``.
    """
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImproperlyConfigured(f"{purpose} needs the {package} package: pip install {install}")
