"""The worker's Redis side: registration, pulling requests from the model's
stream through the consumer group, and publishing results. One task owns the
engine; forward passes run in a thread so the event loop stays responsive."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable

import redis.asyncio as aioredis
from pydantic import ValidationError

from bastion_common import keys as K
from bastion_common.errors import BastionError, InternalError, InvalidRequestError, TimeoutError_
from bastion_common.messages import GenerationRequest, ResultRecord
from bastion_worker.engine import Batch, Engine, Sequence
from bastion_worker.settings import WorkerSettings

log = logging.getLogger(__name__)
READ_BLOCK_MS = 1000


class Consumer:
    def __init__(self, settings: WorkerSettings, engine: Engine, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.keys = settings.keys
        self.model = settings.served_name
        self.stream = self.keys.requests(self.model)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; a batch in progress is finished first."""
        await self._ensure_group()
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        try:
            # Our own unacknowledged entries first (from a previous life), then new ones.
            await self._serve_pending()
            while not stop.is_set():
                entries = await self._read(">")
                if entries:
                    await self._serve(entries)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await self.redis.delete(self.keys.worker(self.model, self.settings.worker_id))

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, K.WORKER_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        key = self.keys.worker(self.model, self.settings.worker_id)
        info = json.dumps({"model": self.model, "max_batch_size": self.settings.max_batch_size})
        while not stop.is_set():
            await self.redis.set(key, info, ex=K.WORKER_TTL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), K.WORKER_HEARTBEAT_S)

    async def _read(self, start: str) -> list[tuple[str, dict[str, str] | None]]:
        reply = await self.redis.xreadgroup(
            K.WORKER_GROUP,
            self.settings.worker_id,
            {self.stream: start},
            count=self.settings.max_batch_size,
            block=None if start != ">" else READ_BLOCK_MS,
        )
        return [entry for _, entries in reply for entry in entries] if reply else []

    async def _serve_pending(self) -> None:
        entries = await self._read("0")
        if entries:
            log.info("resuming %d unacknowledged requests", len(entries))
            await self._serve(entries)

    async def _serve(self, entries: list[tuple[str, dict[str, str] | None]]) -> None:
        requests: list[GenerationRequest] = []
        for entry_id, fields in entries:
            if not fields:  # the gateway already gave up on it and deleted it
                continue
            try:
                requests.append(GenerationRequest.load(fields))
            except (ValidationError, KeyError):
                log.error("dropping malformed queue entry %s", entry_id)
        try:
            await self._serve_batch(requests)
        finally:
            ids = [entry_id for entry_id, _ in entries]
            await self.redis.xack(self.stream, K.WORKER_GROUP, *ids)
            await self.redis.xdel(self.stream, *ids)

    async def _serve_batch(self, requests: list[GenerationRequest]) -> None:
        seqs: dict[str, Sequence] = {}
        for req in requests:
            try:
                seqs[req.id] = self._admit(req)
            except BastionError as exc:
                await self._publish(req, ResultRecord(kind="error", **_error_fields(exc)))
        if not seqs:
            return
        by_id = {r.id: r for r in requests}
        started = time.perf_counter()
        try:
            batch = await asyncio.to_thread(self.engine.prefill, list(seqs.values()))
            await self._flush(batch, by_id)
            while not batch.done:
                await self._apply_cancels(batch, by_id)
                if batch.done:
                    break
                await asyncio.to_thread(self.engine.decode_step, batch)
                await self._flush(batch, by_id)
            await self._flush(batch, by_id)
        except Exception:
            log.exception("batch of %d failed", len(seqs))
            failure = InternalError("The worker failed while generating.", code="worker_error")
            for seq in seqs.values():
                if not seq.published:
                    seq.published = True
                    await self._publish(
                        by_id[seq.request_id], ResultRecord(kind="error", **_error_fields(failure))
                    )
            return
        tokens = sum(len(s.output_ids) for s in seqs.values())
        elapsed = time.perf_counter() - started
        log.info("batch size=%d tokens=%d seconds=%.2f", len(seqs), tokens, elapsed)

    def _admit(self, req: GenerationRequest) -> Sequence:
        if req.model != self.model:
            raise InvalidRequestError(f"This worker serves {self.model!r}, not {req.model!r}.")
        if time.time() > req.deadline:
            raise TimeoutError_("The request waited in the queue past its deadline.")
        lm = self.engine.lm
        if req.messages is not None:
            prompt_ids = lm.encode_chat(req.messages)
            stops = req.params.stop + lm.chat_stops
        else:
            prompt_ids = lm.encode_prompt(req.prompt or "")
            stops = req.params.stop
        room = lm.context_length - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"The prompt is {len(prompt_ids)} tokens; this model's context is "
                f"{lm.context_length} tokens.",
                param="messages" if req.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        wanted = req.params.max_tokens or self.settings.default_max_tokens
        return self.engine.new_sequence(req.id, prompt_ids, req.params, min(wanted, room), stops)

    async def _apply_cancels(self, batch: Batch, by_id: dict[str, GenerationRequest]) -> None:
        live = [s for s in batch.seqs if not s.finished]
        marks = await self.redis.mget([by_id[s.request_id].cancel_key for s in live])
        for seq, mark in zip(live, marks, strict=True):
            if mark is not None:
                self.engine.cancel(seq)

    async def _flush(self, batch: Batch, by_id: dict[str, GenerationRequest]) -> None:
        """Publish every sequence's new text, and the final record of those that ended."""
        pipe = self.redis.pipeline(transaction=False)
        for seq in _needing_publish(batch.seqs):
            req = by_id[seq.request_id]
            text = self.engine.take_text(seq)
            if text:
                _add(pipe, req, ResultRecord(kind="token", text=text))
            if seq.finished:
                done = ResultRecord(
                    kind="done",
                    finish_reason=seq.finish_reason,  # type: ignore[arg-type]
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                )
                _add(pipe, req, done)
                seq.published = True
        await pipe.execute()

    async def _publish(self, req: GenerationRequest, record: ResultRecord) -> None:
        pipe = self.redis.pipeline(transaction=False)
        _add(pipe, req, record)
        await pipe.execute()


def _needing_publish(seqs: Iterable[Sequence]) -> list[Sequence]:
    return [s for s in seqs if not s.published]


def _add(pipe: aioredis.client.Pipeline, req: GenerationRequest, record: ResultRecord) -> None:
    pipe.xadd(req.result_stream, record.dump())
    pipe.expire(req.result_stream, K.RESULT_TTL_S)


def _error_fields(exc: BastionError) -> dict[str, str | None]:
    return {
        "error_type": type(exc).__name__,
        "error_message": exc.message,
        "error_code": exc.code,
    }
