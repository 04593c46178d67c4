"""Checking bearer JWTs with PyJWT: HS256, RS256 and ES256 keys, each bound to
its algorithm and found by ``kid``, from the local secret, key files, or a
JWKS document (file or URL, cached, refetched when an unknown ``kid`` shows up).

What is refused: ``alg: none`` and any algorithm but the three; a token whose
``alg`` differs from its key's (so an HS256 token "signed" with an RSA public
key never reaches an HMAC check); unknown ``kid``s; missing ``exp`` or ``sub``;
wrong ``iss``/``aud`` when those are configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
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
    ) -> None:
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
        if self._jwks_source and time.monotonic() - self._jwks_at > self._jwks_cache_s:
            await self._refresh()
        keys = {**self._jwks, **self._static}
        if kid is None:
            # Without a kid, only an unambiguous key ring can say which key is meant.
            return next(iter(keys.values())) if len(keys) == 1 else None
        if kid not in keys and self._jwks_source:
            if time.monotonic() - self._jwks_at > self._jwks_refetch_min_s:  # rotated?
                await self._refresh()
                keys = {**self._jwks, **self._static}
        return keys.get(kid)

    async def _refresh(self) -> None:
        async with self._lock:
            source = self._jwks_source
            assert source is not None
            try:
                doc = await asyncio.to_thread(_read_jwks, source)
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


def _read_jwks(source: str) -> dict[str, Any]:
    if source.startswith(("https://", "http://")):
        with urllib.request.urlopen(source, timeout=5) as reply:
            doc: dict[str, Any] = json.load(reply)
            return doc
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
    ) -> None:
        self._keys = keys
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
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError("The bearer token names no subject.", code="invalid_token")
        role = _claim(claims, self._claims.role)
        tenant = _claim(claims, self._claims.tenant) or self._claims.default_tenant
        return Principal(subject=subject, role=role, tenant=tenant)


def _claim(claims: dict[str, Any], path: str) -> str:
    """A claim by dotted path (``realm_access.roles``); a list gives its first item."""
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else ""
