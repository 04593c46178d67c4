"""The principal, and the local deployment's HS256 signing key and token minting.

Checking tokens (any issuer, any of the accepted algorithms) is
:mod:`bastion_common.jwtauth`'s.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

ALGORITHM = "HS256"
# The key id of the local deployment's HS256 secret, as minted by `bastion token`.
LOCAL_KID = "local"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking. API keys may narrow what their role allows."""

    subject: str
    role: str
    tenant: str
    models: tuple[str, ...] | None = None
    permissions: frozenset[str] | None = None
    key_id: str | None = None


def load_or_create_key(path: Path) -> str:
    """Read the signing key at ``path``, creating it (mode 0600, 48 random bytes)
    on first use. The key is written whole to a file of its own, then linked
    into place, so a process starting at the same moment reads the whole key or
    none, never an empty file; of two racing creators, the first link wins."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(staging, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        staging.unlink()
    return key


def mint(
    key: str,
    *,
    subject: str,
    role: str,
    tenant: str,
    issuer: str,
    ttl_s: int = 3600,
    audience: str | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "role": role,
        "tenant": tenant,
        "iss": issuer,
        "iat": now,
        "exp": now + ttl_s,
    }
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": LOCAL_KID})
