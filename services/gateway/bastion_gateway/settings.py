from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from bastion_common.settings import JwtSettings


class GatewaySettings(JwtSettings):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # TLS (1.3 only). Plain HTTP needs insecure_http, meant for running behind
    # an ingress that terminates TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    insecure_http: bool = False
    guard_target: str = "127.0.0.1:50051"
    guard_timeout_s: float = Field(2.0, gt=0)
    # Models that exist even while no worker serves them (answered 503, not 404).
    models: tuple[str, ...] = ()
    # The model /generate uses when the body names none; else the first live one.
    default_model: str | None = None
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # The whole request, queueing included.
    request_timeout_s: float = Field(300.0, gt=0)
    # max_tokens when a request gives none (never above the role's ceiling).
    default_max_tokens: int = Field(256, ge=1)
    # Estimated at 4 bytes a token before the worker counts exactly.
    max_prompt_tokens: int = Field(32768, ge=1)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @model_validator(mode="after")
    def _transport(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both BASTION_TLS_CERT_FILE and BASTION_TLS_KEY_FILE, or neither")
        if self.tls_cert_file is None and not self.insecure_http:
            raise ValueError(
                "no TLS certificate configured: set BASTION_TLS_CERT_FILE and "
                "BASTION_TLS_KEY_FILE, or BASTION_INSECURE_HTTP=true behind a TLS-terminating proxy"
            )
        return self
