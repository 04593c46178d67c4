"""Rate limits and token budgets, atomic in Redis so several gateway replicas
share them: requests and tokens per minute (token buckets that refill
continuously), concurrent requests, and a daily token budget: a counter per
UTC date, so a day starts from zero at midnight whatever the traffic.

Each request is admitted against two scopes, its principal and its tenant, in
one Lua script: all checks first, then all updates, so a refusal changes
nothing. Tokens are reserved at admission (estimated prompt tokens plus
max_tokens) and reconciled with the real usage when the request ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from bastion_common.errors import RateLimitError
from bastion_common.keys import Keys, part
from bastion_common.policy import Limits, Policy
from bastion_common.tokens import Principal

# A request that never reconciles (its gateway died) frees its concurrency slot after this.
CONCURRENCY_LEASE_MS = 15 * 60 * 1000

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cost = tonumber(ARGV[1])
local rid = ARGV[2]
local lease = tonumber(ARGV[3])
local day_left_ms = tonumber(ARGV[12])
local function bucket(key, rate, need)
  local s = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(s[1]), tonumber(s[2])
  if tokens == nil then tokens, ts = rate, now end
  tokens = math.min(rate, tokens + (now - ts) * rate / 60000)
  local wait = 0
  if tokens < need then wait = math.ceil((need - tokens) * 60000 / rate) end
  return tokens, wait
end
local plans, out = {}, {}
for i = 0, 1 do
  local k = i * 4
  local a = 4 + i * 4
  local rpm, tpm = tonumber(ARGV[a]), tonumber(ARGV[a+1])
  local conc, daily = tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
  local need = math.min(cost, tpm)
  local p = {}
  if rpm > 0 then
    p.req, p.req_wait = bucket(KEYS[k+1], rpm, 1)
    if p.req_wait > 0 then return {0, 'requests_per_minute', i, p.req_wait} end
  end
  if tpm > 0 then
    p.tok, p.tok_wait = bucket(KEYS[k+2], tpm, need)
    if p.tok_wait > 0 then return {0, 'tokens_per_minute', i, p.tok_wait} end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k+3], '-inf', now)
    if redis.call('ZCARD', KEYS[k+3]) >= conc then return {0, 'concurrent_requests', i, 1000} end
  end
  if daily > 0 then
    local used = tonumber(redis.call('GET', KEYS[k+4]) or '0')
    if used + cost > daily then return {0, 'daily_tokens', i, day_left_ms} end
  end
  p.rpm, p.tpm, p.conc, p.daily, p.need = rpm, tpm, conc, daily, need
  plans[i] = p
end
for i = 0, 1 do
  local k, p = i * 4, plans[i]
  if p.rpm > 0 then
    redis.call('HSET', KEYS[k+1], 'tokens', p.req - 1, 'ts', now)
    redis.call('PEXPIRE', KEYS[k+1], 120000)
  end
  if p.tpm > 0 then
    redis.call('HSET', KEYS[k+2], 'tokens', p.tok - p.need, 'ts', now)
    redis.call('PEXPIRE', KEYS[k+2], 120000)
  end
  if p.conc > 0 then
    redis.call('ZADD', KEYS[k+3], now + lease, rid)
    redis.call('PEXPIRE', KEYS[k+3], lease)
  end
  if p.daily > 0 then
    redis.call('INCRBY', KEYS[k+4], cost)
    -- dated: kept an hour past its day only for refunds of requests still running
    redis.call('PEXPIRE', KEYS[k+4], day_left_ms + 3600000)
  end
end
local p = plans[0]
return {1, '', 0, 0, p.rpm, math.floor((p.req or 1) - 1), p.tpm,
        math.floor((p.tok or p.need) - p.need)}
"""

