"""JWKS over HTTP (a real server on loopback) with key rotation, and the policy."""

import asyncio
import json
import ssl
import time

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from bastion_common.errors import AuthenticationError, PermissionDeniedError
from bastion_common.jwtauth import JwtVerifier, KeyRing
from bastion_common.policy import Policy
from bastion_common.tls import ensure_local_tls, server_context
from bastion_common.tokens import Principal


def _jwk(key, kid):
    return {
        **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())),
        "kid": kid,
        "alg": "RS256",
    }


@pytest.fixture(scope="module")
def local_tls(tmp_path_factory):
    return ensure_local_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def trust(local_tls):
    """A client context that trusts the local CA."""
    return ssl.create_default_context(cafile=str(local_tls.ca_cert))


@pytest.fixture
async def jwks_server(local_tls):
    """A JWKS over HTTPS on loopback; ``state["redirect"]`` makes it answer 302."""
    state = {"keys": [], "fetches": 0, "redirect": None, "delay": 0.0}

    async def serve(request):
        state["fetches"] += 1
        await asyncio.sleep(state["delay"])
        if state["redirect"]:
            raise web.HTTPFound(state["redirect"])
        return web.json_response({"keys": state["keys"]})

    app = web.Application()
    app.router.add_get("/jwks", serve)
    app.router.add_get("/elsewhere", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    context = server_context(local_tls.cert, local_tls.key)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}/jwks", state
    await runner.cleanup()


