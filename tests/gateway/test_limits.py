"""The rate limiter's Lua scripts on the real Redis."""

import calendar
import time
import uuid

import pytest

from bastion_common.errors import RateLimitError
from bastion_common.keys import Keys
from bastion_common.policy import Policy
from bastion_common.sizes import estimate_tokens
from bastion_common.tokens import Principal
from bastion_gateway.limits import RateLimiter, duration


def _limiter(aredis, key_prefix, principal=None, tenant=None):
    doc = {"limits": {"principal": principal or {}, "tenant": tenant or {}}}
    return RateLimiter(aredis, Keys(key_prefix), Policy.parse(doc))


def _who(subject="alice", tenant="bank"):
    return Principal(subject=subject, role="user", tenant=tenant)


async def _admit(limiter, principal, cost):
    return await limiter.admit(principal, uuid.uuid4().hex, cost)


async def test_tokens_per_minute_refuses_then_refund_makes_room(aredis, key_prefix):
    limiter = _limiter(aredis, key_prefix, principal={"tokens_per_minute": 1000})
    first = await _admit(limiter, _who(), 600)
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    with pytest.raises(RateLimitError) as info:
        await _admit(limiter, _who(), 600)
    assert info.value.code == "tokens_per_minute_exceeded"
    assert info.value.headers()["x-ratelimit-remaining-tokens"] == "0"
    await limiter.release(_who(), first, used=100)  # 500 of the 600 come back
    await _admit(limiter, _who(), 600)


async def test_concurrency_slot_is_freed_on_release(aredis, key_prefix):
    limiter = _limiter(aredis, key_prefix, principal={"concurrent_requests": 2})
    a = await _admit(limiter, _who(), 1)
    await _admit(limiter, _who(), 1)
    with pytest.raises(RateLimitError) as info:
        await _admit(limiter, _who(), 1)
    assert info.value.code == "concurrent_requests_exceeded"
    await limiter.release(_who(), a, used=1)
    await _admit(limiter, _who(), 1)


async def test_daily_budget_counts_actual_usage(aredis, key_prefix):
    limiter = _limiter(aredis, key_prefix, principal={"daily_tokens": 100})
    a = await _admit(limiter, _who(), 80)
    await limiter.release(_who(), a, used=30)
    await _admit(limiter, _who(), 70)  # 30 + 70 = 100 fits
    with pytest.raises(RateLimitError) as info:
        await _admit(limiter, _who(), 1)
    assert info.value.code == "daily_tokens_exceeded"
    assert info.value.retry_after_s <= 86400


async def test_tenant_limit_spans_its_principals_and_a_refusal_changes_nothing(aredis, key_prefix):
    limiter = _limiter(aredis, key_prefix, tenant={"requests_per_minute": 3})
    for subject in ("a", "b", "c"):
        await _admit(limiter, _who(subject), 1)
    with pytest.raises(RateLimitError) as info:
        await _admit(limiter, _who("d"), 1)
    assert "tenant" in info.value.message
    # Another tenant is untouched, and the refused request reserved nothing.
    await _admit(limiter, _who("d", tenant="hospital"), 1)
    keys = [k async for k in aredis.scan_iter(match=f"{key_prefix}:limit:p:bank:d:*")]
    assert keys == []


async def test_unlimited_policy_admits_without_state(aredis, key_prefix):
    limiter = _limiter(aredis, key_prefix)
    admission = await _admit(limiter, _who(), 10**9)
    assert admission.headers == {}
    assert [k async for k in aredis.scan_iter(match=f"{key_prefix}:*")] == []


def test_reset_durations_and_estimates():
    assert [duration(20), duration(1000), duration(1500), duration(360000)] == [
        "20ms",
        "1s",
        "2s",
        "6m0s",
    ]
    assert estimate_tokens(0) == 1 and estimate_tokens(9) == 3


class _Clock:
    def __init__(self, at: str) -> None:
        self.now = calendar.timegm(time.strptime(at, "%Y-%m-%d %H:%M:%S"))

    def __call__(self) -> float:
        return self.now


async def test_the_daily_budget_resets_at_midnight_utc_and_not_before(aredis, key_prefix):
    clock = _Clock("2026-12-08 23:59:58")
    doc = {"limits": {"principal": {"daily_tokens": 100}}}
    limiter = RateLimiter(aredis, Keys(key_prefix), Policy.parse(doc), clock=clock)
    late = await _admit(limiter, _who(), 100)
    with pytest.raises(RateLimitError) as info:
        await _admit(limiter, _who(), 1)
    assert info.value.retry_after_s == 2  # the reset is midnight, as Retry-After says
    clock.now += 1.5  # 23:59:59.5: still the same day
    with pytest.raises(RateLimitError):
        await _admit(limiter, _who(), 1)
    clock.now += 0.5  # 00:00:00
    today = await _admit(limiter, _who(), 100)  # a fresh day, whatever came before
    # A request charged yesterday gives its unused tokens back to yesterday.
    await limiter.release(_who(), late, used=0)
    with pytest.raises(RateLimitError):
        await _admit(limiter, _who(), 1)
    await limiter.release(_who(), today, used=40)
    await _admit(limiter, _who(), 60)


async def test_subjects_and_tenants_with_separators_do_not_share_limits(aredis, key_prefix):
    limiter = _limiter(aredis, key_prefix, principal={"requests_per_minute": 1})
    await _admit(limiter, _who(subject="c", tenant="a:b"), 1)
    await _admit(limiter, _who(subject="b:c", tenant="a"), 1)  # its own bucket
    with pytest.raises(RateLimitError):
        await _admit(limiter, _who(subject="c", tenant="a:b"), 1)
