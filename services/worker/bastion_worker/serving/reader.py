"""The request stream's reading side: the worker's registration, its reads
through the consumer group, and taking over what a stopped worker held.

Every entry read comes back as a request ready to queue (:class:`Taken`) or
is dealt with here: an empty one is acknowledged, an unreadable one and one
handed out more than ``max_deliveries`` times are refused with an error on
their gateway's result stream (:mod:`bastion_worker.serving.undelivered`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from pydantic import ValidationError

from bastion_common import keys as K
from bastion_common.aio import Entries, group_entries
from bastion_common.messages import GenerationRequest
from bastion_worker.serving import undelivered
from bastion_worker.settings import WorkerSettings

log = logging.getLogger(__name__)
# How long a request must have sat since it was handed out before another
# worker takes it over: the holder's registration has expired by then.
ORPHAN_IDLE_MS = K.WORKER_TTL_S * 1000


@dataclass(frozen=True, slots=True)
class Taken:
    """A request read from the stream, which this worker must now answer."""

    entry_id: str
    request: GenerationRequest
    # Taken over from a stopped worker after its answer had begun: its text
    # cannot resume where it broke off.
    begun: bool = False


class StreamReader:
    def __init__(self, settings: WorkerSettings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = settings.keys
        self.model = settings.served_name
        self.name = settings.worker_id
        self.stream = self.keys.requests(self.model)

    async def join_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, K.WORKER_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def register(self, stop: asyncio.Event) -> None:
        """Keep this worker's registration alive until ``stop`` is set."""
        key = self.keys.worker(self.model, self.name)
        info = json.dumps({"model": self.model, "max_batch_size": self.settings.max_batch_size})
        while not stop.is_set():
            await self.redis.set(key, info, ex=K.WORKER_TTL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), K.WORKER_HEARTBEAT_S)

    async def unregister(self) -> None:
        await self.redis.delete(self.keys.worker(self.model, self.name))

    async def read(self, count: int, block_ms: int | None = None) -> list[Taken]:
        """Up to ``count`` new requests; ``block_ms``: wait that long for the first."""
        return await self.take(await self.read_entries(count, block_ms))

    async def read_entries(self, count: int, block_ms: int | None = None) -> Entries:
        """Up to ``count`` new entries, not yet taken (see :meth:`take`)."""
        return await self._read(">", count, block_ms)

    def queue_read(self, pipe: aioredis.client.Pipeline, count: int) -> int:
        """Queue a read of up to ``count`` new entries on ``pipe``; its reply's place."""
        pipe.xreadgroup(K.WORKER_GROUP, self.name, {self.stream: ">"}, count=count)
        return len(pipe) - 1

    async def own_pending(self) -> list[Taken]:
        """What this worker had read and not answered in a previous life."""
        entries = await self._read("0", None, None)
        if not entries:
            return []
        pending: list[dict[str, Any]] = await self.redis.xpending_range(
            self.stream, K.WORKER_GROUP, min=entries[0][0], max=entries[-1][0],
            count=len(entries), consumername=self.name,
        )  # fmt: skip
        return await self.take(entries, {p["message_id"]: p["times_delivered"] for p in pending})

    async def orphans(self, free: int) -> list[Taken]:
        """Up to ``free`` requests that a stopped worker had taken: pending for a
        consumer whose registration has expired, and handed out at least
        ``ORPHAN_IDLE_MS`` ago."""
        taken: list[Taken] = []
        summary = await self.redis.xpending(self.stream, K.WORKER_GROUP)
        for consumer in summary["consumers"]:
            name = consumer["name"]
            if free <= 0 or name == self.name:
                continue
            if await self.redis.exists(self.keys.worker(self.model, name)):
                continue  # alive: its requests are its own
            pending: list[dict[str, Any]] = await self.redis.xpending_range(
                self.stream, K.WORKER_GROUP, min="-", max="+", count=free,
                consumername=name, idle=ORPHAN_IDLE_MS,
            )  # fmt: skip
            if not pending:
                continue
            ids = [p["message_id"] for p in pending]
            # The claim is one more delivery.
            deliveries = {p["message_id"]: p["times_delivered"] + 1 for p in pending}
            claimed = cast(
                Entries,
                await self.redis.xclaim(
                    self.stream, K.WORKER_GROUP, self.name, ORPHAN_IDLE_MS, ids
                ),
            )
            log.warning("took over %d request(s) from stopped worker %s", len(claimed), name)
            free -= len(claimed)
            for t in await self.take(claimed, deliveries):
                begun = await self.redis.exists(self.keys.answered(t.request.id))
                taken.append(Taken(t.entry_id, t.request, begun=bool(begun)))
        return taken

    async def take(self, entries: Entries, deliveries: dict[str, int] | None = None) -> list[Taken]:
        """The requests of ``entries``; ``deliveries`` counts how often each was
        handed out (where it may have been before). The rest is dealt with here."""
        taken = []
        for entry_id, fields in entries:
            if await self._dead_lettered(entry_id, fields, (deliveries or {}).get(entry_id, 1)):
                continue
            request = await self._parse(entry_id, fields)
            if request is not None:
                taken.append(Taken(entry_id, request))
        return taken

    async def _read(self, start: str, count: int | None, block_ms: int | None) -> Entries:
        reply = await self.redis.xreadgroup(
            K.WORKER_GROUP, self.name, {self.stream: start}, count=count, block=block_ms
        )
        return group_entries(reply)

    async def _parse(
        self, entry_id: str, fields: dict[str, str] | None
    ) -> GenerationRequest | None:
        """The entry's request; None for one that cannot be served (then
        acknowledged, and answered with an error where it says where to)."""
        pipe = self.redis.pipeline(transaction=False)
        if not fields:  # the gateway already gave up on it and deleted it
            undelivered.ack(pipe, self.stream, entry_id)
            await pipe.execute()
            return None
        try:
            return GenerationRequest.load(fields)
        except (ValidationError, KeyError) as exc:
            log.error("refusing unreadable queue entry %s: %s", entry_id, undelivered.describe(exc))
            undelivered.refuse(pipe, self.stream, entry_id, fields, undelivered.unreadable(exc))
            await pipe.execute()
            return None

    async def _dead_lettered(
        self, entry_id: str, fields: dict[str, str] | None, count: int
    ) -> bool:
        """Whether the entry, delivered ``count`` times, is past
        ``max_deliveries`` (each time, a worker stopped holding it); then it is
        answered with an error, counted, and never delivered again."""
        if count <= self.settings.max_deliveries:
            return False
        log.warning("request entry %s delivered %d times; not tried again", entry_id, count)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.keys.dead_letters, self.model, 1)
        undelivered.refuse(pipe, self.stream, entry_id, fields or {}, undelivered.exhausted(count))
        await pipe.execute()
        return True
