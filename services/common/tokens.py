"""HS256 bearer tokens: the local deployment's signing key, minting and checking.

A fuller scheme (RS256/ES256, JWKS, API keys) is the gateway-security issue's;
everything that needs a principal goes through :func:`verify`, so it slots in here.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from bastion_common.errors import AuthenticationError

ALGORITHM = "HS256"
LEEWAY_S = 5


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: str
    tenant: str


def load_or_create_key(path: Path) -> str:
    """Read the signing key at ``path``, creating it (mode 0600) on first use."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.encode())
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return key


def mint(key: str, *, subject: str, role: str, tenant: str, issuer: str, ttl_s: int = 3600) -> str:
    now = int(time.time())
    claims = {
        "sub": subject,
        "role": role,
        "tenant": tenant,
        "iss": issuer,
        "iat": now,
        "exp": now + ttl_s,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(token: str, key: str, *, issuer: str) -> Principal:
    """Check the token and return who it names; any flaw is an AuthenticationError."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            issuer=issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "sub", "iss"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthenticationError("The bearer token has expired.", code="token_expired") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError("The bearer token is invalid.", code="invalid_token") from exc
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthenticationError("The bearer token names no subject.", code="invalid_token")
    role = claims.get("role", "user")
    tenant = claims.get("tenant", "default")
    return Principal(subject=subject, role=str(role), tenant=str(tenant))
