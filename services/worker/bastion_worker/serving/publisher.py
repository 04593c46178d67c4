"""The results side: each step's new text, one entry per gateway result stream
holding a field per request, and each request's one final record.

A request's text is held back until ``rows / stream_records_per_s`` seconds
have passed since its last record (its first token and its end go at once):
every record costs the gateway, guard and client CPU, so fast steps' tokens
go a few at a time, as with vLLM's ``--stream-interval``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from bastion_common import keys as K
from bastion_common.errors import BastionError, InternalError
from bastion_common.messages import GenerationRequest, ResultRecord
from bastion_worker.engine.core import Engine
from bastion_worker.engine.sequence import Batch, Sequence
from bastion_worker.serving import undelivered
from bastion_worker.settings import WorkerSettings

STEP_FAILED = InternalError("The worker failed while generating this request.", code="worker_error")


@dataclass
class Ticket:
    """A request this worker has taken from the stream and must answer."""

    request: GenerationRequest
    entry_id: str
    seq: Sequence
    arrived: float
    # When the result stream's expiry and the answered mark were last pushed back.
    ttl_set: float = 0.0
    # When this request's text was last published; None before its first token.
    sent_at: float | None = None
    # Failed steps this request was in: it is then prefilled on its own, and
    # fails at the step loop's MAX_STRIKES.
    strikes: int = 0


class Publisher:
    def __init__(self, settings: WorkerSettings, redis: aioredis.Redis, stream: str) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = settings.keys
        self.stream = stream  # the request stream, where answered entries are acknowledged

    def collect(
        self, engine: Engine, batch: Batch | None, running: Mapping[str, Ticket]
    ) -> tuple[aioredis.client.Pipeline, list[Ticket]]:
        """Queue every running sequence's new text, or its final record if it
        ended (then it counts as published), on a pipeline not yet sent; the
        tickets that ended. Their entries are acknowledged after their final record."""
        pipe = self.redis.pipeline(transaction=False)
        ended: list[Ticket] = []
        if batch is None:
            return pipe, ended
        entries: dict[str, dict[Any, Any]] = {}
        now = time.monotonic()
        rate = self.settings.stream_records_per_s
        interval = len(batch.seqs) / rate if rate else 0.0
        for seq in batch.seqs:
            if seq.published:
                continue
            ticket = running[seq.request_id]
            if not seq.finished and ticket.sent_at is not None and now - ticket.sent_at < interval:
                continue  # held back: sent with a later step's text, or with its end
            text = engine.take_text(seq)
            if seq.finished:
                record = final_record(seq, text)
            elif text:
                record = ResultRecord(kind="token", text=text)
                ticket.sent_at = now
            else:
                continue
            request = ticket.request
            entries.setdefault(request.result_stream, {})[request.id] = record.model_dump_json()
            if seq.finished:
                seq.published = True
                ended.append(ticket)
            elif now - ticket.ttl_set > K.RESULT_TTL_S / 4:  # not on every token
                self._answering(pipe, ticket)
                ticket.ttl_set = now
        for stream, fields in entries.items():
            pipe.xadd(stream, fields)
        for ticket in ended:
            undelivered.ack(pipe, self.stream, ticket.entry_id)
            if ticket.ttl_set:
                pipe.delete(self.keys.answered(ticket.request.id))
        return pipe, ended

    def _answering(self, pipe: aioredis.client.Pipeline, ticket: Ticket) -> None:
        """Keep the result stream, and the mark that the answer has begun, alive."""
        pipe.expire(ticket.request.result_stream, K.RESULT_TTL_S)
        pipe.set(self.keys.answered(ticket.request.id), "1", ex=K.RESULT_TTL_S)

    async def fail(self, tickets: list[Ticket], error: BastionError = STEP_FAILED) -> None:
        """End each ticket's answer with ``error`` (unless it has ended) and let it go."""
        for ticket in tickets:
            if not ticket.seq.published:
                ticket.seq.published = True
                await self.publish(ticket.request, ResultRecord.failure(error))
            await self.done(ticket.entry_id)
            if ticket.ttl_set:
                await self.redis.delete(self.keys.answered(ticket.request.id))

    async def publish(self, request: GenerationRequest, record: ResultRecord) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(request.result_stream, record.entry(request.id))
        pipe.expire(request.result_stream, K.RESULT_TTL_S)
        await pipe.execute()

    async def done(self, entry_id: str) -> None:
        """Acknowledge and delete a request's entry."""
        pipe = self.redis.pipeline(transaction=False)
        undelivered.ack(pipe, self.stream, entry_id)
        await pipe.execute()


def final_record(seq: Sequence, text: str) -> ResultRecord:
    """The record that ends a finished sequence's answer, with its last ``text``."""
    if seq.finish_reason == "error":
        failure = seq.failure or "Generation failed."
        return ResultRecord.failure(InternalError(failure, code="generation_failed"))
    return ResultRecord(
        kind="done",
        text=text,
        finish_reason=seq.finish_reason,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=len(seq.output_ids),
    )
