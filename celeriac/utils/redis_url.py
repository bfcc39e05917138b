"""Redis URLs, shared by the Redis broker and the Redis result store.

Accepted forms, as Celery and kombu spell them:

* ``redis://[[username]:password@]host[:port][/db]`` and ``rediss://…`` (TLS);
* ``redis+socket:///path/to/redis.sock[?virtual_host=db]`` and ``unix:///path[?db=N]`` (unix socket);
* ``sentinel://[:password@]host:port[/db][;sentinel://host2:port2;…]`` with the master's name in the
  transport option ``master_name`` (Sentinel finds the current master; a failover is followed).

TLS options come from the query string (``?ssl_cert_reqs=required&ssl_ca_certs=/path``, Celery's
spelling) or from the transport option ``ssl`` (a dict of the same names). Anything not understood
is refused with an error naming it, never ignored.

:func:`make_client` builds a ``redis.asyncio.Redis`` (hiredis parses replies when installed). The
redis package is optional: ``pip install 'celeriac[redis]'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from celeriac.exceptions import ImproperlyConfigured
from celeriac.utils.optional import optional_module
from celeriac.utils.redact import redact_url

if TYPE_CHECKING:
    import redis.asyncio

DEFAULT_PORT = 6379
SENTINEL_PORT = 26379

#: TLS options accepted in the query string or the ``ssl`` transport option (redis-py's names).
SSL_OPTIONS = frozenset(
    {
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_password",
        "ssl_ciphers",
    }
)

_CERT_REQS = {"required": "required", "optional": "optional", "none": "none"}

#: Connection options accepted in the transport options (and the query string), with their types.
CONNECTION_OPTIONS: dict[str, type] = {
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "socket_keepalive": bool,
    "health_check_interval": int,
    "max_connections": int,
    "client_name": str,
}


@dataclass(slots=True, frozen=True)
class RedisTarget:
    """Where a Redis server is and how to reach it, parsed from a URL."""

    #: ``"tcp"``, ``"unix"`` or ``"sentinel"``.
    kind: str
    host: str = "localhost"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: Unix socket path (``kind == "unix"``).
    path: str | None = None
    #: Sentinel addresses (``kind == "sentinel"``) and the name of the master they watch.
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    #: TLS: None for plain TCP, else redis-py's ``ssl_*`` keyword arguments.
    ssl: dict[str, Any] | None = None
    #: Extra redis-py connection keyword arguments (socket timeouts, …).
    connection: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """A password-free description for logs: ``redis://host:6379/0``."""
        if self.kind == "unix":
            return f"redis+socket://{self.path}?virtual_host={self.db}"
        if self.kind == "sentinel":
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{hosts}/{self.db} (master {self.master_name!r})"
        scheme = "rediss" if self.ssl is not None else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(
    url: str, options: Mapping[str, Any] | None = None, *, role: str = "broker"
) -> tuple[RedisTarget, dict[str, Any]]:
    """Parse ``url``; return the target and the transport options it did not consume.

    ``options`` are the transport options; the connection ones (``master_name``, ``ssl``,
    :data:`CONNECTION_OPTIONS`) are taken here and the rest returned for the caller to check.
    """
    if not isinstance(url, str):
        raise ImproperlyConfigured(f"the Redis {role} URL must be a string, got {url!r}")
    rest = dict(options or {})
    scheme = url.partition("://")[0].lower()
    if scheme == "sentinel":
        target = _parse_sentinel(url, rest, role)
    elif scheme in ("redis", "rediss"):
        target = _parse_tcp(url, scheme == "rediss", rest, role)
    elif scheme in ("redis+socket", "unix", "socket"):
        target = _parse_unix(url, rest, role)
    else:
        raise ImproperlyConfigured(
            f"not a Redis URL: {redact_url(url)!r} (expected redis://, rediss://, "
            "redis+socket:// or sentinel://)"
        )
    return target, rest


def _split(url: str, role: str) -> Any:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ImproperlyConfigured(f"bad Redis {role} URL {redact_url(url)!r}: {exc}") from exc
    return parts


