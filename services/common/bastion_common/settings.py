"""Settings every service shares. Each service extends :class:`CommonSettings`.

Read from the environment (prefix ``BASTION_``) once, in the service's entry
point, and passed down from there.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bastion_common.jwtauth import ClaimNames, JwtVerifier, KeyFile, KeyRing
from bastion_common.keys import Keys
from bastion_common.policy import Policy

MIN_SECRET_BYTES = 32


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BASTION_", extra="ignore", frozen=True)

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = Field("bastion", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    data_dir: Path = Path("var")
    log_level: str = "INFO"
    # The policy (TOML: access, limits, guard actions); Bastion's default when unset.
    policy_file: Path | None = None
    # Lower this service's CPU priority by this much at start-up (bastion_common.priority);
    # `bastion run` sets 10 for the gateway, guard and auditor.
    cpu_nice: int = Field(0, ge=0, le=19)
    # TLS on the internal hops (the guard's gRPC, mutually authenticated, and the
    # auditor's API): the CA both ends trust, and this service's certificate and
    # key. Off when unset; `bastion run` sets them from its local CA.
    internal_tls_ca: Path | None = None
    internal_tls_cert: Path | None = None
    internal_tls_key: Path | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @model_validator(mode="after")
    def _internal_tls_whole(self) -> CommonSettings:
        # The CA alone is fine (a service on no internal hop, such as the worker).
        if (self.internal_tls_cert is None) != (self.internal_tls_key is None) or (
            self.internal_tls_cert is not None and self.internal_tls_ca is None
        ):
            raise ValueError(
                "BASTION_INTERNAL_TLS_CERT and _KEY are set together, with BASTION_INTERNAL_TLS_CA"
            )
        return self

    def internal_tls(self) -> tuple[bytes, bytes, bytes] | None:
        """The internal hops' (CA, certificate, key) in PEM, or None when off."""
        if self.internal_tls_ca is None or self.internal_tls_cert is None:
            return None
        assert self.internal_tls_key is not None  # the validator pairs them
        return (
            self.internal_tls_ca.read_bytes(),
            self.internal_tls_cert.read_bytes(),
            self.internal_tls_key.read_bytes(),
        )

    def policy(self) -> Policy:
        return Policy.load(self.policy_file)


class JwtSettings(CommonSettings):
    """For services that check or mint bearer tokens."""

    # The local HS256 secret (kid "local"), at least 32 bytes; generated under
    # data_dir when unset.
    jwt_secret: SecretStr | None = None
    # Accept tokens signed with the local secret (those `bastion token` mints).
    # Off unless asked for; `bastion run` asks.
    jwt_local_key: bool = False
    # Verification keys in files, e.g. [{"kid": "idp-1", "alg": "RS256", "path": "idp.pem"}].
    jwt_key_files: tuple[KeyFile, ...] = ()
    # A JWKS document: a file path or an https:// URL, cached for jwks_cache_s.
    jwt_jwks: str | None = None
    # CA bundle for the JWKS URL's certificate; the system's when unset.
    jwt_jwks_ca_file: Path | None = None
    jwks_cache_s: float = Field(300.0, gt=0)
    # The longest lifetime a token may have (exp after iat), whoever minted it.
    jwt_max_lifetime_s: float = Field(86400.0, gt=0, le=30 * 86400)
    # Checked when set (an empty value turns the issuer check off).
    jwt_issuer: str = "bastion"
    jwt_audience: str | None = None
    jwt_leeway_s: float = Field(5.0, ge=0, le=300)
    jwt_role_claim: str = "role"
    jwt_tenant_claim: str = "tenant"
    jwt_default_tenant: str = "default"

    @field_validator("jwt_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"the local JWT secret must be at least {MIN_SECRET_BYTES} bytes")
        return value

    @model_validator(mode="after")
    def _identity_provider(self) -> JwtSettings:
        if self.jwt_jwks and "://" in self.jwt_jwks and not self.jwt_jwks.startswith("https://"):
            raise ValueError("BASTION_JWT_JWKS must be an https:// URL or a file path")
        if (self.jwt_jwks or self.jwt_key_files) and not self.jwt_audience:
            # Without it, a token the same identity provider minted for another
            # application would be accepted here.
            raise ValueError(
                "BASTION_JWT_AUDIENCE is required when tokens come from an identity provider"
            )
        return self

    def jwt_key(self) -> str:
        """The HS256 key: from the setting, or the one generated under data_dir."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        from bastion_common.tokens import load_or_create_key

        return load_or_create_key(self.data_dir / "keys" / "jwt-hs256.key")

    def verifier(self, policy: Policy | None = None) -> JwtVerifier:
        """The token checker; ``policy`` (the one the service enforces, loaded
        once) maps identity-provider roles, else the policy is loaded here."""
        tls = None
        if self.jwt_jwks_ca_file is not None:
            tls = ssl.create_default_context(cafile=str(self.jwt_jwks_ca_file))
        keys = KeyRing(
            local_secret=self.jwt_key() if self.jwt_local_key else None,
            files=self.jwt_key_files,
            jwks=self.jwt_jwks,
            jwks_cache_s=self.jwks_cache_s,
            tls=tls,
        )
        claims = ClaimNames(self.jwt_role_claim, self.jwt_tenant_claim, self.jwt_default_tenant)
        return JwtVerifier(
            keys,
            issuer=self.jwt_issuer or None,
            audience=self.jwt_audience,
            leeway_s=self.jwt_leeway_s,
            claims=claims,
            identity_roles=(policy or self.policy()).identity_roles,
            max_lifetime_s=self.jwt_max_lifetime_s,
        )


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S]) -> S:
    """Read settings from the environment; on a bad value, say which and exit 2."""
    try:
        return cls()
    except ValidationError as exc:
        for error in exc.errors():
            where = "_".join(str(p) for p in error["loc"]).upper()
            what = f"setting BASTION_{where}" if where else "settings"
            print(f"bastion: invalid {what}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
