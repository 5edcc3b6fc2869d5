"""Per-key limits counted once across lorag replicas, in Redis (`[server.limits] backend = "redis"`).

Each decision is one Lua script, so a check and its charge are atomic whichever replica makes
them, and time is Redis's own clock (TIME), so replicas' clocks need not agree:
- requests per minute: a moving window, a sorted set of the admitted requests' times;
- requests in flight: a sorted set of slots, each with a lease (a replica killed mid-request
  cannot hold its slots longer than the lease);
- tokens: a bucket (a hash: level, updated) that a large request may leave in debt.
Keys are `lorag:limits:<kind>:<key id>`; each expires once it no longer limits anything.
A Redis error is raised as SharedLimitsDown; lorag.server.limits decides what happens then.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

PREFIX = "lorag:limits"

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

# KEYS[1]: the window; ARGV: limit, window ms, member. 0 = admitted, else ms until a place frees up.
REQUEST = _NOW_MS + """
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""

# KEYS[1]: the slots; ARGV: limit, lease ms, member. 1 = a slot taken, 0 = all taken.
ACQUIRE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""

# KEYS[1]: the bucket; ARGV: rate per s, capacity, cost. "0" = charged, else seconds to wait (a string:
# Lua numbers come back from Redis as integers).
TAKE = _NOW_MS + """
local rate, capacity, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or capacity)
local updated = tonumber(redis.call('HGET', KEYS[1], 'updated') or now)
level = math.min(capacity, level + (now - updated) / 1000 * rate)
local need = math.min(cost, capacity)
local wait = 0
if level >= need then level = level - cost else wait = (need - level) / rate end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - level) / rate * 1000) + 1000)
return tostring(wait)
"""

# KEYS[1]: the bucket; ARGV: tokens used beyond the reservation (the bucket may go into debt).
SETTLE = """
local level = redis.call('HGET', KEYS[1], 'level')
if level then
  redis.call('HSET', KEYS[1], 'level', tostring(tonumber(level) - tonumber(ARGV[1])))
end
return 0
"""


class SharedLimitsDown(Exception):
    """Redis could not be reached or answered an error: the limit was not decided there."""


class SharedCounts:
    """The Redis side of lorag.server.limits.Limiter: counts only, no policy."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.client: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._request = self.client.register_script(REQUEST)
        self._acquire = self.client.register_script(ACQUIRE)
        self._take = self.client.register_script(TAKE)
        self._settle = self.client.register_script(SETTLE)

    async def request(self, key: str, per_minute: int, member: str) -> float:
        """Admit one request into `key`'s minute: 0, or the seconds until one would be admitted."""
        waited = await self._call(self._request, f"{PREFIX}:requests:{key}", per_minute, 60_000, member)
        return int(waited) / 1000

    async def acquire(self, key: str, limit: int, member: str, lease_s: float) -> bool:
        return bool(await self._call(self._acquire, f"{PREFIX}:slots:{key}", limit, int(lease_s * 1000), member))

    async def release(self, key: str, member: str) -> None:
        try:
            await self.client.zrem(f"{PREFIX}:slots:{key}", member)
        except (RedisError, OSError) as err:
            raise SharedLimitsDown(str(err)) from err

    async def take(self, key: str, cost: float, rate: float, capacity: float) -> float:
        """Charge `cost` tokens: 0, or the seconds until the bucket would let it pass."""
        return float(await self._call(self._take, f"{PREFIX}:tokens:{key}", rate, capacity, cost))

    async def settle(self, key: str, extra: float) -> None:
        await self._call(self._settle, f"{PREFIX}:tokens:{key}", extra)

    async def close(self) -> None:
        await self.client.aclose()

    async def _call(self, script: Any, key: str, *args: Any) -> Any:
        try:
            return await script(keys=[key], args=list(args))
        except (RedisError, OSError) as err:
            raise SharedLimitsDown(str(err) or type(err).__name__) from err