def _query(url: str, parts: Any, role: str) -> dict[str, str]:
    if parts.fragment:
        raise ImproperlyConfigured(f"a Redis {role} URL takes no #fragment: {redact_url(url)!r}")
    return dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))


def _db(value: str, url: str, role: str) -> int:
    try:
        db = int(value)
    except ValueError:
        db = -1
    if db < 0:
        raise ImproperlyConfigured(
            f"the Redis database in {redact_url(url)!r} must be a number >= 0, got {value!r}"
        )
    return db


def _db_from_path(parts: Any, url: str, role: str) -> int:
    path = parts.path.strip("/")
    return 0 if not path else _db(path, url, role)


def _credentials(parts: Any) -> tuple[str | None, str | None]:
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return username, password


def _parse_tcp(url: str, tls: bool, rest: dict[str, Any], role: str) -> RedisTarget:
    parts = _split(url, role)
    query = _query(url, parts, role)
    db = _db_from_path(parts, url, role)
    if "db" in query:
        db = _db(query.pop("db"), url, role)
    username, password = _credentials(parts)
    ssl = _ssl_options(query, rest, tls, url, role)
    return RedisTarget(
        kind="tcp",
        host=parts.hostname or "localhost",
        port=parts.port or DEFAULT_PORT,
        db=db,
        username=username,
        password=password,
        ssl=ssl,
        connection=_connection_options(query, rest, url, role),
    )


def _parse_unix(url: str, rest: dict[str, Any], role: str) -> RedisTarget:
    parts = _split(url, role)
    query = _query(url, parts, role)
    if not parts.path:
        raise ImproperlyConfigured(
            f"a Redis socket URL needs the socket's path, e.g. "
            f"'redis+socket:///run/redis/redis.sock', got {redact_url(url)!r}"
        )
    db = 0
    for name in ("virtual_host", "db"):
        if name in query:
            db = _db(query.pop(name), url, role)
    username, password = _credentials(parts)
    return RedisTarget(
        kind="unix",
        path=unquote(parts.path),
        db=db,
        username=username,
        password=password,
        connection=_connection_options(query, rest, url, role),
    )


def _parse_sentinel(url: str, rest: dict[str, Any], role: str) -> RedisTarget:
    hosts: list[tuple[str, int]] = []
    db = 0
    username = password = None
    query: dict[str, str] = {}
    for raw in url.split(";"):
        piece = raw.strip()
        if not piece:
            continue
        if not piece.lower().startswith("sentinel://"):
            raise ImproperlyConfigured(
                f"every address of a Sentinel URL must start with sentinel://, "
                f"got {redact_url(piece)!r}"
            )
        parts = _split(piece, role)
        hosts.append((parts.hostname or "localhost", parts.port or SENTINEL_PORT))
        if parts.path.strip("/"):
            db = _db_from_path(parts, url, role)
        user, secret = _credentials(parts)
        username = username or user
        password = password if password is not None else secret
        query.update(_query(piece, parts, role))
    master = rest.pop("master_name", None) or query.pop("master_name", None)
    if not isinstance(master, str) or not master:
        raise ImproperlyConfigured(
            "a sentinel:// URL needs the master's name: set the transport option "
            "master_name (broker_transport_options / result_backend_transport_options)"
        )
    sentinel_kwargs = rest.pop("sentinel_kwargs", None)
    if sentinel_kwargs is not None and not isinstance(sentinel_kwargs, dict):
        raise ImproperlyConfigured(f"sentinel_kwargs must be a dict, got {sentinel_kwargs!r}")
    connection = _connection_options(query, rest, url, role)
    if sentinel_kwargs:
        connection["sentinel_kwargs"] = dict(sentinel_kwargs)
    return RedisTarget(
        kind="sentinel",
        sentinels=tuple(hosts),
        master_name=master,
        db=db,
        username=username,
        password=password,
        ssl=_ssl_options(query, rest, False, url, role),
        connection=connection,
    )


