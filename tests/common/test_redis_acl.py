"""Each service's Redis user, on the real Redis: what it may and may not touch."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator

import pytest
import redis

from bastion_common import redis_acl
from bastion_common.keys import Keys


@pytest.fixture
def users(redis_url: str) -> Iterator[tuple[Keys, dict[str, redis.Redis]]]:
    """Every service's user for a fresh key prefix, removed afterwards."""
    keys = Keys(f"acl-{uuid.uuid4().hex[:10]}")
    admin = redis.Redis.from_url(redis_url)
    passwords = {s: secrets.token_urlsafe(32) for s in redis_acl.SERVICES}
    redis_acl.provision(admin, keys, passwords)
    clients = {
        s: redis.Redis.from_url(
            redis_acl.service_url(redis_url, redis_acl.user_name(keys, s), passwords[s])
        )
        for s in redis_acl.SERVICES
    }
    try:
        yield keys, clients
    finally:
        for client in clients.values():
            client.close()
        redis_acl.remove(admin, keys)
        for key in admin.scan_iter(match=f"{keys.prefix}:*"):
            admin.delete(key)
        admin.close()


def _denied(call) -> bool:  # type: ignore[no-untyped-def]
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_the_worker_cannot_read_keys_or_the_audit_trail_nor_queue_requests(users):
    keys, c = users
    c["gateway"].set(keys.api_key("k1"), '{"role": "admin"}')
    worker = c["worker"]
    assert _denied(lambda: worker.get(keys.api_key("k1")))
    assert _denied(lambda: worker.set(keys.api_key("forged"), '{"role": "admin"}'))
    assert _denied(lambda: worker.xadd(keys.requests("m"), {"x": "1"}))
    assert _denied(lambda: worker.xreadgroup("auditors", "w", {keys.audit: ">"}))
    assert _denied(lambda: worker.xread({keys.results("g"): "0"}))  # another's results
    # What it needs works.
    c["gateway"].xadd(keys.requests("m"), {"x": "1"})
    worker.xgroup_create(keys.requests("m"), "workers", id="0")
    assert worker.xreadgroup("workers", "w", {keys.requests("m"): ">"})
    worker.xadd(keys.results("g"), {"r": "done"})


def test_only_the_auditor_consumes_the_audit_stream(users):
    keys, c = users
    c["gateway"].xadd(keys.audit, {"event": "1"})
    assert _denied(lambda: c["gateway"].xread({keys.audit: "0"}))  # appends only
    assert _denied(lambda: c["gateway"].xgroup_create(keys.audit, "auditors", id="0"))
    c["auditor"].xgroup_create(keys.audit, "auditors", id="0")
    assert c["auditor"].xreadgroup("auditors", "a", {keys.audit: ">"})
    assert _denied(lambda: c["auditor"].get(keys.api_key("k1")))


def test_the_guard_sees_only_its_statistics(users):
    keys, c = users
    guard = c["guard"]
    assert _denied(lambda: guard.get(keys.api_key("k1")))
    assert _denied(lambda: guard.xadd(keys.requests("m"), {"x": "1"}))
    assert _denied(lambda: guard.keys("*"))
    guard.hset(keys.tenant_baseline("t"), "n", 1)


def test_a_service_url_carries_its_user():
    url = redis_acl.service_url("redis://127.0.0.1:6379/0", "p-worker", "a/b:c")
    assert url == "redis://p-worker:a%2Fb%3Ac@127.0.0.1:6379/0"
    assert (
        redis_acl.service_url("rediss://old:pw@cache:6380", "u", "p") == "rediss://u:p@cache:6380"
    )
