"""``memory://[name]`` URLs, shared by the in-process broker and result store.

The name picks a process-global store, so a client and an in-process worker on different event
loops meet in the same one. A name is a plain word: no path, query or fragment to misread.
"""

from __future__ import annotations

from celeriac.exceptions import ImproperlyConfigured

SCHEME = "memory://"


def parse_memory_url(url: str, role: str) -> str:
    """The store name in ``url`` (``""`` for plain ``memory://``); ``role`` names the user."""
    if not isinstance(url, str) or url[: len(SCHEME)].lower() != SCHEME:
        raise ImproperlyConfigured(
            f"the memory {role} URL must look like 'memory://' or 'memory://<name>', got {url!r}"
        )
    name = url[len(SCHEME) :]
    if "/" in name or "?" in name or "#" in name:
        raise ImproperlyConfigured(
            f"the memory {role} name must be a plain word (no '/', '?', '#'), got {url!r}"
        )
    return name
