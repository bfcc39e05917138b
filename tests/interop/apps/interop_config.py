"""Settings shared by the real-Celery and the celeriac interop apps.

Both projects use Celery's setting names, so one dictionary configures either side. Worker
processes read it from ``INTEROP_*`` environment variables (:func:`settings_from_env`); the test
process builds its client apps from the same function with explicit arguments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

#: Workers and clients accept the three serializers the interop tests send. Pickle and msgpack
#: are never on by default in either project, so listing them here is the explicit opt-in.
ACCEPT = ["json", "msgpack", "pickle"]


def settings(
    broker_url: str,
    result_backend: str,
    *,
    queue: str,
    keyprefix: str | None = None,
    default_exchange: str | None = None,
    default_routing_key: str | None = None,
    broker_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Celery-named settings for one side of an interop test.

    ``keyprefix`` isolates a test run on Redis: kombu, Celery's Redis result store and celeriac's
    Redis transports all prefix every key they write with ``global_keyprefix``, so it is given to
    whichever of the broker and the result store is a Redis (an AMQP broker has no such option
    and refuses it).
    """
    transport: dict[str, Any] = dict(broker_options or {})
    results: dict[str, Any] = {}
    if keyprefix:
        if broker_url.startswith("redis"):
            transport["global_keyprefix"] = keyprefix
        if result_backend.startswith("redis"):
            results["global_keyprefix"] = keyprefix
    conf: dict[str, Any] = {
        "broker_url": broker_url,
        "result_backend": result_backend,
        "broker_transport_options": transport,
        "result_backend_transport_options": results,
        "task_default_queue": queue,
        "accept_content": list(ACCEPT),
        "result_serializer": "json",
    }
    if default_exchange:
        conf["task_default_exchange"] = default_exchange
    if default_routing_key:
        conf["task_default_routing_key"] = default_routing_key
    return conf


def settings_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """:func:`settings` from ``INTEROP_*`` variables (how the worker subprocesses are told)."""
    try:
        broker_url = environ["INTEROP_BROKER_URL"]
        result_backend = environ["INTEROP_RESULT_BACKEND"]
        queue = environ["INTEROP_QUEUE"]
    except KeyError as exc:
        raise RuntimeError(f"interop app: environment variable {exc} is not set") from None
    return settings(
        broker_url,
        result_backend,
        queue=queue,
        keyprefix=environ.get("INTEROP_KEYPREFIX") or None,
        default_exchange=environ.get("INTEROP_DEFAULT_EXCHANGE") or None,
        default_routing_key=environ.get("INTEROP_DEFAULT_ROUTING_KEY") or None,
        broker_options=json.loads(environ.get("INTEROP_BROKER_OPTIONS") or "{}"),
    )