_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local refund = tonumber(ARGV[1])
local rid = ARGV[2]
for i = 0, 1 do
  local k = i * 4
  local tpm = tonumber(ARGV[3 + i])
  redis.call('ZREM', KEYS[k+3], rid)
  if tpm > 0 and refund ~= 0 and redis.call('EXISTS', KEYS[k+2]) == 1 then
    local tokens = tonumber(redis.call('HGET', KEYS[k+2], 'tokens'))
    redis.call('HSET', KEYS[k+2], 'tokens', math.min(tpm, tokens + refund))
  end
  if refund ~= 0 and redis.call('EXISTS', KEYS[k+4]) == 1 then
    redis.call('DECRBY', KEYS[k+4], refund)
  end
end
return 1
"""


def duration(ms: int) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = math.ceil(ms / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: str
    reserved: int
    headers: dict[str, str]
    day: str  # the UTC date the tokens were charged to, where unused ones go back


class RateLimiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        policy: Policy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.policy = policy
        self.clock = clock  # decides the day; the per-minute buckets use Redis's clock
        self._admit = redis.register_script(_ADMIT)
        self._release = redis.register_script(_RELEASE)

    def _scope_keys(self, principal: Principal, day: str) -> list[str]:
        # Each part encoded, so that no tenant or subject can spell another's key.
        tenant, subject = part(principal.tenant), part(principal.subject)
        scopes = (f"p:{tenant}:{subject}", f"t:{tenant}")
        names = ("req", "tok", "conc", f"day:{day}")
        return [self.keys.limit(s, n) for s in scopes for n in names]

    def _today(self) -> tuple[str, int]:
        """The UTC date now, and the milliseconds left in it."""
        now_ms = int(self.clock() * 1000)
        day = time.strftime("%Y-%m-%d", time.gmtime(now_ms // 1000))
        return day, DAY_MS - now_ms % DAY_MS

    async def admit(self, principal: Principal, request_id: str, cost: int) -> Admission:
        limits = self.policy.limits(principal)
        day, day_left_ms = self._today()
        args: list[Any] = [cost, request_id, CONCURRENCY_LEASE_MS]
        for lim in limits:
            args += [
                lim.requests_per_minute,
                lim.tokens_per_minute,
                lim.concurrent_requests,
                lim.daily_tokens,
            ]
        args.append(day_left_ms)
        reply = await self._admit(keys=self._scope_keys(principal, day), args=args)
        if not int(reply[0]):
            raise _refusal(reply, limits[0])
        rpm, left_req, tpm, left_tok = (int(x) for x in reply[4:8])
        headers = {}
        if rpm:
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, left_req))
            headers["x-ratelimit-reset-requests"] = duration(
                math.ceil((rpm - left_req) * 60000 / rpm)
            )
        if tpm:
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, left_tok))
            headers["x-ratelimit-reset-tokens"] = duration(
                math.ceil((tpm - left_tok) * 60000 / tpm)
            )
        return Admission(request_id, cost, headers, day)

    async def release(self, principal: Principal, admission: Admission, used: int) -> None:
        """Free the concurrency slot; give back reserved tokens that were not used."""
        mine, tenant = self.policy.limits(principal)
        args: list[Any] = [
            admission.reserved - used,
            admission.request_id,
            mine.tokens_per_minute,
            tenant.tokens_per_minute,
        ]
        await self._release(keys=self._scope_keys(principal, admission.day), args=args)


def _refusal(reply: list[Any], mine: Limits) -> RateLimitError:
    limit = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    scope = "tenant" if int(reply[2]) else "principal"
    wait_ms = int(reply[3])
    headers = {}
    for kind, value in (
        ("requests", mine.requests_per_minute),
        ("tokens", mine.tokens_per_minute),
    ):
        if value:
            headers[f"x-ratelimit-limit-{kind}"] = str(value)
    if limit in ("requests_per_minute", "tokens_per_minute") and scope == "principal":
        kind = limit.split("_")[0]
        headers[f"x-ratelimit-remaining-{kind}"] = "0"
        headers[f"x-ratelimit-reset-{kind}"] = duration(wait_ms)
    return RateLimitError(
        f"Rate limit reached: {limit.replace('_', ' ')} for this {scope}.",
        retry_after_s=max(1, math.ceil(wait_ms / 1000)),  # for the budget: midnight UTC
        code=f"{limit}_exceeded",
        headers=headers,
    )
