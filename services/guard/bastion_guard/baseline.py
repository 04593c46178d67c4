"""Each tenant's usual prompt size, kept in Redis so every guard replica shares
it: an exponentially weighted mean and variance of estimated prompt tokens,
updated atomically with each request. A prompt far above its tenant's usual
range is an anomaly finding (a score, flag only by default)."""

from __future__ import annotations

import math

import redis.asyncio as aioredis

from bastion_common.keys import Keys

ALPHA = 0.05  # weight of the newest request: roughly the last 20-40 requests
MIN_REQUESTS = 30  # no judgement before the tenant has a history
Z_FLAGGED = 4.0

_UPDATE = """
local s = redis.call('HMGET', KEYS[1], 'n', 'mean', 'var')
local n, mean, var = tonumber(s[1]) or 0, tonumber(s[2]) or 0, tonumber(s[3]) or 0
local x, a = tonumber(ARGV[1]), tonumber(ARGV[2])
if n == 0 then
  redis.call('HSET', KEYS[1], 'n', 1, 'mean', x, 'var', 0)
else
  local d = x - mean
  local m = mean + a * d
  redis.call('HSET', KEYS[1], 'n', n + 1, 'mean', m, 'var', (1 - a) * (var + a * d * d))
end
redis.call('EXPIRE', KEYS[1], 2592000)
return {n, tostring(mean), tostring(var)}
"""


class TenantBaseline:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._update = redis.register_script(_UPDATE)

    async def observe(self, tenant: str, tokens: int) -> float:
        """Record this prompt's size; return its anomaly score (0 when usual)."""
        n, mean, var = await self._update(
            keys=[self._keys.tenant_baseline(tenant)], args=[tokens, ALPHA]
        )
        n, mean, var = int(n), float(mean), float(var)
        if n < MIN_REQUESTS:
            return 0.0
        z = (tokens - mean) / max(math.sqrt(var), 1.0, 0.1 * mean)
        return 0.0 if z < Z_FLAGGED else round(min(1.0, z / (2 * Z_FLAGGED)), 3)