def _token(key, kid, **claims):
    body = {"sub": "svc", "iss": "idp", "exp": int(time.time()) + 60, "role": "user", **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


async def test_jwks_url_keys_rotate_by_kid(jwks_server, trust):
    url, state = jwks_server
    old, new = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    state["keys"] = [_jwk(old, "2026-01")]
    ring = KeyRing(jwks=url, jwks_cache_s=300, jwks_refetch_min_s=0, tls=trust)
    verifier = JwtVerifier(ring, issuer="idp")
    assert (await verifier.verify(_token(old, "2026-01"))).subject == "svc"
    await verifier.verify(_token(old, "2026-01"))
    assert state["fetches"] == 1  # cached
    state["keys"] = [_jwk(new, "2026-02")]  # the IdP rotates
    assert (await verifier.verify(_token(new, "2026-02"))).role == "user"
    assert state["fetches"] == 2
    with pytest.raises(AuthenticationError):
        await verifier.verify(_token(old, "2026-02"))  # old key, new kid: bad signature


async def test_claim_names_are_configurable_and_nested(jwks_server, trust):
    from bastion_common.jwtauth import ClaimNames

    url, state = jwks_server
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    state["keys"] = [_jwk(key, "k")]
    roles = {"admin": frozenset({"admin"}), "auditor": frozenset({"auditor"}),
             "user": frozenset({"user"})}  # fmt: skip
    verifier = JwtVerifier(
        KeyRing(jwks=url, tls=trust), issuer="idp",
        claims=ClaimNames("realm_access.roles", "org"), identity_roles=roles,
    )  # fmt: skip
    token = _token(key, "k", realm_access={"roles": ["user", "auditor"]}, org="hospital")
    principal = await verifier.verify(token)
    # A list claim is a set: the first role in the policy's order that it holds.
    assert (principal.role, principal.tenant) == ("auditor", "hospital")


async def test_identity_provider_values_map_to_roles_through_the_policy(jwks_server, trust):
    import tomllib

    url, state = jwks_server
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    state["keys"] = [_jwk(key, "k")]
    policy = Policy.parse(
        tomllib.loads(OPERATOR_POLICY + '[identity.roles]\nadmin = ["ops"]\nuser = ["staff"]\n')
    )
    verifier = JwtVerifier(
        KeyRing(jwks=url, tls=trust), issuer="idp", identity_roles=policy.identity_roles
    )

    async def role(value):
        return (await verifier.verify(_token(key, "k", role=value))).role

    assert await role(["staff", "unknown-group"]) == "user"
    assert await role(["staff", "ops"]) == "admin"
    assert await role("admin") == ""  # the IdP's "admin" is not Bastion's admin
    assert await role(["nothing"]) == ""
    with pytest.raises(ValueError):
        Policy.parse(tomllib.loads('[identity.roles]\nroot = ["x"]\n'))


async def test_jwks_is_https_only_fetched_once_for_a_burst_and_never_redirected(jwks_server, trust):
    url, state = jwks_server
    with pytest.raises(ValueError):
        KeyRing(jwks=url.replace("https://", "http://"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    state["keys"], state["delay"] = [_jwk(key, "k")], 0.2
    # No minimum interval here, so that only the single flight limits the fetches.
    eager = JwtVerifier(KeyRing(jwks=url, tls=trust, jwks_refetch_min_s=0), issuer="idp")
    await eager.verify(_token(key, "k"))
    fetched = state["fetches"]
    # Twenty tokens with unknown kids at once: one fetch, not twenty.
    results = await asyncio.gather(
        *(eager.verify(_token(key, f"unknown-{i}")) for i in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(r, AuthenticationError) for r in results)
    assert state["fetches"] - fetched == 1
    # With the default minimum interval, unknown kids one after another fetch nothing.
    spaced = JwtVerifier(KeyRing(jwks=url, tls=trust), issuer="idp")
    await spaced.verify(_token(key, "k"))
    fetched = state["fetches"]
    for i in range(5):
        with pytest.raises(AuthenticationError):
            await spaced.verify(_token(key, f"unknown-{i}"))
    assert state["fetches"] == fetched
    # A redirect is not followed: the keys stay as they were.
    state["redirect"], state["delay"] = url.replace("/jwks", "/elsewhere"), 0.0
    ring = KeyRing(jwks=url, tls=trust)
    with pytest.raises(AuthenticationError):
        await JwtVerifier(ring, issuer="idp").verify(_token(key, "k"))
    assert state["fetches"] == fetched + 1


async def test_a_token_living_longer_than_the_cap_is_refused(trust):
    key = "k" * 40
    ring = KeyRing(local_secret=key)
    verifier = JwtVerifier(ring, issuer="bastion", max_lifetime_s=3600)
    from bastion_common.tokens import mint

    ok = mint(key, subject="a", role="user", tenant="t", issuer="bastion", ttl_s=3600)
    assert (await verifier.verify(ok)).role == "user"
    long = mint(
        key, subject="a", role="user", tenant="t", issuer="bastion", ttl_s=100 * 365 * 86400
    )
    with pytest.raises(AuthenticationError):
        await verifier.verify(long)


POLICY = {
    "roles": {
        "user": {"permissions": ["chat"], "models": ["llama-*", "gemma-*"], "max_tokens": 100},
        "auditor": {"permissions": ["audit:read"], "models": []},
    },
    "tenants": {"*": {"models": ["*"]}, "lab": {"models": ["gemma-*"]}},
    "limits": {"principal": {"requests_per_minute": 10}},
}


def test_model_must_be_allowed_by_role_tenant_and_key():
    policy = Policy.parse(POLICY)
    user = Principal(subject="a", role="user", tenant="bank")
    assert policy.allows_model(user, "llama-3") and not policy.allows_model(user, "mistral")
    lab = Principal(subject="a", role="user", tenant="lab")
    assert policy.allows_model(lab, "gemma-3") and not policy.allows_model(lab, "llama-3")
    narrow = Principal(subject="k", role="user", tenant="bank", models=("llama-3",))
    assert policy.allows_model(narrow, "llama-3") and not policy.allows_model(narrow, "llama-4")
    with pytest.raises(PermissionDeniedError) as info:
        policy.require_model(lab, "llama-3")
    assert info.value.code == "model_not_allowed"


def test_permissions_and_unknown_roles():
    policy = Policy.parse(POLICY)
    policy.require(Principal(subject="a", role="user", tenant="t"), "chat")
    for principal, permission in [
        (Principal(subject="a", role="auditor", tenant="t"), "chat"),
        (Principal(subject="a", role="nobody", tenant="t"), "chat"),
        (Principal(subject="a", role="user", tenant="t", permissions=frozenset()), "chat"),
    ]:
        with pytest.raises(PermissionDeniedError) as info:
            policy.require(principal, permission)
        assert "'chat'" in info.value.message


def test_unknown_permission_in_policy_is_a_start_up_error():
    with pytest.raises(ValueError, match="unknown permissions"):
        Policy.parse({"roles": {"x": {"permissions": ["chat", "root"]}}})


def test_default_policy_loads_and_tenant_overrides_merge():
    assert {"admin", "user", "auditor"} <= set(Policy.load().roles)
    doc = {
        **POLICY,
        "tenants": {"big": {"models": ["*"], "limits": {"principal": {"daily_tokens": 5}}}},
    }
    policy = Policy.parse(doc)
    mine, _ = policy.limits(Principal(subject="a", role="user", tenant="big"))
    assert (mine.requests_per_minute, mine.daily_tokens) == (10, 5)


OPERATOR_POLICY = """
[roles.operator]
permissions = ["platform:admin", "keys:admin", "audit:read"]
models = []
max_tokens = 0

[roles.admin]
permissions = ["chat", "models:list", "audit:read", "keys:admin"]
models = ["*"]
max_tokens = 8192

[roles.user]
permissions = ["chat", "models:list"]
models = ["*"]
max_tokens = 2048

[roles.big]
permissions = ["chat"]
models = ["*"]
max_tokens = 100000
"""


def _scoped() -> Policy:
    import tomllib

    return Policy.parse(tomllib.loads(OPERATOR_POLICY))


def test_only_the_platform_permission_spans_tenants():
    policy = _scoped()
    admin = Principal(subject="a", role="admin", tenant="a")
    operator = Principal(subject="o", role="operator", tenant="ops")
    policy.require_tenant(admin, "a")
    with pytest.raises(PermissionDeniedError):
        policy.require_tenant(admin, "b")
    policy.require_tenant(operator, "b")
    assert not policy.spans_tenants(admin) and policy.spans_tenants(operator)
    # a key narrowed below the permission does not span
    narrowed = Principal(subject="k", role="operator", tenant="ops", permissions=frozenset())
    assert not policy.spans_tenants(narrowed)
    default = Policy.load()
    assert not any("platform:admin" in r.permissions for r in default.roles.values())


def test_a_key_is_never_minted_above_its_creator():
    policy = _scoped()
    admin = Principal(subject="a", role="admin", tenant="a")
    policy.require_mintable(admin, "user", None)
    policy.require_mintable(admin, "admin", ("chat", "audit:read"))  # without keys:admin
    for role, permissions in (
        ("admin", None),  # keys:admin: only the operator makes administrators
        ("user", ("chat", "platform:admin")),
        ("big", None),  # a higher max_tokens ceiling
        ("nope", None),
    ):
        with pytest.raises(PermissionDeniedError):
            policy.require_mintable(admin, role, permissions)
    user_key = Principal(
        subject="k", role="admin", tenant="a", permissions=frozenset({"keys:admin"})
    )
    with pytest.raises(PermissionDeniedError):  # its key lacks chat
        policy.require_mintable(user_key, "user", None)
    policy.require_mintable(Principal(subject="o", role="operator", tenant="ops"), "admin", None)
