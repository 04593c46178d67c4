"""Settings every service shares. Each service extends :class:`CommonSettings`.

Read from the environment (prefix ``BASTION_``) once, in the service's entry
point, and passed down from there.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bastion_common.keys import Keys


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BASTION_", extra="ignore", frozen=True)

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = Field("bastion", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    data_dir: Path = Path("var")
    log_level: str = "INFO"

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)


class JwtSettings(CommonSettings):
    """For services that check or mint bearer tokens."""

    jwt_secret: SecretStr | None = None
    jwt_issuer: str = "bastion"

    def jwt_key(self) -> str:
        """The HS256 key: from the setting, or the one generated under data_dir."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value()
        from bastion_common.tokens import load_or_create_key

        return load_or_create_key(self.data_dir / "keys" / "jwt-hs256.key")
