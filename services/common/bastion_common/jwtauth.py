"""Checking bearer JWTs with PyJWT: HS256, RS256 and ES256 keys, each bound to
its algorithm and found by ``kid``, from the local secret, key files, or a
JWKS document (a file or an ``https://`` URL, cached, refetched when an unknown
``kid`` shows up: one fetch at a time, at most one per ``jwks_refetch_min_s``,
never following a redirect).

What is refused: ``alg: none`` and any algorithm but the three; a token whose
``alg`` differs from its key's (so an HS256 token "signed" with an RSA public
key never reaches an HMAC check); unknown ``kid``s; missing ``exp`` or ``sub``;
wrong ``iss``/``aud`` when those are configured; a lifetime (``exp`` after
``iat``, or after now) longer than ``max_lifetime_s``.

An identity provider's role claim is not taken at its word: its values (a
string or a list, matched as a set) map to Bastion roles through the policy
(:attr:`bastion_common.policy.Policy.identity_roles`), the first role in the
policy's order whose values it holds; unknown values are ignored. Tokens of
the local secret, which Bastion mints itself, carry Bastion's role names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from pydantic import BaseModel, ConfigDict

from bastion_common.errors import AuthenticationError
from bastion_common.tokens import LOCAL_KID, Principal

log = logging.getLogger(__name__)
ALGORITHMS = ("HS256", "RS256", "ES256")
Algorithm = Literal["HS256", "RS256", "ES256"]
JWKS_REFETCH_MIN_S = 10.0
MAX_LIFETIME_S = 86400.0


def bearer_token(authorization: str) -> str:
    """The credential of an ``Authorization: Bearer <credential>`` header value."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "Missing bearer token: send 'Authorization: Bearer <token>'.", code="missing_api_key"
        )
    return token


class KeyFile(BaseModel):
    """A verification key in a file: a PEM public key (RS256/ES256) or an HS256 secret."""

    model_config = ConfigDict(frozen=True)
    kid: str
    alg: Algorithm
    path: Path


@dataclass(frozen=True, slots=True)
class BoundKey:
    kid: str
    alg: str
    key: Any  # str/bytes for HS256, a cryptography public key otherwise


@dataclass(frozen=True, slots=True)
class ClaimNames:
    role: str = "role"
    tenant: str = "tenant"
    default_tenant: str = "default"


def _bind_file(spec: KeyFile) -> BoundKey:
    raw = spec.path.read_bytes().strip()
    if spec.alg == "HS256":
        return BoundKey(spec.kid, spec.alg, raw)
    return BoundKey(spec.kid, spec.alg, jwt.PyJWK.from_dict(_pem_to_jwk(raw, spec.alg)).key)


def _pem_to_jwk(pem: bytes, alg: str) -> dict[str, Any]:
    algo = jwt.get_algorithm_by_name(alg)
    key = algo.prepare_key(pem)
    jwk: dict[str, Any] = json.loads(algo.to_jwk(key))
    jwk["alg"] = alg
    return jwk


