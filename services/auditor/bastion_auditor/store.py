"""The ``inference_logs`` table: one row per request, metadata and hashes only.

clickhouse-connect is synchronous here (its chdb backend has no async client),
so callers run these methods in a thread; one thread at a time uses the client.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import threading
from typing import Any

import clickhouse_connect

from bastion_common.messages import AuditEvent

TABLE = "inference_logs"
DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id String,
    timestamp DateTime64(3, 'UTC'),
    user_id String,
    tenant LowCardinality(String),
    role LowCardinality(String),
    model LowCardinality(String),
    endpoint LowCardinality(String),
    input_hash String,
    output_length UInt32,
    prompt_tokens UInt32,
    completion_tokens UInt32,
    processing_time Float64,
    status LowCardinality(String),
    error_code String,
    guard_verdict LowCardinality(String),
    guard_findings Array(String)
) ENGINE = ReplacingMergeTree
ORDER BY (timestamp, id)
"""
COLUMNS = (
    "id",
    "timestamp",
    "user_id",
    "tenant",
    "role",
    "model",
    "endpoint",
    "input_hash",
    "output_length",
    "prompt_tokens",
    "completion_tokens",
    "processing_time",
    "status",
    "error_code",
    "guard_verdict",
    "guard_findings",
)
FILTERS = {"id": "String", "user_id": "String", "tenant": "String", "input_hash": "String"}


def _row(event: AuditEvent) -> list[Any]:
    values = event.model_dump()
    values["timestamp"] = dt.datetime.fromtimestamp(event.timestamp, tz=dt.UTC)
    values["guard_findings"] = list(event.guard_findings)
    return [values[c] for c in COLUMNS]


class AuditStore:
    def __init__(self, dsn: str) -> None:
        self._client = clickhouse_connect.get_client(dsn=dsn)
        self._lock = threading.Lock()
        with self._lock:
            self._client.command(DDL)
            # Reused for every insert: made afresh, each insert would first ask
            # the engine for the columns' types (a DESCRIBE). Only its data
            # changes, under the lock (it is not thread-safe).
            self._insert = self._client.create_insert_context(TABLE, column_names=list(COLUMNS))
        # clickhouse-connect imports pandas, when installed, on the first insert
        # (to check whether the rows are a DataFrame). That cost 0.3-1 s of CPU,
        # paid in the middle of serving; it is paid here, at start-up, instead.
        with contextlib.suppress(ImportError):
            importlib.import_module("pandas")

    def insert(self, events: list[AuditEvent]) -> None:
        rows = [_row(e) for e in events]
        with self._lock:
            self._insert.data = rows
            self._client.insert(context=self._insert)

    def query(self, filters: dict[str, str], limit: int = 100) -> list[dict[str, Any]]:
        where = " AND ".join(f"{name} = {{{name}:{FILTERS[name]}}}" for name in filters) or "1"
        sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} FINAL WHERE {where} "
        sql += "ORDER BY timestamp DESC LIMIT {limit:UInt32}"
        with self._lock:
            result = self._client.query(sql, parameters={**filters, "limit": limit})
        rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
        for row in rows:
            row["timestamp"] = row["timestamp"].replace(tzinfo=dt.UTC).isoformat()
        return rows

    def close(self) -> None:
        with self._lock:
            self._client.close()
