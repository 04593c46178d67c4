from __future__ import annotations

from pydantic import Field, SecretStr

from bastion_common.settings import JwtSettings


class AuditorSettings(JwtSettings):
    # A ClickHouse server over HTTP (http://user:password@host:8123/database); when
    # unset, the ClickHouse engine runs in-process (chdb) under data_dir/clickhouse.
    clickhouse_url: SecretStr | None = None
    audit_batch_size: int = Field(256, ge=1)
    # How long the first event of a batch waits for others before the insert.
    audit_flush_ms: int = Field(500, ge=0)
    # The read API for security teams (roles auditor and admin).
    auditor_host: str = "127.0.0.1"
    auditor_port: int = Field(8090, ge=0, le=65535)
    auditor_id: str = "auditor-1"

    def clickhouse_dsn(self) -> str:
        if self.clickhouse_url is not None:
            return self.clickhouse_url.get_secret_value()
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
