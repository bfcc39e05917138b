"""Revokes broadcast by Celery on a Redis broker, so ``celery_app.control.revoke(id)`` reaches
celeriac workers too.

Celery's remote control is a kombu *mailbox*: a command is published to the fanout exchange
``celery.pidbox``, which kombu's Redis transport carries by pub/sub on the channel
``P/<db>.celery.pidbox`` (``P`` the ``global_keyprefix``; a routing key, when one is given, is
appended as ``/<key>``). The message is kombu's JSON envelope around
``{"method", "arguments", "destination", "pattern", "matcher", …}``; a revoke's arguments are
``task_id`` (an id or a list), ``terminate`` and ``signal``.

:class:`PidboxRevokes` subscribes to that channel and hands over the ``revoke`` (and
``terminate``) commands meant for every worker or for this one by name. Other commands, and
commands addressed by pattern, are for Celery's workers and are passed over (logged at debug
level). Only json bodies are decoded: a command in another content type is refused unread. As in
Celery, such a revoke reaches the workers listening at that moment and lives in their memory only;
a celeriac client's revoke is stored for every worker instead (:mod:`celeriac.brokers._revocations`).

A lost connection is reopened with backoff; what was published meanwhile is lost, as it is for
Celery's own workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from celeriac import codecs
from celeriac.brokers._redis_layout import (
    Layout,
    MalformedEnvelope,
    decode_envelope,
    parse_envelope,
)
from celeriac.utils.redis_url import RedisTarget, make_client, redis_module

logger = logging.getLogger(__name__)

#: kombu's mailbox exchange of Celery's remote control.
EXCHANGE = "celery.pidbox"
#: Client name of the subscribing connection.
CLIENT_NAME = "celeriac-pidbox"
_JSON = frozenset({"application/json"})


@dataclass(slots=True, frozen=True)
class BroadcastRevoke:
    """One revoke command as Celery sent it (the signal not checked yet)."""

    task_ids: tuple[str, ...]
    terminate: bool
    signal: Any


class PidboxRevokes:
    """The revoke commands Celery broadcasts on one Redis broker, for the worker ``hostname``."""

    def __init__(self, target: RedisTarget, prefix: str, hostname: str) -> None:
        redis_module()
        self.target = target
        self.hostname = hostname
        layout = Layout(prefix=prefix, db=target.db)
        self.channel = layout.fanout_channel(EXCHANGE, "")
        self.patterns = layout.fanout_patterns(EXCHANGE)
        self.describe = f"Celery's broadcasts on {target.describe()} ({self.channel})"
        #: Set while the channel is subscribed: a broadcast from then on is heard.
        self.subscribed = asyncio.Event()

    async def listen(self) -> AsyncIterator[BroadcastRevoke]:
        """The revokes meant for this worker, for as long as the caller iterates."""
        import redis.exceptions

        backoff = 1.0
        while True:
            client = make_client(self.target, client_name=CLIENT_NAME)
            pubsub: Any = client.pubsub()  # redis-py's PubSub is not typed
            try:
                await pubsub.psubscribe(*self.patterns)
                # psubscribe only sends the command: wait for Redis to confirm it.
                while await pubsub.get_message(timeout=1.0) is None:
                    pass
                self.subscribed.set()
                backoff = 1.0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        command = self._command(message.get("data"))
                        if command is not None:
                            yield command
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning(
                    "Lost %s (%s); listening again in %.0fs.", self.describe, exc, backoff
                )
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _command(self, raw: Any) -> BroadcastRevoke | None:
        """The revoke in a published envelope, or None (with a log line saying why)."""
        try:
            if not isinstance(raw, bytes):
                raise MalformedEnvelope(f"not bytes but {type(raw).__name__}")
            message = decode_envelope(parse_envelope(raw), EXCHANGE).message
            body = codecs.loads(message.body, message.content_type, message.content_encoding, _JSON)
        except Exception as exc:  # MalformedEnvelope, ContentDisallowed, DecodeError
            logger.warning("Ignoring a message on %s that cannot be read: %s", self.channel, exc)
            return None
        if not isinstance(body, dict) or body.get("method") not in ("revoke", "terminate"):
            return None  # another command, for Celery's workers
        if body.get("pattern") is not None or body.get("matcher") is not None:
            logger.debug("Passing over a revoke addressed by pattern: %r", body)
            return None
        destination = body.get("destination")
        if destination is not None and self.hostname not in destination:
            return None
        arguments = body.get("arguments")
        if not isinstance(arguments, dict):
            logger.warning("Ignoring a revoke without arguments on %s: %r", self.channel, body)
            return None
        ids = arguments.get("task_id")
        ids = [ids] if isinstance(ids, str) else ids
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            logger.warning("Ignoring a revoke of no valid task id on %s: %r", self.channel, body)
            return None
        terminate = body["method"] == "terminate" or arguments.get("terminate") is True
        return BroadcastRevoke(tuple(ids), terminate, arguments.get("signal"))
