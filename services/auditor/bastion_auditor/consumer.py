"""Reading audit events from their stream and storing them. An event is
acknowledged (and deleted) only after its row was inserted; if the insert
fails, the events stay pending and are retried, so none is lost.

Rows are inserted in batches: after the first new event the consumer keeps
reading for up to ``audit_flush_ms`` (or until a full batch) before one
insert. ClickHouse makes a part per insert, so row-at-a-time inserts cost
about fifty times the CPU per row of a batch of 50."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from bastion_auditor.settings import AuditorSettings
from bastion_auditor.store import AuditStore
from bastion_common import keys as K
from bastion_common.aio import Entries, group_entries
from bastion_common.messages import AuditEvent

log = logging.getLogger(__name__)
READ_BLOCK_MS = 1000
RETRY_S = 1.0


class AuditConsumer:
    def __init__(self, settings: AuditorSettings, store: AuditStore, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.store = store
        self.redis = redis
        self.stream = settings.keys.audit
        self.dead = settings.keys.audit_dead

    async def run(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(aioredis.ResponseError):  # BUSYGROUP: it exists already
            await self.redis.xgroup_create(self.stream, K.AUDITOR_GROUP, id="0", mkstream=True)
        # "0" re-reads what this consumer took but never acknowledged; ">" is new events.
        start = "0"
        batch = self.settings.audit_batch_size
        while not stop.is_set():
            entries = await self._read(start, batch, READ_BLOCK_MS if start == ">" else None)
            if not entries:
                start = ">"
                continue
            if start == ">":  # a full batch, or whatever came within the flush interval
                until = time.monotonic() + self.settings.audit_flush_ms / 1000
                while len(entries) < batch and (left := until - time.monotonic()) > 0:
                    entries += await self._read(">", batch - len(entries), max(1, int(left * 1000)))
            if not await self._store(entries):
                start = "0"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_S)

    async def _read(self, start: str, count: int, block: int | None) -> Entries:
        reply = await self.redis.xreadgroup(
            K.AUDITOR_GROUP,
            self.settings.auditor_id,
            {self.stream: start},
            count=count,
            block=block,
        )
        return group_entries(reply)

    async def _store(self, entries: Entries) -> bool:
        events: list[AuditEvent] = []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, fields in entries:
            try:
                events.append(AuditEvent.load(fields or {}))
            except (ValidationError, KeyError, ValueError):
                log.error("audit entry %s is malformed; moved to %s", entry_id, self.dead)
                kept: dict[Any, Any] = fields or {"empty": "1"}
                pipe.xadd(self.dead, kept)
        try:
            if events:
                await asyncio.to_thread(self.store.insert, events)
        except Exception:
            log.exception("inserting %d audit rows failed; will retry", len(events))
            return False
        ids = [entry_id for entry_id, _ in entries]
        pipe.xack(self.stream, K.AUDITOR_GROUP, *ids)
        pipe.xdel(self.stream, *ids)
        await pipe.execute()
        log.info("stored %d audit rows", len(events))
        return True
