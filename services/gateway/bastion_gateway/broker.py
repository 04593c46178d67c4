"""The gateway's Redis side: which models have live workers, queueing a
request, reading its result stream, cancelling, and emitting audit events."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from bastion_common import keys as K
from bastion_common.aio import cancel
from bastion_common.errors import ServiceUnavailableError, TimeoutError_
from bastion_common.messages import AuditEvent, GenerationRequest, ResultRecord

LIVE_CACHE_S = 1.0
READ_BLOCK_MAX_MS = 1000
READ_RETRY_S = 0.2


class Broker:
    def __init__(self, redis: aioredis.Redis, keys: K.Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._live: frozenset[str] = frozenset()
        self._live_at = 0.0
        # Where workers write the results of this gateway's requests.
        self.result_stream = keys.results(uuid.uuid4().hex)
        self._reader = _ResultReader(redis, self.result_stream)

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
        """Start watching for the request's results and queue it."""
        self._reader.watch(request.id)
        try:
            return str(await self.redis.xadd(self.keys.requests(request.model), request.dump()))
        except BaseException:
            self._reader.unwatch(request.id)
            raise

    async def results(self, request: GenerationRequest) -> AsyncIterator[ResultRecord]:
        """The request's records in order, through the final one; raises on the deadline.

        Token records that arrived since the last one was taken are joined into one
        (and into a final ``done`` right behind them), so a reader that fell behind
        catches up with one pass through the output filter instead of one per token.
        """
        box = self._reader.mailbox(request.id)
        # One timer for the whole wait, not one per record: a wait_for per
        # record costs CPU on every token.
        timer = asyncio.get_running_loop().call_later(
            max(0.0, request.deadline - time.time()), box.expire
        )
        try:
            while True:
                await box.ready.wait()
                box.ready.clear()
                if box.expired:
                    raise TimeoutError_(
                        "The request did not finish within the gateway's time limit."
                    )
                if box.error is not None:
                    raise ServiceUnavailableError(
                        "The gateway lost its connection to the queue; the request was stopped.",
                        code="queue_unavailable",
                    ) from box.error
                arrived, box.entries = box.entries, []
                pending: list[str] = []
                for payload in arrived:
                    record = ResultRecord.model_validate_json(payload)
                    if record.kind == "token":
                        pending.append(record.text)
                        continue
                    if pending:
                        if record.kind == "done":
                            record = record.model_copy(
                                update={"text": "".join(pending) + record.text}
                            )
                        else:
                            yield ResultRecord(kind="token", text="".join(pending))
                    yield record
                    return  # every record other than a token is final
                if pending:
                    yield ResultRecord(kind="token", text="".join(pending))
        finally:
            timer.cancel()

    async def cancel(self, request: GenerationRequest) -> None:
        await self.redis.set(request.cancel_key, "1", ex=K.CANCEL_TTL_S)

    async def forget(self, request: GenerationRequest, entry_id: str | None) -> None:
        """Stop watching a finished request and remove its queue entry. A cancel
        mark stays until it expires: the worker may not have seen it yet."""
        self._reader.unwatch(request.id)
        if entry_id is not None:
            await self.redis.xdel(self.keys.requests(request.model), entry_id)

    async def close(self) -> None:
        await self._reader.close()

    async def audit(self, event: AuditEvent) -> None:
        await self.redis.xadd(self.keys.audit, event.dump())


@dataclass(eq=False)
class _Mailbox:
    """What the shared read found for one request, until its reader takes it."""

    entries: list[str] = field(default_factory=list)  # records, as JSON
    error: BaseException | None = None
    expired: bool = False  # the request's deadline passed
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def expire(self) -> None:
        self.expired = True
        self.ready.set()


class _ResultReader:
    """One blocking XREAD of this gateway's result stream, for every request
    it waits on.

    Under load a worker answers every running request in the same step, and
    writes what it has for this gateway's requests as one entry (a field per
    request): one read brings a step's tokens for all of them back, where a
    stream per response cost a command per token in the worker and a key per
    response in each read. A request that joins while the read blocks needs
    no wake-up: its records come on the same stream and end the read. What
    was read is trimmed from the stream with the next read, or before the
    reader goes idle, so no answer's text is left in Redis.
    """

    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self._redis = redis
        self._stream = stream
        self._last = "0-0"  # the last entry read
        self._trimmed = "0-0"  # and the last one trimmed away
        self._boxes: dict[str, _Mailbox] = {}
        self._reading = False  # from sending the read until it returns
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def watch(self, request_id: str) -> None:
        self._boxes[request_id] = _Mailbox()
        self._wanted.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def unwatch(self, request_id: str) -> None:
        self._boxes.pop(request_id, None)

    def mailbox(self, request_id: str) -> _Mailbox:
        return self._boxes[request_id]

    def _trim(self, pipe: Pipeline) -> None:
        """Queue the removal of every entry read so far (IDs below the last one's successor)."""
        if self._trimmed != self._last:
            ms, seq = self._last.split("-")
            pipe.xtrim(self._stream, minid=f"{ms}-{int(seq) + 1}", approximate=False)

    async def _run(self) -> None:
        while True:
            if not self._boxes:
                if self._trimmed != self._last:
                    with contextlib.suppress(RedisError, OSError):  # retried with the next read
                        pipe = self._redis.pipeline(transaction=False)
                        self._trim(pipe)
                        await pipe.execute()
                        self._trimmed = self._last
                self._wanted.clear()
                await self._wanted.wait()
                continue
            waiting = list(self._boxes.values())
            pipe = self._redis.pipeline(transaction=False)
            self._trim(pipe)
            pipe.xread({self._stream: self._last}, block=READ_BLOCK_MAX_MS)
            self._reading = True
            try:
                replies: list[Any] = await pipe.execute()
            except (RedisError, OSError) as exc:
                for box in waiting:  # those of this read, not ones that joined since
                    box.error = exc
                    box.ready.set()
                await asyncio.sleep(READ_RETRY_S)  # Redis is away: retry, not spin
                continue
            finally:
                self._reading = False
            if len(replies) > 1:
                self._trimmed = self._last
            for _, entries in replies[-1] or ():
                for _, fields in entries:
                    for request_id, payload in fields.items():
                        found = self._boxes.get(request_id)
                        if found is not None:  # else forgotten while the read was out
                            found.entries.append(payload)
                            found.ready.set()
                self._last = entries[-1][0]

    async def close(self) -> None:
        await cancel(self._task)
        await self._redis.delete(self._stream)
