from __future__ import annotations

from pydantic import Field, SecretStr

from bastion_common.settings import CommonSettings
from bastion_common.tokens import load_or_create_key
from bastion_guard.redact import DEFAULT_MAX_HOLDBACK


class GuardSettings(CommonSettings):
    guard_host: str = "127.0.0.1"
    guard_port: int = 50051
    # The longest run of entity-like characters the output filter holds back
    # while waiting to see whether it completes an entity; a longer one is
    # redacted whole as LONG_TOKEN (it may be a secret whose end has not come).
    guard_max_holdback: int = Field(DEFAULT_MAX_HOLDBACK, ge=64, le=1 << 20)
    # Keys the per-tenant pseudonyms of the "pseudonym" redaction style (policy).
    guard_pseudonym_secret: SecretStr | None = None

    def guard_pseudonym_key(self) -> bytes:
        if self.guard_pseudonym_secret is not None:
            return self.guard_pseudonym_secret.get_secret_value().encode()
        return load_or_create_key(self.data_dir / "keys" / "guard-pseudonym.key").encode()
