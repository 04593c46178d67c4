from __future__ import annotations

from pydantic import SecretStr

from bastion_common.settings import CommonSettings
from bastion_common.tokens import load_or_create_key


class GuardSettings(CommonSettings):
    guard_host: str = "127.0.0.1"
    guard_port: int = 50051
    # The longest run of entity-like characters the output filter holds back
    # while waiting to see whether it completes an entity.
    guard_max_holdback: int = 256
    # Keys the per-tenant pseudonyms of the "pseudonym" redaction style (policy).
    guard_pseudonym_secret: SecretStr | None = None

    def guard_pseudonym_key(self) -> bytes:
        if self.guard_pseudonym_secret is not None:
            return self.guard_pseudonym_secret.get_secret_value().encode()
        return load_or_create_key(self.data_dir / "keys" / "guard-pseudonym.key").encode()
