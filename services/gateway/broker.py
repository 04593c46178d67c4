"""The gateway's Redis side: which models have live workers, queueing a
request, reading its result stream, cancelling, and emitting audit events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from bastion_common import keys as K
from bastion_common.errors import TimeoutError_
from bastion_common.messages import AuditEvent, GenerationRequest, ResultRecord

LIVE_CACHE_S = 1.0
READ_BLOCK_MAX_MS = 1000


class Broker:
    def __init__(self, redis: aioredis.Redis, keys: K.Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._live: frozenset[str] = frozenset()
        self._live_at = 0.0

    async def live_models(self) -> frozenset[str]:
        """Models with at least one registered worker (cached for a second)."""
        now = time.monotonic()
        if now - self._live_at > LIVE_CACHE_S:
            found = {
                self.keys.model_of_worker_key(key)
                async for key in self.redis.scan_iter(match=self.keys.worker_pattern(), count=100)
            }
            self._live, self._live_at = frozenset(found), now
        return self._live

    async def enqueue(self, request: GenerationRequest) -> str:
        entry_id: Any = await self.redis.xadd(self.keys.requests(request.model), request.dump())
        return str(entry_id)

    async def results(self, request: GenerationRequest) -> AsyncIterator[ResultRecord]:
        """The request's records in order, through the final one; raises on the deadline.

        Token records that arrived together are joined into one (and into a final
        ``done`` right behind them), so a reader that fell behind catches up with
        one pass through the output filter instead of one per token.
        """
        last = "0-0"
        while True:
            remaining_ms = int((request.deadline - time.time()) * 1000)
            if remaining_ms <= 0:
                raise TimeoutError_("The request did not finish within the gateway's time limit.")
            reply: Any = await self.redis.xread(
                {request.result_stream: last}, block=min(remaining_ms, READ_BLOCK_MAX_MS)
            )
            pending: list[str] = []
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    record = ResultRecord.load(fields)
                    if record.kind == "token":
                        pending.append(record.text)
                        continue
                    if record.kind == "done" and pending:
                        record = record.model_copy(update={"text": "".join(pending) + record.text})
                    elif pending:
                        yield ResultRecord(kind="token", text="".join(pending))
                    yield record
                    return  # every record other than a token is final
            if pending:
                yield ResultRecord(kind="token", text="".join(pending))

    async def cancel(self, request: GenerationRequest) -> None:
        await self.redis.set(request.cancel_key, "1", ex=K.CANCEL_TTL_S)

    async def forget(self, request: GenerationRequest, entry_id: str | None) -> None:
        """Remove a finished request's queue entry and result stream. A cancel mark
        stays until it expires: the worker may not have seen it yet."""
        pipe = self.redis.pipeline(transaction=False)
        if entry_id is not None:
            pipe.xdel(self.keys.requests(request.model), entry_id)
        pipe.delete(request.result_stream)
        await pipe.execute()

    async def audit(self, event: AuditEvent) -> None:
        await self.redis.xadd(self.keys.audit, event.dump())