def _ssl_options(
    query: dict[str, str], rest: dict[str, Any], tls: bool, url: str, role: str
) -> dict[str, Any] | None:
    found: dict[str, Any] = {k: query.pop(k) for k in list(query) if k in SSL_OPTIONS}
    extra = rest.pop("ssl", None)
    if extra is not None:
        if extra is True:
            extra = {}
        if not isinstance(extra, dict):
            raise ImproperlyConfigured(f"the transport option ssl must be a dict, got {extra!r}")
        unknown = sorted(set(extra) - SSL_OPTIONS)
        if unknown:
            raise ImproperlyConfigured(
                f"unknown TLS option(s) {unknown} for the Redis {role}; known: {sorted(SSL_OPTIONS)}"
            )
        found.update(extra)
    if not tls and not found:
        return None
    if "ssl_cert_reqs" in found:
        value = str(found["ssl_cert_reqs"]).lower().removeprefix("cert_")
        if value not in _CERT_REQS:
            raise ImproperlyConfigured(
                f"ssl_cert_reqs must be required, optional or none, got {found['ssl_cert_reqs']!r}"
            )
        found["ssl_cert_reqs"] = _CERT_REQS[value]
    if "ssl_check_hostname" in found:
        found["ssl_check_hostname"] = _truthy(found["ssl_check_hostname"], "ssl_check_hostname")
    return found


def _truthy(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {value!r}")


def _connection_options(
    query: dict[str, str], rest: dict[str, Any], url: str, role: str
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, kind in CONNECTION_OPTIONS.items():
        for source in (query, rest):
            if name in source:
                found[name] = _convert(source.pop(name), kind, name)
    if query:
        raise ImproperlyConfigured(
            f"unknown option(s) {sorted(query)} in the Redis {role} URL {redact_url(url)!r}; "
            f"known: {sorted([*CONNECTION_OPTIONS, *SSL_OPTIONS])}"
        )
    return found


def _convert(value: Any, kind: type, name: str) -> Any:
    if kind is bool:
        return _truthy(value, name)
    if kind is str:
        if not isinstance(value, str):
            raise ImproperlyConfigured(f"{name} must be a string, got {value!r}")
        return value
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if isinstance(number, float) and (not math.isfinite(number) or number <= 0):
        raise ImproperlyConfigured(f"{name} must be a positive number, got {value!r}")
    if isinstance(number, int) and number < 0:
        raise ImproperlyConfigured(f"{name} must be >= 0, got {value!r}")
    return number


def redis_module() -> Any:
    """``redis.asyncio``, or an error saying how to install it."""
    optional_module(
        "redis", purpose="the Redis transport", package="redis", install="'celeriac[redis]'"
    )
    return optional_module(
        "redis.asyncio",
        purpose="the Redis transport",
        package="redis",
        install="'celeriac[redis]'",
    )


def make_client(target: RedisTarget, **overrides: Any) -> redis.asyncio.Redis:
    """A ``redis.asyncio.Redis`` for ``target``; ``overrides`` are redis-py keyword arguments.

    Binary replies (``decode_responses=False``) unless overridden: message bodies are bytes.
    """
    aioredis = redis_module()
    kwargs: dict[str, Any] = {
        "db": target.db,
        "username": target.username,
        "password": target.password,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 25,
        "client_name": "celeriac",
    }
    kwargs.update(target.connection)
    sentinel_kwargs = kwargs.pop("sentinel_kwargs", None)
    if target.ssl is not None:
        kwargs["ssl"] = True
        kwargs.update(target.ssl)
    kwargs.update(overrides)
    if target.kind == "unix":
        for name in ("ssl", *SSL_OPTIONS):
            kwargs.pop(name, None)
        return aioredis.Redis(unix_socket_path=target.path, **kwargs)  # type: ignore[no-any-return]
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        assert target.master_name is not None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=sentinel_kwargs or {}, **kwargs
        )
        return sentinel.master_for(target.master_name)  # type: ignore[no-any-return]
    return aioredis.Redis(host=target.host, port=target.port, **kwargs)  # type: ignore[no-any-return]
