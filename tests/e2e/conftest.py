"""The whole platform as real processes on free ports: the real Redis, the
embedded ClickHouse engine, the tiny model."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from bastion_cli.stack import Stack, free_port
from bastion_common.tokens import mint

SECRET = "e2e-" + "x" * 44
OFFLINE_MODEL = "offline-model"
MAX_BODY = 64 * 1024


@dataclass
class Platform:
    stack: Stack
    model: str
    prefix: str
    data_dir: Path
    redis_url: str

    @property
    def url(self) -> str:
        return self.stack.gateway_url

    def token(self, role: str = "user", subject: str = "e2e-user", ttl_s: int = 600) -> str:
        return mint(SECRET, subject=subject, role=role, tenant="e2e", issuer="bastion", ttl_s=ttl_s)


@pytest.fixture(scope="session")
def platform(tmp_path_factory, tiny_model_path, redis_url) -> Iterator[Platform]:
    data_dir = tmp_path_factory.mktemp("bastion-data")
    prefix = f"e2e-{uuid.uuid4().hex[:10]}"
    guard_port = free_port()
    env = {
        "BASTION_REDIS_URL": redis_url,
        "BASTION_KEY_PREFIX": prefix,
        "BASTION_DATA_DIR": str(data_dir),
        "BASTION_JWT_SECRET": SECRET,
        "BASTION_MODEL_PATH": str(tiny_model_path),
        "BASTION_PORT": str(free_port()),
        "BASTION_AUDITOR_PORT": str(free_port()),
        "BASTION_GUARD_PORT": str(guard_port),
        "BASTION_GUARD_TARGET": f"127.0.0.1:{guard_port}",
        "BASTION_MODELS": f'["{OFFLINE_MODEL}"]',
        "BASTION_MAX_BODY_BYTES": str(MAX_BODY),
        "BASTION_REQUEST_TIMEOUT_S": "60",
        "BASTION_TORCH_THREADS": "1",
        "BASTION_INSECURE_HTTP": "true",
    }
    stack = Stack(env, log_dir=data_dir / "logs")
    stack.start()
    try:
        stack.wait_ready(120)
        yield Platform(stack, tiny_model_path.name, prefix, data_dir, redis_url)
    finally:
        stack.stop()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()
