from __future__ import annotations

from pydantic import Field

from bastion_common.settings import JwtSettings


class GatewaySettings(JwtSettings):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    guard_target: str = "127.0.0.1:50051"
    guard_timeout_s: float = Field(2.0, gt=0)
    # Models that exist even while no worker serves them (answered 503, not 404).
    models: tuple[str, ...] = ()
    # The model /generate uses when the body names none; else the first live one.
    default_model: str | None = None
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # The whole request, queueing included.
    request_timeout_s: float = Field(300.0, gt=0)
