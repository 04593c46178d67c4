"""API keys for services that cannot do JWT.

A key looks like ``bst_<id>_<secret>``: the id finds the record, the secret is
256 random bits. Only the key's SHA-256 is stored, with its tenant, role,
models, permissions and expiry, in Redis, so every gateway replica sees a
revocation on the next request. A slow password hash (bcrypt, argon2) buys
nothing for 256-bit random secrets and would cost milliseconds per request;
the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from bastion_common.errors import AuthenticationError, NotFoundError
from bastion_common.keys import Keys
from bastion_common.tokens import Principal

PREFIX = "bst_"
_KEY_ID = r"[0-9a-f]{16}"
_SHAPE = re.compile(rf"^bst_({_KEY_ID})_([A-Za-z0-9_-]{{43}})$")


class ApiKeyRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: int = 1
    key_id: str
    name: str = Field(max_length=128)
    key_hash: str
    tenant: str
    role: str
    models: tuple[str, ...] | None = None
    permissions: tuple[str, ...] | None = None
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def public(self) -> dict[str, Any]:
        """What listing shows: everything but the hash."""
        return self.model_dump(exclude={"key_hash"})


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_api_key(token: str) -> bool:
    return token.startswith(PREFIX)


class ApiKeyStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def create(
        self,
        *,
        name: str,
        tenant: str,
        role: str,
        models: tuple[str, ...] | None = None,
        permissions: tuple[str, ...] | None = None,
        ttl_s: float | None = None,
    ) -> tuple[str, ApiKeyRecord]:
        """Create a key; the returned secret is shown once and never stored."""
        key_id = secrets.token_hex(8)
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        record = ApiKeyRecord(
            key_id=key_id,
            name=name,
            key_hash=_digest(key),
            tenant=tenant,
            role=role,
            models=models,
            permissions=permissions,
            created_at=now,
            expires_at=now + ttl_s if ttl_s else None,
        )
        await self.redis.set(self.keys.api_key(key_id), record.model_dump_json())
        return key, record

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        raw = await self.redis.get(self.keys.api_key(key_id))
        return ApiKeyRecord.model_validate_json(raw) if raw else None

    async def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        """Every key, or ``tenant``'s only."""
        out = []
        async for name in self.redis.scan_iter(match=self.keys.api_key("*"), count=200):
            raw = await self.redis.get(name)
            if raw:
                record = ApiKeyRecord.model_validate_json(raw)
                if tenant is None or record.tenant == tenant:
                    out.append(record)
        return sorted(out, key=lambda r: r.created_at)

    async def revoke(self, key_id: str, tenant: str | None = None) -> ApiKeyRecord:
        """Revoke a key (of ``tenant`` only, when given: another tenant's key is
        answered as if it did not exist, so its id tells nothing)."""
        record = await self.get(key_id) if re.fullmatch(_KEY_ID, key_id) else None
        if record is None or (tenant is not None and record.tenant != tenant):
            raise NotFoundError(f"There is no API key '{key_id}'.", code="key_not_found")
        revoked = record.model_copy(update={"revoked_at": time.time()})
        await self.redis.set(self.keys.api_key(key_id), revoked.model_dump_json())
        return revoked

    async def verify(self, key: str) -> Principal:
        shape = _SHAPE.match(key)
        record = await self.get(shape.group(1)) if shape else None
        # Compare even when there is no record, so timing does not tell ids apart.
        expected = record.key_hash if record else _digest("")
        if not hmac.compare_digest(expected, _digest(key)) or record is None:
            raise AuthenticationError("The API key is invalid.", code="invalid_api_key")
        if record.revoked_at is not None:
            raise AuthenticationError("The API key has been revoked.", code="api_key_revoked")
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise AuthenticationError("The API key has expired.", code="api_key_expired")
        return Principal(
            subject=f"key:{record.key_id}",
            role=record.role,
            tenant=record.tenant,
            models=record.models,
            permissions=frozenset(record.permissions) if record.permissions is not None else None,
            key_id=record.key_id,
        )
