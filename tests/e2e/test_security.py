"""Authentication, authorisation and API keys on the running platform."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from tests.e2e.conftest import AUDIENCE, SECRET, Platform
from tests.polling import eventually


def _claims(**overrides):
    now = int(time.time())
    claims = {"sub": "idp-user", "role": "user", "tenant": "e2e", "iss": "bastion"}
    claims.update(aud=AUDIENCE, iat=now, exp=now + 300)
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict, claims: dict) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _hs256_with_rsa_public_key(platform: Platform, kid: str | None) -> str:
    """The classic algorithm-confusion forgery, built by hand (PyJWT refuses to)."""
    import hashlib
    import hmac

    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    mac = hmac.new(platform.signing.rsa_public_pem, signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{_b64(mac.digest())}"


def _tamper_payload(token: str) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{_b64(json.dumps(_claims(role='admin')).encode())}.{sig}"


def _tamper_signature(token: str) -> str:
    return token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")


def _bad_tokens(platform: Platform) -> dict[str, str | None]:
    rs = platform.signing.rsa
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_ec = ec.generate_private_key(ec.SECP256R1())
    good = jwt.encode(_claims(), rs, algorithm="RS256", headers={"kid": "idp-rsa"})
    return {
        "expired": jwt.encode(
            _claims(exp=int(time.time()) - 120), SECRET, "HS256", {"kid": "local"}
        ),
        "not_yet_valid": jwt.encode(
            _claims(nbf=int(time.time()) + 600), SECRET, "HS256", {"kid": "local"}
        ),
        "wrong_issuer": jwt.encode(_claims(iss="evil"), SECRET, "HS256", {"kid": "local"}),
        "missing_issuer": jwt.encode(_claims(iss=None), SECRET, "HS256", {"kid": "local"}),
        "wrong_audience": jwt.encode(_claims(aud="other-app"), SECRET, "HS256", {"kid": "local"}),
        "idp_token_for_another_app": jwt.encode(
            _claims(aud="other-app", role="admin"),
            rs,
            algorithm="RS256",
            headers={"kid": "idp-rsa"},
        ),
        "lives_a_century": jwt.encode(
            _claims(exp=int(time.time()) + 100 * 365 * 86400), rs, "RS256", {"kid": "idp-rsa"}
        ),
        "missing_audience": jwt.encode(_claims(aud=None), SECRET, "HS256", {"kid": "local"}),
        "missing_sub": jwt.encode(_claims(sub=None), SECRET, "HS256", {"kid": "local"}),
        "missing_exp": jwt.encode(_claims(exp=None), SECRET, "HS256", {"kid": "local"}),
        "wrong_secret": jwt.encode(_claims(), "y" * 48, "HS256", {"kid": "local"}),
        "alg_none": _unsigned({"alg": "none", "typ": "JWT"}, _claims()),
        "alg_none_with_kid": _unsigned({"alg": "none", "kid": "local"}, _claims()),
        "alg_hs384": jwt.encode(_claims(), SECRET, "HS384", {"kid": "local"}),
        "hs256_signed_with_rsa_public_key": _hs256_with_rsa_public_key(platform, "idp-rsa"),
        "hs256_rsa_public_key_no_kid": _hs256_with_rsa_public_key(platform, None),
        "tampered_payload": _tamper_payload(good),
        "tampered_signature": _tamper_signature(good),
        "unknown_kid": jwt.encode(_claims(), rs, algorithm="RS256", headers={"kid": "nobody"}),
        "no_kid_many_keys": jwt.encode(_claims(), rs, algorithm="RS256"),
        "signed_by_stranger": jwt.encode(_claims(), stranger, "RS256", {"kid": "idp-rsa"}),
        "es256_claiming_rsa_kid": jwt.encode(_claims(), other_ec, "ES256", {"kid": "idp-rsa"}),
        "rs256_claiming_ec_kid": jwt.encode(_claims(), rs, "RS256", {"kid": "idp-ec"}),
        "two_segments": good.rsplit(".", 1)[0],
        "garbage": "not-a-token-at-all",
        "malformed_api_key": "bst_123_short",
        "unknown_api_key": "bst_0123456789abcdef_" + "A" * 43,
    }


async def _get(platform: Platform, path: str, headers: dict | None = None, url: str | None = None):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url or platform.url}{path}", headers=headers or {}) as r:
            return r.status, await r.json(), r.headers


def _assert_refused(status, body, expected):
    assert status == expected, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"] and "File " not in body["error"]["message"]


@pytest.mark.parametrize(
    "case",
    [
        "expired", "not_yet_valid", "wrong_issuer", "missing_issuer", "wrong_audience",
        "missing_audience", "missing_sub", "missing_exp", "wrong_secret", "alg_none",
        "alg_none_with_kid", "alg_hs384", "hs256_signed_with_rsa_public_key",
        "hs256_rsa_public_key_no_kid", "tampered_payload", "tampered_signature", "unknown_kid",
        "no_kid_many_keys", "signed_by_stranger", "es256_claiming_rsa_kid",
        "rs256_claiming_ec_kid", "two_segments", "garbage", "malformed_api_key",
        "unknown_api_key", "idp_token_for_another_app", "lives_a_century",
    ],
)  # fmt: skip
async def test_bad_credentials_are_refused(platform, case):
    token = _bad_tokens(platform)[case]
    status, body, headers = await _get(platform, "/v1/models", {"Authorization": f"Bearer {token}"})
    _assert_refused(status, body, 401)
    assert body["error"]["type"] == "authentication_error"
    assert headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("kind", ["RS256 key file", "ES256 key file", "JWKS", "local HS256"])
async def test_tokens_from_another_jwt_implementation_are_accepted(platform, kind):
    keys = {
        "RS256 key file": ("RS256", "idp-rsa", RSAKey.import_key(_pem(platform.signing.rsa))),
        "ES256 key file": ("ES256", "idp-ec", ECKey.import_key(_pem(platform.signing.ec))),
        "JWKS": ("RS256", "jwks-1", RSAKey.import_key(_pem(platform.signing.jwks_rsa))),
        "local HS256": ("HS256", "local", OctKey.import_key(SECRET)),
    }
    alg, kid, key = keys[kind]
    token = jose_jwt.encode({"alg": alg, "kid": kid}, _claims(sub=f"jose-{kid}"), key)
    status, body, _ = await _get(platform, "/v1/models", {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assert platform.model in [m["id"] for m in body["data"]]


def _pem(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def _post(platform, path, token, body, url=None):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.post(f"{url or platform.url}{path}", json=body) as r:
            return r.status, await r.json(), r.headers


def _completion(platform, **extra):
    return {"model": platform.model, "prompt": "hi", "max_tokens": 1, "temperature": 0, **extra}


async def test_auditor_cannot_run_inference(platform):
    status, body, _ = await _post(
        platform, "/v1/completions", platform.token(role="auditor"), _completion(platform)
    )
    _assert_refused(status, body, 403)
    assert "'completions'" in body["error"]["message"] and "role" not in body["error"]["message"]


async def test_user_cannot_administer_keys(platform):
    status, body, _ = await _post(
        platform, "/v1/admin/keys", platform.token(), {"name": "x", "tenant": "e2e", "role": "user"}
    )
    _assert_refused(status, body, 403)
    assert "'keys:admin'" in body["error"]["message"]


async def test_tenant_without_the_model_is_refused_and_does_not_see_it(platform):
    token = platform.token(tenant="other")
    status, body, _ = await _post(platform, "/v1/completions", token, _completion(platform))
    _assert_refused(status, body, 403)
    assert body["error"]["code"] == "model_not_allowed"
    status, body, _ = await _get(platform, "/v1/models", {"Authorization": f"Bearer {token}"})
    assert status == 200 and platform.model not in [m["id"] for m in body["data"]]


async def test_max_tokens_ceiling_per_role(platform):
    status, body, _ = await _post(
        platform, "/v1/completions", platform.token(), _completion(platform, max_tokens=513)
    )
    _assert_refused(status, body, 400)
    assert body["error"]["code"] == "max_tokens_exceeded"


async def test_api_key_life_cycle_across_two_gateways(platform, second_gateway):
    admin = platform.token(role="admin", subject="e2e-admin")
    status, created, _ = await _post(
        platform, "/v1/admin/keys", admin, {"name": "ci-bot", "tenant": "e2e", "role": "user"}
    )
    assert status == 201, created
    key = created["key"]
    assert key.startswith("bst_") and "key_hash" not in created
    for url in (platform.url, second_gateway):
        status, body, _ = await _post(platform, "/v1/completions", key, _completion(platform), url)
        assert status == 200, body
    status, listed, _ = await _get(platform, "/v1/admin/keys", {"Authorization": f"Bearer {admin}"})
    (row,) = [r for r in listed["data"] if r["key_id"] == created["key_id"]]
    assert key not in json.dumps(listed) and "key_hash" not in row
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as http:
        async with http.delete(f"{platform.url}/v1/admin/keys/{created['key_id']}") as r:
            assert r.status == 200
    revoked_at = time.monotonic()
    status, body, _ = await _post(
        platform, "/v1/completions", key, _completion(platform), second_gateway
    )
    assert time.monotonic() - revoked_at < 1.0
    _assert_refused(status, body, 401)
    assert body["error"]["code"] == "api_key_revoked"


async def test_api_key_model_list_and_expiry(platform):
    admin = platform.token(role="admin", subject="e2e-admin")
    spec = {
        "name": "narrow",
        "tenant": "e2e",
        "role": "user",
        "models": ["nothing-*"],
        "ttl_s": 1.5,
    }
    status, created, _ = await _post(platform, "/v1/admin/keys", admin, spec)
    assert status == 201
    status, body, _ = await _post(
        platform, "/v1/completions", created["key"], _completion(platform)
    )
    _assert_refused(status, body, 403)

    async def expired():
        status, body, _ = await _get(
            platform, "/v1/models", {"Authorization": f"Bearer {created['key']}"}
        )
        return status == 401 and body["error"]["code"] == "api_key_expired"

    await eventually(expired, 10)


async def test_metrics_need_their_permission(platform):
    status, body = await _get_text(platform, "/metrics", None)
    assert status == 401
    status, body = await _get_text(platform, "/metrics", platform.token())
    assert status == 403 and "'metrics:read'" in body
    status, body = await _get_text(platform, "/metrics", platform.token(role="admin"))
    assert status == 200
    assert 'bastion_gateway_requests_total{endpoint="completion",status="ok"}' in body


async def _get_text(platform: Platform, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{platform.url}{path}", headers=headers) as r:
            return r.status, await r.text()


def test_a_gateway_trusting_an_identity_provider_will_not_start_without_an_audience(tmp_path):
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    env = {
        **os.environ,
        "BASTION_JWT_JWKS": str(jwks),
        "BASTION_INSECURE_HTTP": "true",
        "BASTION_DATA_DIR": str(tmp_path),
    }
    env.pop("BASTION_JWT_AUDIENCE", None)
    done = subprocess.run(
        [sys.executable, "-m", "bastion_gateway"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "BASTION_JWT_AUDIENCE" in done.stderr
