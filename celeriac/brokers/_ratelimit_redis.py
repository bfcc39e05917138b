"""Cluster-wide rate limits on Redis (the broker's, or the result store's).

Keys (``P`` is the store's ``global_keyprefix``, empty by default, as for every other key)::

    P_celeriac.rate_limit.<key>   a string: the UNIX time (server clock) at which the next grant
                                  is free, the theoretical arrival time of
                                  :func:`celeriac.utils.rates.gcra`. It expires one second after
                                  that time, when it means no more than an absent key.

A grant is one round trip: :data:`GCRA` reads the key, applies the rule and writes it in one
atomic script, on the server's ``TIME``, so the clocks of the workers' machines do not matter.
kombu and Celery never read these keys. The script is not sent again after a lost reply (it is
not idempotent: it may have taken a grant); the caller sees a ConnectionError and asks again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celeriac.brokers.ratelimit import RateLimiterStore
from celeriac.exceptions import ConnectionError
from celeriac.utils.rates import check_request

__all__ = ["GCRA", "KEY_PREFIX", "RedisRateLimiter"]

#: What follows ``global_keyprefix`` in the key of a limit.
KEY_PREFIX = "_celeriac.rate_limit."

#: KEYS[1]: the limit's key. ARGV[1]: seconds between grants, ARGV[2]: burst. Returns the seconds
#: to wait as a string ("0": a grant was taken); Lua numbers would come back cut to integers.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if tat == nil or tat < now then tat = now end
if tat > now + burst * interval then tat = now + burst * interval end
local allowed_at = tat - (burst - 1) * interval
if now < allowed_at then
  return string.format('%.17g', allowed_at - now)
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.17g', tat),
           'PX', math.ceil((tat - now) * 1000) + 1000)
return '0'
"""


class RedisRateLimiter(RateLimiterStore):
    """Grants decided by a script on the Redis server every worker uses.

    ``client`` returns the store's connected ``redis.asyncio`` client (or raises
    ConnectionError when it is not connected); the script is registered on each new client.
    """

    def __init__(self, client: Callable[[], Any], prefix: str, description: str) -> None:
        self._client = client
        self._prefix = prefix + KEY_PREFIX
        self.description = description
        self._script: Any = None
        self._script_client: Any = None

    def key(self, key: str) -> str:
        """The Redis key of the limit ``key``."""
        return self._prefix + key

    async def acquire(self, key: str, rate: float, burst: int = 1) -> float:
        check_request(key, rate, burst)
        from redis.exceptions import RedisError

        client = self._client()
        if self._script_client is not client:
            self._script = client.register_script(GCRA)
            self._script_client = client
        try:
            reply = await self._script(keys=[self.key(key)], args=[repr(1.0 / rate), burst])
        except (RedisError, OSError) as exc:
            raise ConnectionError(f"rate limit on {self.description}: {exc}") from exc
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        return max(0.0, float(text))
