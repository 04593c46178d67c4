"""Tenants cannot see or touch each other: a tenant's admin manages its own
keys only and never mints one above itself; a tenant's auditor reads its own
audit rows only, with a filter or without."""

from __future__ import annotations

import uuid

import aiohttp
import pytest

from tests.e2e.conftest import Platform
from tests.polling import eventually


@pytest.fixture
def tenants() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"tenant-a-{tag}", f"tenant-b-{tag}"


async def _call(
    platform: Platform, method: str, path: str, token: str, body: dict | None = None, url=None
) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"}
    tls = platform.auditor_ssl if url == platform.stack.auditor_url else None
    async with aiohttp.ClientSession(headers=headers) as http:
        target = f"{url or platform.url}{path}"
        async with http.request(method, target, json=body, ssl=tls) as reply:
            return reply.status, await reply.json()


def _admin(platform: Platform, tenant: str) -> str:
    return platform.token(role="admin", subject=f"admin-of-{tenant}", tenant=tenant)


async def _key(platform: Platform, tenant: str, **spec) -> dict:
    body = {"name": "k", "role": "user", **spec}
    status, created = await _call(
        platform, "POST", "/v1/admin/keys", _admin(platform, tenant), body
    )
    assert status == 201, created
    return created


async def test_an_admin_manages_its_own_tenants_keys_only(platform, tenants):
    a, b = tenants
    mine = await _key(platform, a)
    assert mine["tenant"] == a  # the caller's tenant by default
    theirs = await _key(platform, b)
    admin_a = _admin(platform, a)

    status, body = await _call(
        platform, "POST", "/v1/admin/keys", admin_a, {"name": "x", "tenant": b, "role": "user"}
    )
    assert status == 403 and body["error"]["code"] == "tenant_not_allowed"

    status, listed = await _call(platform, "GET", "/v1/admin/keys", admin_a)
    assert status == 200
    assert {r["tenant"] for r in listed["data"]} == {a}
    assert mine["key_id"] in {r["key_id"] for r in listed["data"]}

    status, body = await _call(platform, "DELETE", f"/v1/admin/keys/{theirs['key_id']}", admin_a)
    assert status == 404 and body["error"]["code"] == "key_not_found"
    status, body = await _call(platform, "GET", "/v1/models", theirs["key"])
    assert status == 200, body  # still valid


async def test_nobody_mints_a_key_above_itself(platform, tenants):
    a, _ = tenants
    admin_a = _admin(platform, a)
    for spec in (
        {"role": "admin"},  # could mint more admins
        {"role": "admin", "permissions": ["keys:admin"]},
        {"role": "user", "permissions": ["chat", "platform:admin"]},
    ):
        status, body = await _call(
            platform, "POST", "/v1/admin/keys", admin_a, {"name": "x", **spec}
        )
        assert status == 403 and body["error"]["code"] == "role_not_allowed", (spec, body)
    # An admin-role key without the power over keys is not above its creator.
    narrowed = await _key(platform, a, role="admin", permissions=["chat", "audit:read"])
    status, body = await _call(platform, "GET", "/v1/admin/keys", narrowed["key"])
    assert status == 403


async def _completion(platform: Platform, tenant: str) -> str:
    token = platform.token(subject=f"user-of-{tenant}", tenant=tenant)
    body = {"model": platform.model, "prompt": "Hello", "max_tokens": 2}
    status, reply = await _call(platform, "POST", "/v1/completions", token, body)
    assert status == 200, reply
    return reply["id"].removeprefix("cmpl-")


async def _audit(platform: Platform, reader: str, **filters) -> tuple[int, dict]:
    token = platform.token(role="auditor", subject=f"analyst-of-{reader}", tenant=reader)
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    return await _call(
        platform, "GET", f"/v1/audit/requests?{query}", token, url=platform.stack.auditor_url
    )


async def test_an_auditor_reads_its_own_tenants_rows_only(platform, tenants):
    a, b = tenants
    row_a, row_b = await _completion(platform, a), await _completion(platform, b)

    async def seen_by_b():
        status, body = await _audit(platform, b, id=row_b)
        assert status == 200, body
        return body["data"]

    await eventually(seen_by_b, 15)  # stored: B's own auditor reads it

    status, body = await _audit(platform, a, tenant=b)
    assert status == 403 and body["error"]["code"] == "tenant_not_allowed"
    status, body = await _audit(platform, a, id=row_b)
    assert status == 200 and body["data"] == []

    async def all_of_a():
        status, body = await _audit(platform, a, limit=1000)
        assert status == 200, body
        return body["data"] if row_a in {r["id"] for r in body["data"]} else None

    rows = await eventually(all_of_a, 15)
    assert {r["tenant"] for r in rows} == {a}


async def test_each_service_talks_to_redis_as_its_own_user_and_is_never_refused(platform, aredis):
    """The services run on their ACL users (bastion_common.redis_acl); a
    command a service needs but its user lacks would show in Redis's ACL log."""
    users = {f"{platform.prefix}-{s}" for s in ("gateway", "guard", "worker", "auditor")}
    await _completion(platform, "acl-check")

    async def connected():
        listed = await aredis.execute_command("CLIENT", "LIST")
        seen = {entry.get("user") for entry in listed} if isinstance(listed, list) else set()
        if not seen:  # older clients answer one string
            seen = {f.split("=", 1)[1] for f in str(listed).split() if f.startswith("user=")}
        return users <= seen

    await eventually(connected, 15)
    log = await aredis.execute_command("ACL", "LOG")
    refused = [e for e in log if (e.get("username") if isinstance(e, dict) else None) in users]
    assert refused == []
