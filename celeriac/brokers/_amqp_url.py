"""AMQP 0-9-1 connection parameters: URL parsing and opening one connection.

Shared by the RabbitMQ broker (:mod:`celeriac.brokers.amqp`) and the ``rpc://`` result backend, so
both read ``amqp://`` URLs and their options the same way, as kombu reads them:

* ``amqp://user:password@host:port/vhost`` — every part optional (``guest:guest@localhost:5672``,
  vhost ``/``). The vhost is the URL-decoded path after the first ``/``: ``/%2F`` and ``//`` both
  name ``/``, an empty path means ``/``, ``/prod`` names ``prod``.
* ``amqps://`` (port 5671) is TLS; so is ``amqp://`` with the ``ssl`` option. ``pyamqp://`` (kombu's
  name for the pure-Python client) is ``amqp://``.
* Options come from the query string (``?heartbeat=30&connect_timeout=5&ssl=true``) or from the
  transport options; a query value wins over the transport option of the same name, as in kombu.
  Options this module knows: ``heartbeat`` (seconds, 0 = off; default 60), ``connect_timeout``
  (seconds, default 10), ``ssl`` (``True``, an :class:`ssl.SSLContext`, or a dict of ``ca_certs`` /
  ``certfile`` / ``keyfile`` / ``cert_reqs`` / ``server_hostname``, also spelt ``ca`` / ``cert`` /
  ``key``), ``connection_name`` (shown by ``rabbitmqctl list_connections``). An unknown query
  parameter is refused; unknown transport options are returned for the caller to validate.

:func:`connect` opens one connection with the aiormq client (see :mod:`celeriac.brokers.amqp` for
why aiormq rather than aio-pika) and translates its failures: an unreachable server (or one that
does not answer within ``connect_timeout``) is :class:`~celeriac.exceptions.ConnectionError`; a
refused login or an unknown vhost is :class:`~celeriac.exceptions.ImproperlyConfigured`, since
retrying cannot fix either.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from celeriac.exceptions import ConnectionError, ImproperlyConfigured

if TYPE_CHECKING:
    from aiormq.abc import AbstractConnection

__all__ = ["AMQPParams", "connect", "parse_amqp_url"]

#: URL schemes read as AMQP 0-9-1, and whether each means TLS.
SCHEMES = {"amqp": False, "pyamqp": False, "amqps": True}

DEFAULT_PORT = 5672
DEFAULT_TLS_PORT = 5671
#: Seconds between heartbeats the client asks for (the server may lower it). RabbitMQ's own
#: default is 60; a dead peer is noticed after about two missed heartbeats.
DEFAULT_HEARTBEAT = 60
#: Seconds to wait for the TCP connection and the AMQP handshake.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Options read by this module, from the query string or the transport options.
CONNECTION_OPTIONS = frozenset({"heartbeat", "connect_timeout", "ssl", "connection_name"})

_SSL_KEYS = {
    "ca_certs": "ca_certs",
    "ca": "ca_certs",
    "cafile": "ca_certs",
    "certfile": "certfile",
    "cert": "certfile",
    "keyfile": "keyfile",
    "key": "keyfile",
    "cert_reqs": "cert_reqs",
    "server_hostname": "server_hostname",
    "check_hostname": "check_hostname",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


@dataclass(slots=True, frozen=True)
class AMQPParams:
    """Everything needed to open one AMQP connection; built by :func:`parse_amqp_url`."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    username: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    heartbeat: int = DEFAULT_HEARTBEAT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: The TLS context, or None for a plain TCP connection.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)
    #: Hostname checked against the server certificate (defaults to ``host``).
    server_hostname: str | None = None
    #: Sent as the ``connection_name`` client property (``rabbitmqctl list_connections name``).
    connection_name: str | None = None

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    def display(self) -> str:
        """The URL without the password, for messages and logs."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = "" if self.vhost == "/" else self.vhost
        return f"{scheme}://{self.username}:***@{self.host}:{self.port}/{vhost}"


def parse_amqp_url(
    url: str, transport_options: Mapping[str, Any]
) -> tuple[AMQPParams, dict[str, Any]]:
    """Read an AMQP URL and the connection-level transport options.

    Returns the parameters and the transport options this function did not consume (the caller
    validates those: e.g. the broker's ``prefetch_count``). Raises ImproperlyConfigured, naming the
    offending part, for anything malformed.
    """
    if not isinstance(url, str):
        raise ImproperlyConfigured(f"AMQP URL must be a string, got {url!r}")
    if not isinstance(transport_options, Mapping):
        raise ImproperlyConfigured(
            f"transport options must be a mapping, got {type(transport_options).__name__}"
        )
    if ";" in url:
        raise ImproperlyConfigured(
            "several AMQP URLs separated by ';' (failover) are not supported; give one URL"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImproperlyConfigured(f"malformed AMQP URL {_censor(url)!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ImproperlyConfigured(
            f"not an AMQP URL: scheme {parts.scheme!r} (use amqp://, amqps:// or pyamqp://)"
        )
    if parts.fragment:
        raise ImproperlyConfigured(f"AMQP URL {_censor(url)!r} has a fragment '#…'; remove it")

    options = dict(transport_options)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in CONNECTION_OPTIONS:
            raise ImproperlyConfigured(
                f"unknown parameter {key!r} in AMQP URL query; "
                f"known: {', '.join(sorted(CONNECTION_OPTIONS))}"
            )
        if key in query:
            raise ImproperlyConfigured(f"parameter {key!r} appears twice in the AMQP URL query")
        query[key] = value

    def option(name: str) -> Any:
        # The URL's query wins over a transport option of the same name (kombu's precedence).
        from_options = options.pop(name, None)
        return query.get(name, from_options)

    heartbeat = _heartbeat(option("heartbeat"))
    connect_timeout = _connect_timeout(option("connect_timeout"))
    connection_name = option("connection_name")
    if connection_name is not None and (
        not isinstance(connection_name, str) or not connection_name
    ):
        raise ImproperlyConfigured(
            f"connection_name must be a non-empty string, got {connection_name!r}"
        )

    tls = SCHEMES[scheme]
    host = parts.hostname or "localhost"
    context, server_hostname = _ssl(option("ssl"), tls, host)
    if port is None:
        port = DEFAULT_TLS_PORT if context is not None else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ImproperlyConfigured(f"AMQP port must be 1-65535, got {port}")

    path = parts.path
    # kombu's rule: the vhost is everything after the first '/', URL-decoded; nothing means '/'.
    vhost = unquote(path[1:]) if path.startswith("/") else unquote(path)
    params = AMQPParams(
        host=host,
        port=port,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        vhost=vhost or "/",
        heartbeat=heartbeat,
        connect_timeout=connect_timeout,
        ssl_context=context,
        server_hostname=server_hostname,
        connection_name=connection_name,
    )
    return params, options


async def connect(
    params: AMQPParams,
    *,
    client_properties: Mapping[str, Any] | None = None,
    transport_factory: Any = None,
) -> AbstractConnection:
    """Open one aiormq connection; ConnectionError / ImproperlyConfigured say why it failed.

    ``client_properties`` are added to what the client announces (a ``connection_name`` given here
    wins over ``params.connection_name``). ``transport_factory`` (an aiormq ``TransportFactory``)
    opens the socket instead of the client's own (see :mod:`celeriac.brokers._amqp_tap`).
    """
    try:
        import aiormq
        from aiormq import exceptions as amqp_errors
        from yarl import URL
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImproperlyConfigured(
            "the AMQP transport needs the aiormq client: pip install 'celeriac[amqp]'"
        ) from exc

    url = URL.build(
        scheme="amqps" if params.tls else "amqp",
        host=params.host,
        port=params.port,
        user=params.username,
        password=params.password,
        path="/",
        query={"heartbeat": str(params.heartbeat)},
    )
    properties: dict[str, Any] = {}
    if params.connection_name:
        properties["connection_name"] = params.connection_name
    properties.update(client_properties or {})
    extra: dict[str, Any] = {}
    if transport_factory is not None:
        extra["transport_factory"] = transport_factory
    if params.tls and params.server_hostname:
        extra["server_hostname"] = params.server_hostname
    connection = aiormq.Connection(
        url, context=params.ssl_context, client_properties=properties, **extra
    )
    # Set the vhost ourselves: the client derives it from the URL path with its own quoting rules.
    connection.vhost = params.vhost
    where = params.display()
    try:
        await asyncio.wait_for(connection.connect(), params.connect_timeout)
    except TimeoutError as exc:
        await _close_quietly(connection)
        raise ConnectionError(
            f"AMQP server {where} did not answer within {params.connect_timeout:g} s "
            "(connect_timeout)"
        ) from exc
    except (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError) as exc:
        await _close_quietly(connection)
        raise ImproperlyConfigured(
            f"AMQP server {where} refused the login of user {params.username!r} "
            f"(wrong user or password?): {exc}"
        ) from exc
    except amqp_errors.InvalidFrameError as exc:
        await _close_quietly(connection)
        if "Connection.Close" not in str(exc):
            raise ConnectionError(f"cannot connect to AMQP server {where}: {exc!r}") from exc
        # The server closes the handshake instead of opening the vhost: unknown vhost or no
        # permission on it (the client drops the server's reply text here).
        raise ImproperlyConfigured(
            f"AMQP server {where} refused access to vhost {params.vhost!r} for user "
            f"{params.username!r} (does the vhost exist, with permissions for the user?)"
        ) from exc
    except amqp_errors.ConnectionNotAllowed as exc:
        await _close_quietly(connection)
        raise ImproperlyConfigured(
            f"AMQP server {where} refused access to vhost {params.vhost!r} for user "
            f"{params.username!r} (does the vhost exist, with permissions?): {exc}"
        ) from exc
    except ssl.SSLError as exc:
        await _close_quietly(connection)
        raise ConnectionError(f"TLS handshake with AMQP server {where} failed: {exc}") from exc
    except (OSError, amqp_errors.AMQPError) as exc:
        await _close_quietly(connection)
        raise ConnectionError(f"cannot connect to AMQP server {where}: {exc!r}") from exc
    return connection


async def _close_quietly(connection: AbstractConnection) -> None:
    # A connection that never opened may fail to close; that failure adds nothing.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(connection.close(), 1.0)


def _heartbeat(value: Any) -> int:
    if value is None:
        return DEFAULT_HEARTBEAT
    number = _number("heartbeat", value)
    if not number.is_integer() or not 0 <= number < 65536:
        raise ImproperlyConfigured(
            f"heartbeat must be a whole number of seconds 0-65535 (0 = off), got {value!r}"
        )
    return int(number)


def _connect_timeout(value: Any) -> float:
    if value is None:
        return DEFAULT_CONNECT_TIMEOUT
    number = _number("connect_timeout", value)
    if not math.isfinite(number) or number <= 0:
        raise ImproperlyConfigured(
            f"connect_timeout must be a positive number of seconds, got {value!r}"
        )
    return number


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ImproperlyConfigured(f"{name} must be a number of seconds, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ImproperlyConfigured(f"{name} must be a number of seconds, got {value!r}")


def _ssl(value: Any, tls_scheme: bool, host: str) -> tuple[ssl.SSLContext | None, str | None]:
    """The TLS context for the ``ssl`` option (and the scheme), and the hostname to verify."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            value = True
        elif lowered in _FALSE:
            value = False
        else:
            raise ImproperlyConfigured(f"ssl must be true or false in the URL, got {value!r}")
    if value is None or value is False:
        if tls_scheme and value is False:
            raise ImproperlyConfigured("amqps:// means TLS; ssl=false contradicts it")
        return (_context({}) if tls_scheme else None), None
    if value is True:
        return _context({}), None
    if isinstance(value, ssl.SSLContext):
        return value, None
    if isinstance(value, Mapping):
        settings: dict[str, Any] = {}
        for key, item in value.items():
            canonical = _SSL_KEYS.get(key)
            if canonical is None:
                raise ImproperlyConfigured(
                    f"unknown ssl option {key!r}; known: {', '.join(sorted(_SSL_KEYS))}"
                )
            if canonical in settings:
                raise ImproperlyConfigured(f"ssl option {key!r} is given twice (under two names)")
            settings[canonical] = item
        hostname = settings.get("server_hostname")
        if hostname is not None and (not isinstance(hostname, str) or not hostname):
            raise ImproperlyConfigured(f"ssl server_hostname must be a string, got {hostname!r}")
        return _context(settings), hostname
    raise ImproperlyConfigured(
        f"ssl must be True/False, an ssl.SSLContext or a dict of ca_certs/certfile/keyfile/"
        f"cert_reqs/server_hostname, got {value!r}"
    )


def _context(settings: Mapping[str, Any]) -> ssl.SSLContext:
    for key in ("ca_certs", "certfile", "keyfile"):
        item = settings.get(key)
        if item is not None and (not isinstance(item, str) or not item):
            raise ImproperlyConfigured(f"ssl {key} must be a file path, got {item!r}")
    if settings.get("keyfile") and not settings.get("certfile"):
        raise ImproperlyConfigured("ssl keyfile given without certfile")
    cert_reqs = settings.get("cert_reqs", ssl.CERT_REQUIRED)
    if isinstance(cert_reqs, str):
        names = {"CERT_NONE": ssl.CERT_NONE, "CERT_OPTIONAL": ssl.CERT_OPTIONAL}
        names["CERT_REQUIRED"] = ssl.CERT_REQUIRED
        if cert_reqs.upper() not in names:
            raise ImproperlyConfigured(f"ssl cert_reqs must be one of {sorted(names)}")
        cert_reqs = names[cert_reqs.upper()]
    if cert_reqs not in (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):
        raise ImproperlyConfigured(
            f"ssl cert_reqs must be ssl.CERT_NONE, CERT_OPTIONAL or CERT_REQUIRED, got {cert_reqs!r}"
        )
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=settings.get("ca_certs")
        )
        if settings.get("certfile"):
            context.load_cert_chain(settings["certfile"], settings.get("keyfile"))
    except (OSError, ssl.SSLError) as exc:
        raise ImproperlyConfigured(
            f"cannot load the TLS certificates {dict(settings)}: {exc}"
        ) from exc
    check_hostname = settings.get("check_hostname", cert_reqs != ssl.CERT_NONE)
    if not isinstance(check_hostname, bool):
        raise ImproperlyConfigured(f"ssl check_hostname must be a bool, got {check_hostname!r}")
    if check_hostname and cert_reqs == ssl.CERT_NONE:
        raise ImproperlyConfigured(
            "ssl check_hostname=True needs a verified certificate, not CERT_NONE"
        )
    # Order matters: the hostname check must be off before verification can be turned off.
    context.check_hostname = check_hostname
    context.verify_mode = ssl.VerifyMode(cert_reqs)
    return context


def _censor(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "<unparseable URL>"
