"""The embedded Valkey of `bastion run`: a password on its default user, and an
append-only file, so API keys survive its restart."""

from __future__ import annotations

import secrets
import urllib.parse

import pytest
import redis
import redis.asyncio as aioredis

from bastion_cli.stack import embedded_valkey
from bastion_common.keys import Keys
from bastion_gateway.apikeys import ApiKeyStore


async def test_a_restarted_embedded_valkey_keeps_the_api_keys(tmp_path):
    password = secrets.token_urlsafe(32)
    keys = Keys("restart")
    with embedded_valkey(tmp_path / "valkey", password=password) as url:
        where = urllib.parse.urlsplit(url)
        assert where.username == "default"
        with redis.Redis(host=where.hostname, port=where.port) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.get("x")
        client = aioredis.from_url(url)
        key, _ = await ApiKeyStore(client, keys).create(name="k", tenant="t", role="user")
        await client.aclose()
    with embedded_valkey(tmp_path / "valkey", password=password) as url:
        client = aioredis.from_url(url)
        principal = await ApiKeyStore(client, keys).verify(key)
        await client.aclose()
    assert (principal.tenant, principal.role) == ("t", "user")
