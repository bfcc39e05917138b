"""Revocations in Redis: the Redis broker's database, or the Redis result store's when the broker
(RabbitMQ) keeps none.

Storage layout — one stream, under the ``global_keyprefix`` of the store it belongs to (``P``)::

    key      P_celeriac.revoked          a Redis stream; kombu and Celery never read it
    entry    task_id      the revoked id
             expires_at   UNIX time after which it no longer counts (decimal text)
             terminate    "1": a worker running the task stops it; "0" otherwise
             signal       the signal named with terminate ("SIGTERM"), "" when none
    id       Redis's own, ``<milliseconds>-<n>``: time-ordered, and the readers' cursor

A revoke is one script (:data:`REVOKE_SCRIPT`, atomic): an ``XADD … MAXLEN = <limit>`` (exact)
per id, then the expired entries at the head of the stream (the oldest) are trimmed up to the
first live one (``XTRIM MINID``), and the key is made to expire with its latest entry — so the
stream holds at most ``limit`` entries, no expired one while every revocation has the same
lifetime (one ``worker_revoke_expires`` for every client of a Redis; with several, an expired entry
behind a live one waits for its turn, and readers skip it), and it disappears altogether once its
newest entry expired. Revoking an id again adds another entry; readers keep the latest.

Why a stream rather than a set and pub/sub: a worker follows it with ``XREAD BLOCK`` from the id it
last saw, so it hears of a revoke at once, and after a lost connection it reads exactly what it
missed — pub/sub would drop what was published while it was away. A starting worker loads the
live entries with ``XRANGE``. Needs Redis 6.2 (``XTRIM MINID``, exclusive ``XRANGE`` ranges), as
the Redis broker does.

Driver errors become :class:`~celeriac.exceptions.ConnectionError` (authentication and ACL
refusals :class:`~celeriac.exceptions.ImproperlyConfigured`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from celeriac.brokers._revocations import Revocation, RevocationStore
from celeriac.exceptions import ConnectionError, ImproperlyConfigured
from celeriac.utils.redis_url import RedisTarget, make_client, redis_module

if TYPE_CHECKING:
    import redis.asyncio
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)

#: The stream's name after the ``global_keyprefix``.
KEY = "_celeriac.revoked"
#: Entries read per command when loading or following the stream.
PAGE = 5000
#: Client name of the store's connection.
CLIENT_NAME = "celeriac-revocations"

# KEYS[1]: the stream. ARGV[1]: now (UNIX time), ARGV[2]: the limit, then four values per
# revocation: task_id, expires_at, terminate, signal. Appends them, then removes the expired
# entries at the head (the oldest) up to the first live one, and makes the key expire with its
# latest entry (or deletes it when nothing is live).
REVOKE_SCRIPT = r"""
local key, now, limit = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local latest = now
for i = 3, #ARGV, 4 do
  redis.call('XADD', key, 'MAXLEN', '=', limit, '*', 'task_id', ARGV[i],
             'expires_at', ARGV[i + 1], 'terminate', ARGV[i + 2], 'signal', ARGV[i + 3])
  latest = math.max(latest, tonumber(ARGV[i + 1]))
