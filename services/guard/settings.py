from __future__ import annotations

from typing import Literal

from pydantic import SecretStr

from bastion_common.settings import CommonSettings
from bastion_common.tokens import load_or_create_key


class GuardSettings(CommonSettings):
    guard_host: str = "127.0.0.1"
    guard_port: int = 50051
    # The longest run of entity-like characters the output filter holds back
    # while waiting to see whether it completes an entity.
    guard_max_holdback: int = 256
    # How redacted values appear: "[EMAIL]", "****", or a stable per-tenant
    # pseudonym "[EMAIL_1a2b3c4d]" (the same value gives the same pseudonym).
    guard_redaction: Literal["label", "mask", "pseudonym"] = "label"
    guard_pseudonym_secret: SecretStr | None = None

    def guard_pseudonym_key(self) -> bytes:
        if self.guard_pseudonym_secret is not None:
            return self.guard_pseudonym_secret.get_secret_value().encode()
        return load_or_create_key(self.data_dir / "keys" / "guard-pseudonym.key").encode()