class KeyRing:
    """All verification keys, by kid."""

    def __init__(
        self,
        *,
        local_secret: str | None = None,
        files: tuple[KeyFile, ...] = (),
        jwks: str | None = None,
        jwks_cache_s: float = 300.0,
        jwks_refetch_min_s: float = JWKS_REFETCH_MIN_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if jwks is not None and "://" in jwks and not jwks.startswith("https://"):
            raise ValueError("a JWKS URL must be https:// (or give a file path)")
        self._static: dict[str, BoundKey] = {}
        if local_secret is not None:
            self._static[LOCAL_KID] = BoundKey(LOCAL_KID, "HS256", local_secret)
        for spec in files:
            self._static[spec.kid] = _bind_file(spec)
        self._jwks_source = jwks
        self._jwks_cache_s = jwks_cache_s
        self._jwks_refetch_min_s = jwks_refetch_min_s
        self._jwks: dict[str, BoundKey] = {}
        self._jwks_at = -1e9
        self._lock = asyncio.Lock()
        self._tls = tls

    async def find(self, kid: str | None, alg: str) -> BoundKey:
        key = await self._lookup(kid)
        if key is None:
            raise AuthenticationError("The token's signing key is unknown.", code="invalid_token")
        if key.alg != alg:
            raise AuthenticationError(
                "The token's algorithm does not match its key.", code="invalid_token"
            )
        return key

    async def _lookup(self, kid: str | None) -> BoundKey | None:
        seen = self._jwks_at
        if self._jwks_source and time.monotonic() - seen > self._jwks_cache_s:
            await self._refresh(seen)
        keys = {**self._jwks, **self._static}
        if kid is None:
            # Without a kid, only an unambiguous key ring can say which key is meant.
            return next(iter(keys.values())) if len(keys) == 1 else None
        seen = self._jwks_at
        if kid not in keys and self._jwks_source:
            if time.monotonic() - seen > self._jwks_refetch_min_s:  # rotated?
                await self._refresh(seen)
                keys = {**self._jwks, **self._static}
        return keys.get(kid)

    async def _refresh(self, seen: float) -> None:
        """Fetch the JWKS, unless another caller did while this one waited
        (``seen``: when the keys were fetched as this caller last looked):
        a burst of unknown ``kid``s costs one fetch, not one each."""
        async with self._lock:
            if self._jwks_at != seen:
                return
            source = self._jwks_source
            assert source is not None
            try:
                doc = await asyncio.to_thread(_read_jwks, source, self._tls)
                keyset = jwt.PyJWKSet.from_dict(doc)
            except (OSError, ValueError, jwt.PyJWKSetError) as exc:
                log.warning("could not load the JWKS (%s); keeping the cached keys", exc)
                self._jwks_at = time.monotonic()
                return
            self._jwks = {
                k.key_id: BoundKey(k.key_id, k.algorithm_name, k.key)
                for k in keyset.keys
                if k.key_id and k.algorithm_name in ALGORITHMS
            }
            self._jwks_at = time.monotonic()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A JWKS is fetched from exactly the URL configured: a redirect is an error."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _read_jwks(source: str, tls: ssl.SSLContext | None = None) -> dict[str, Any]:
    if source.startswith("https://"):
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=tls or ssl.create_default_context()),
            _NoRedirect(),
        )
        try:
            with opener.open(source, timeout=5) as reply:
                doc: dict[str, Any] = json.load(reply)
                return doc
        except urllib.error.HTTPError as exc:  # a redirect lands here too
            exc.close()
            raise OSError(f"the JWKS URL answered {exc.code}") from None
    loaded: dict[str, Any] = json.loads(Path(source).read_text())
    return loaded


class JwtVerifier:
    def __init__(
        self,
        keys: KeyRing,
        *,
        issuer: str | None,
        audience: str | None = None,
        leeway_s: float = 5.0,
        claims: ClaimNames = ClaimNames(),
        identity_roles: Mapping[str, frozenset[str]] | None = None,
        max_lifetime_s: float = MAX_LIFETIME_S,
    ) -> None:
        self._keys = keys
        # Bastion role -> the identity provider's values that grant it, in order.
        self._identity_roles = identity_roles
        self._max_lifetime_s = max_lifetime_s
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        self._claims = claims
        required = ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else [])
        self._options: Any = {"require": required, "verify_aud": audience is not None}

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError(
                "The bearer token is malformed.", code="invalid_token"
            ) from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise AuthenticationError(
                "The token's algorithm is not accepted.", code="invalid_token"
            )
        kid = header.get("kid")
        key = await self._keys.find(kid if isinstance(kid, str) else None, alg)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.alg],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError(
                "The bearer token has expired.", code="token_expired"
            ) from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError(
                "The bearer token is not valid yet.", code="invalid_token"
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError("The bearer token is invalid.", code="invalid_token") from exc
        self._check_lifetime(claims)
        return self._principal(claims, local=key.kid == LOCAL_KID)

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        issued = claims.get("iat")
        start = issued if isinstance(issued, int | float) else time.time()
        if float(claims["exp"]) - float(start) > self._max_lifetime_s + self._leeway:
            raise AuthenticationError(
                f"The bearer token is valid for longer than {self._max_lifetime_s:.0f} s.",
                code="invalid_token",
            )

    def _principal(self, claims: dict[str, Any], local: bool) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError("The bearer token names no subject.", code="invalid_token")
        values = _claim_values(claims, self._claims.role)
        if local or self._identity_roles is None:
            role = next(iter(values)) if len(values) == 1 else ""
        else:
            role = next((r for r, v in self._identity_roles.items() if v & values), "")
        tenants = _claim_values(claims, self._claims.tenant)
        if len(tenants) > 1:
            raise AuthenticationError(
                "The bearer token names several tenants.", code="invalid_token"
            )
        tenant = next(iter(tenants), self._claims.default_tenant)
        return Principal(subject=subject, role=role, tenant=tenant)


def _claim_values(claims: dict[str, Any], path: str) -> frozenset[str]:
    """A claim by dotted path (``realm_access.roles``), as a set of strings."""
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return frozenset({value}) if value else frozenset()
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str) and v)
    return frozenset()