end
local first_live, start = nil, '-'
while not first_live do
  local page = redis.call('XRANGE', key, start, '+', 'COUNT', 100)
  if #page == 0 then break end
  for _, entry in ipairs(page) do
    local fields, expires = entry[2], nil
    for j = 1, #fields, 2 do
      if fields[j] == 'expires_at' then expires = tonumber(fields[j + 1]) end
    end
    if expires == nil or expires > now then
      first_live = entry[1]
      break
    end
  end
  if not first_live then start = '(' .. page[#page][1] end
end
if not first_live then
  redis.call('DEL', key)
  return 0
end
redis.call('XTRIM', key, 'MINID', first_live)
local wanted, ttl = math.ceil((latest - now) * 1000), redis.call('PTTL', key)
if ttl < 0 or ttl < wanted then redis.call('PEXPIRE', key, wanted) end
return 1
"""


def stream_key(prefix: str) -> str:
    """The stream of revocations under ``global_keyprefix`` ``prefix``."""
    return prefix + KEY


class RedisRevocations(RevocationStore):
    """The revocation stream of one Redis database and key prefix."""

    def __init__(self, target: RedisTarget, prefix: str, role: str) -> None:
        redis_module()  # a clear error when the redis package is missing
        import redis.exceptions as errors

        self.target = target
        self.key = stream_key(prefix)
        self.describe = f"Redis {role} {target.describe()} ({self.key})"
        self._errors: type[Exception] = errors.RedisError
        self._refusals: tuple[type[Exception], ...] = (
            errors.AuthenticationError,
            errors.AuthorizationError,
            errors.NoPermissionError,
        )
        self._client: redis.asyncio.Redis | None = None
        self._script: AsyncScript | None = None
        # A blocking read must return before the socket times out, or it would count as a failure.
        socket_timeout = target.connection.get("socket_timeout")
        self._longest_block = 5.0 if socket_timeout is None else float(socket_timeout) / 2

    async def connect(self) -> None:
        if self._client is not None:
            return
        client = make_client(self.target, client_name=CLIENT_NAME)
        try:
            with self._translate("connect"):
                await client.ping()
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        self._script = None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    def _connected(self) -> redis.asyncio.Redis:
        if self._client is None:
            raise ConnectionError(f"revocations of {self.describe} are not connected")
        return self._client

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._refusals as exc:
            raise ImproperlyConfigured(f"{self.describe} refused {what}: {exc}") from exc
        except (self._errors, OSError) as exc:
            raise ConnectionError(f"{self.describe}: {what} failed: {exc}") from exc

    async def revoke(self, revocations: Sequence[Revocation], *, limit: int) -> None:
        now = time.time()
        args: list[Any] = [repr(now), limit]
        for r in revocations:
            if not r.expired(now):
                args += [r.task_id, repr(r.expires_at), "1" if r.terminate else "0", r.signal or ""]
        if len(args) == 2:
            return
        client = self._connected()
        with self._translate("revoking"):
            if self._script is None:
                self._script = client.register_script(REVOKE_SCRIPT)
            await self._script(keys=[self.key], args=args)

    async def read(self, cursor: str | None, timeout: float) -> tuple[list[Revocation], str]:
        client = self._connected()
        if cursor is None:
            return await self._load(client)
        # Never 0: XREAD BLOCK 0 waits for ever.
        block = max(1, round(min(timeout, self._longest_block) * 1000)) if timeout > 0 else None
        with self._translate("reading revocations"):
            reply: Any = await client.xread({self.key: cursor}, count=PAGE, block=block)
        # RESP2: [[key, entries]]; no reply when nothing came before the block ended.
        entries = reply[0][1] if reply else []
        return self._decode(entries, cursor)

    async def _load(self, client: redis.asyncio.Redis) -> tuple[list[Revocation], str]:
        """Every live entry, page by page; the cursor is the newest id (``0-0`` when empty)."""
        found: list[Revocation] = []
        cursor, start = "0-0", "-"
        while True:
            with self._translate("loading revocations"):
                entries = await client.xrange(self.key, min=start, max="+", count=PAGE) or []
            batch, cursor = self._decode(entries, cursor)
            found += batch
            if len(entries) < PAGE:
                return found, cursor
            start = "(" + cursor

    def _decode(self, entries: Sequence[Any], cursor: str) -> tuple[list[Revocation], str]:
        now = time.time()
        found: list[Revocation] = []
        for entry_id, fields in entries:
            cursor = _text(entry_id)
            revocation = _revocation(fields)
            if revocation is not None and not revocation.expired(now):
                found.append(revocation)
        return found, cursor


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _revocation(fields: dict[Any, Any]) -> Revocation | None:
    """The revocation of a stream entry; None (and a warning) for an entry of another shape."""
    values = {_text(k): _text(v) for k, v in fields.items()}
    task_id = values.get("task_id")
    try:
        expires_at = float(values.get("expires_at", ""))
    except ValueError:
        expires_at = None
    if not task_id or expires_at is None:
        logger.warning("Skipping a revocation entry that is not celeriac's: %r", values)
        return None
    return Revocation(
        task_id,
        expires_at,
        terminate=values.get("terminate") == "1",
        signal=values.get("signal") or None,
    )
