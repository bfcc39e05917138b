"""The one table that maps URL schemes to broker transports and result stores.

A scheme is resolved to ``"module:Class"`` and imported only when used, so an optional dependency
(redis, aiormq) is needed only by those who use its scheme. A test imports every entry, so the
table cannot hold a dangling alias.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import urlsplit

from celeriac.exceptions import ImproperlyConfigured

#: Broker URL scheme -> transport class.
BROKER_ALIASES: dict[str, str] = {
    "memory": "celeriac.brokers.memory:MemoryBroker",
    "sqlite": "celeriac.brokers.sqlite:SQLiteBroker",
    "redis": "celeriac.brokers.redis:RedisBroker",
    "rediss": "celeriac.brokers.redis:RedisBroker",
    "redis+socket": "celeriac.brokers.redis:RedisBroker",
    "sentinel": "celeriac.brokers.redis:RedisBroker",
    "amqp": "celeriac.brokers.amqp:AMQPBroker",
    "amqps": "celeriac.brokers.amqp:AMQPBroker",
    "pyamqp": "celeriac.brokers.amqp:AMQPBroker",
}

#: Result store URL scheme -> store class.
BACKEND_ALIASES: dict[str, str] = {
    "memory": "celeriac.backends.memory:MemoryBackend",
    "sqlite": "celeriac.backends.sqlite:SQLiteBackend",
    "redis": "celeriac.backends.redis:RedisBackend",
    "rediss": "celeriac.backends.redis:RedisBackend",
    "redis+socket": "celeriac.backends.redis:RedisBackend",
    "unix": "celeriac.backends.redis:RedisBackend",
    "sentinel": "celeriac.backends.redis:RedisBackend",
    "rpc": "celeriac.backends.rpc:RPCBackend",
}

#: Schemes Celery users may try that celeriac does not serve, with what to do instead.
_HINTS = {
    "amqp": "RabbitMQ serves as a broker; for results use rpc:// or redis://",
    "db+sqlite": "use sqlite:///path for the embedded SQLite result store",
}


def scheme_of(url: str) -> str:
    """The scheme of ``url`` (``sqlite`` of ``sqlite:///x``), lower-cased."""
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ImproperlyConfigured(
            f"{url!r} is not a URL: expected something like 'sqlite:///file'"
        )
    return scheme


def _resolve(url: str, table: dict[str, str], role: str) -> type[Any]:
    scheme = scheme_of(url)
    target = table.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in sorted(table))
        reason = _HINTS.get(scheme, "unknown scheme")
        raise ImproperlyConfigured(f"No {role} for {scheme}:// ({reason}). Known: {known}.")
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Any] = getattr(module, class_name)
    return cls


def broker_class(url: str) -> type[Any]:
    """The transport class serving broker ``url``."""
    return _resolve(url, BROKER_ALIASES, "broker transport")


def backend_class(url: str) -> type[Any]:
    """The result store class serving ``url``."""
    return _resolve(url, BACKEND_ALIASES, "result backend")
