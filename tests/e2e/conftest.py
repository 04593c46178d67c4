"""The whole platform as real processes on free ports: the real Redis, the
embedded ClickHouse engine, the tiny model."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis

from bastion_cli.stack import Stack, free_port
from bastion_common import redis_acl
from bastion_common.keys import Keys
from bastion_common.tls import ensure_local_tls
from bastion_common.tokens import mint

SECRET = "e2e-" + "x" * 44
AUDIENCE = "bastion-e2e"
OFFLINE_MODEL = "offline-model"
MAX_BODY = 64 * 1024
LIMITED_RPM = 20
POLICY = f"""
[roles.admin]
permissions = ["chat", "completions", "generate", "models:list", "audit:read", "keys:admin",
               "metrics:read"]
models = ["*"]
max_tokens = 4096

[roles.user]
permissions = ["chat", "completions", "generate", "models:list"]
models = ["*"]
max_tokens = 512

[roles.auditor]
permissions = ["audit:read"]
models = []

[tenants."*"]
models = ["*"]

[tenants.other]
models = ["other-*"]

[tenants.limited]
models = ["*"]
[tenants.limited.limits.principal]
requests_per_minute = {LIMITED_RPM}

[limits.principal]
requests_per_minute = 100000
tokens_per_minute = 100000000
concurrent_requests = 64
daily_tokens = 1000000000
"""


@dataclass(frozen=True)
class SigningKeys:
    """Keys of outside issuers the platform trusts: two key files and a JWKS."""

    rsa: Any
    ec: Any
    jwks_rsa: Any
    rsa_public_pem: bytes


def _signing_keys(directory: Path) -> tuple[SigningKeys, dict[str, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def public_pem(key: Any) -> bytes:
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    (directory / "idp-rsa.pem").write_bytes(public_pem(rsa_key))
    (directory / "idp-ec.pem").write_bytes(public_pem(ec_key))
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(jwks_key.public_key()))
    (directory / "jwks.json").write_text(
        json.dumps({"keys": [{**jwk, "kid": "jwks-1", "alg": "RS256"}]})
    )
    (directory / "policy.toml").write_text(POLICY)
    files = [
        {"kid": "idp-rsa", "alg": "RS256", "path": str(directory / "idp-rsa.pem")},
        {"kid": "idp-ec", "alg": "ES256", "path": str(directory / "idp-ec.pem")},
    ]
    env = {
        "BASTION_JWT_KEY_FILES": json.dumps(files),
        "BASTION_JWT_JWKS": str(directory / "jwks.json"),
        "BASTION_JWT_AUDIENCE": AUDIENCE,
        "BASTION_POLICY_FILE": str(directory / "policy.toml"),
    }
    return SigningKeys(rsa_key, ec_key, jwks_key, public_pem(rsa_key)), env


@dataclass
class Platform:
    stack: Stack
    model: str
    prefix: str
    data_dir: Path
    redis_url: str
    signing: SigningKeys
    internal_ca: Path  # the CA of the internal hops: the auditor's API serves HTTPS

    @property
    def url(self) -> str:
        return self.stack.gateway_url

    @property
    def auditor_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.internal_ca))

    def token(
        self, role: str = "user", subject: str = "e2e-user", ttl_s: int = 600, tenant: str = "e2e"
    ) -> str:
        return mint(
            SECRET,
            subject=subject,
            role=role,
            tenant=tenant,
            issuer="bastion",
            ttl_s=ttl_s,
            audience=AUDIENCE,
        )


@pytest.fixture(scope="session")
def platform(tmp_path_factory, tiny_model_path, redis_url) -> Iterator[Platform]:
    data_dir = tmp_path_factory.mktemp("bastion-data")
    signing, auth_env = _signing_keys(tmp_path_factory.mktemp("auth"))
    prefix = f"e2e-{uuid.uuid4().hex[:10]}"
    guard_port = free_port()
    env = {
        "BASTION_REDIS_URL": redis_url,
        "BASTION_KEY_PREFIX": prefix,
        "BASTION_DATA_DIR": str(data_dir),
        "BASTION_JWT_LOCAL_KEY": "true",
        "BASTION_MODEL_PATH": str(tiny_model_path),
        "BASTION_PORT": str(free_port()),
        "BASTION_AUDITOR_PORT": str(free_port()),
        "BASTION_GUARD_PORT": str(guard_port),
        "BASTION_GUARD_TARGET": f"127.0.0.1:{guard_port}",
        "BASTION_MODELS": f'["{OFFLINE_MODEL}"]',
        "BASTION_MAX_BODY_BYTES": str(MAX_BODY),
        "BASTION_REQUEST_TIMEOUT_S": "60",
        "BASTION_TORCH_THREADS": "1",
        # Every step's text sent as it comes: the streaming tests look at many
        # small events, UTF-8 split between them included. The record rate has
        # its own worker test.
        "BASTION_STREAM_RECORDS_PER_S": "0",
        "BASTION_INSECURE_HTTP": "true",
        **auth_env,
    }
    # As bastion run starts them: each service on its own Redis user, the
    # internal hops on TLS, and each secret only where it is used.
    tls = ensure_local_tls(tmp_path_factory.mktemp("tls"))
    env["BASTION_INTERNAL_TLS_CA"] = str(tls.ca_cert)
    passwords = {s: uuid.uuid4().hex * 2 for s in redis_acl.SERVICES}
    urls = redis_acl.service_urls(redis_url, Keys(prefix), passwords)
    service_env = {s: {"BASTION_REDIS_URL": url} for s, url in urls.items()}
    for name in ("gateway", "guard", "auditor"):
        service_env[name]["BASTION_INTERNAL_TLS_CERT"] = str(tls.internal_cert)
        service_env[name]["BASTION_INTERNAL_TLS_KEY"] = str(tls.internal_key)
    for name in ("gateway", "auditor"):
        service_env[name]["BASTION_JWT_SECRET"] = SECRET
    stack = Stack(env, log_dir=data_dir / "logs", service_env=service_env)
    stack.start()
    try:
        stack.wait_ready(120)
        yield Platform(
            stack, tiny_model_path.name, prefix, data_dir, redis_url, signing, tls.ca_cert
        )
    finally:
        stack.stop()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        redis_acl.remove(client, Keys(prefix))
        client.close()


@pytest.fixture(scope="session")
def second_gateway(platform: Platform) -> Iterator[str]:
    """Another gateway replica on the same Redis, guard and workers."""
    port = free_port()
    platform.stack.start_one("gateway-2", {"BASTION_PORT": str(port)}, module="gateway")
    url = f"http://127.0.0.1:{port}"
    platform.stack.wait_ready(60, base_url=url)
    yield url
    platform.stack.stop_one("gateway-2")
