"""The gateway's Redis side: which models have live workers, queueing a
request, reading its result stream, cancelling, and emitting audit events."""

from __future__ import annotations

import asyncio
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
        self._reader = _ResultReader(redis, keys.wake(uuid.uuid4().hex))

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
        """Queue the request and start watching its result stream."""
        pipe = self.redis.pipeline(transaction=False)
        self._reader.watch(request.result_stream, pipe)
        pipe.xadd(self.keys.requests(request.model), request.dump())
        try:
            replies = await pipe.execute()
        except BaseException:
            self._reader.unwatch(request.result_stream)
            raise
        return str(replies[-1])

    async def results(self, request: GenerationRequest) -> AsyncIterator[ResultRecord]:
        """The request's records in order, through the final one; raises on the deadline.

        Token records that arrived since the last one was taken are joined into one
        (and into a final ``done`` right behind them), so a reader that fell behind
        catches up with one pass through the output filter instead of one per token.
        """
        box = self._reader.mailbox(request.result_stream)
        while True:
            remaining = request.deadline - time.time()
            if remaining <= 0 or not await _wait(box.ready, remaining):
                raise TimeoutError_("The request did not finish within the gateway's time limit.")
            box.ready.clear()
            if box.error is not None:
                raise ServiceUnavailableError(
                    "The gateway lost its connection to the queue; the request was stopped.",
                    code="queue_unavailable",
                ) from box.error
            arrived, box.entries = box.entries, []
            pending: list[str] = []
            for fields in arrived:
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
        self._reader.unwatch(request.result_stream)
        await pipe.execute()

    async def close(self) -> None:
        await self._reader.close()

    async def audit(self, event: AuditEvent) -> None:
        await self.redis.xadd(self.keys.audit, event.dump())


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        return False
    return True


@dataclass(eq=False)
class _Mailbox:
    """What the shared read found on one result stream, until its reader takes it."""

    last: str = "0-0"
    entries: list[dict[str, str]] = field(default_factory=list)
    error: BaseException | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class _ResultReader:
    """One blocking XREAD over every result stream this gateway waits on.

    Under load the worker writes a token to every stream in the same step, and
    one read brings them all back, where a read per response would cost a round
    trip per token. A stream that joins while the read blocks would wait for it
    to time out, so joining also adds an entry to this gateway's own wake stream,
    which the read includes: either the entry is there before the read starts
    (which then returns at once) or it ends the read.
    """

    def __init__(self, redis: aioredis.Redis, wake_key: str) -> None:
        self._redis = redis
        self._wake_key = wake_key
        self._wake_last = "0-0"
        self._boxes: dict[str, _Mailbox] = {}
        self._reading = False  # from choosing the streams until the read returns
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def watch(self, stream: str, pipe: Pipeline) -> None:
        """Read ``stream`` from now on; ``pipe`` gets the wake entry if one is needed."""
        self._boxes[stream] = _Mailbox()
        if self._reading:
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.expire(self._wake_key, K.WAKE_TTL_S)
        self._wanted.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def unwatch(self, stream: str) -> None:
        self._boxes.pop(stream, None)

    def mailbox(self, stream: str) -> _Mailbox:
        return self._boxes[stream]

    async def _run(self) -> None:
        while True:
            if not self._boxes:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            self._reading = True
            streams: dict[Any, Any] = {s: box.last for s, box in self._boxes.items()}
            streams[self._wake_key] = self._wake_last
            try:
                reply: Any = await self._redis.xread(streams, block=READ_BLOCK_MAX_MS)
            except (RedisError, OSError) as exc:
                for stream in streams:  # the streams of this read, not ones that joined since
                    if (failed := self._boxes.get(stream)) is not None:
                        failed.error = exc
                        failed.ready.set()
                await asyncio.sleep(READ_RETRY_S)  # Redis is away: retry, not spin
                continue
            finally:
                self._reading = False
            for stream, entries in reply or ():
                if stream == self._wake_key:
                    self._wake_last = entries[-1][0]
                    continue
                found = self._boxes.get(stream)
                if found is None:  # forgotten while the read was out
                    continue
                found.last = entries[-1][0]
                found.entries.extend(fields for _, fields in entries)
                found.ready.set()

    async def close(self) -> None:
        await cancel(self._task)
        await self._redis.delete(self._wake_key)
