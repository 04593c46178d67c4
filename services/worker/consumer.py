"""The worker's Redis side: registration, pulling requests from the model's
stream through the consumer group, and publishing results, around a
continuous-batching loop. One task owns the engine; forward passes run in a
thread so the event loop stays responsive.

Each iteration: let the scheduler pick which waiting requests join now
(prefilled in the next decode step's own pass where the engine can, else on
their own and joined), then start the batch's next step and, while it runs,
in one Redis round trip: publish every sequence's new text (one entry per
gateway, holding its requests' records; at most ``stream_records_per_s``
records a second over the batch, a request's first token and its end at
once), acknowledge the requests that
ended, read only as many new requests as there are free slots (the rest
stay in the stream for other workers) and, every 50 ms, the running
requests' cancel marks. After a long step, what arrived during it is
read before the next starts. Only an idle worker blocks on the stream;
woken, it reads on until the stream is quiet for a moment, so that a burst
is prefilled together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from bastion_common import keys as K
from bastion_common.aio import Entries, cancel, group_entries
from bastion_common.errors import BastionError, InternalError, InvalidRequestError, TimeoutError_
from bastion_common.messages import GenerationRequest, ResultRecord
from bastion_worker.engine import Batch, Engine, Sequence
from bastion_worker.scheduler import SchedulerConfig, Waiting, admit
from bastion_worker.settings import WorkerSettings

log = logging.getLogger(__name__)
READ_BLOCK_MS = 1000
CANCEL_CHECK_S = 0.05  # how often cancel marks are read while a batch runs
# How often the queue is checked for requests a stopped worker had taken, and how
# long such a request must have sat since it was handed out before it is taken over.
ORPHAN_CHECK_S = K.WORKER_HEARTBEAT_S
ORPHAN_IDLE_MS = K.WORKER_TTL_S * 1000
# After a step at least this long, requests that arrived during it are read
# before the next step starts, so they are prefilled in that step rather than
# the one after (the step's own round trip read before they came). The extra
# round trip, under a millisecond on loopback, is then at most a few percent
# of a step; after shorter steps the step's own read is soon enough.
READ_AFTER_STEP_S = 0.02
# An idle worker woken by a request keeps reading until the stream has been
# quiet this long (at most COALESCE_MAX_S), so that a burst is prefilled in one
# pass: a lone request waits about COALESCE_GAP_S more for its first token.
# The bench's 24-request burst reaches the stream over 20-32 ms, and an idle
# worker had split it (5, then 19) in one of three rounds; the 19 then waited
# for the 5's prefill. Once a second request has come, the quiet gap widens to
# COALESCE_BURST_GAP_S: through the gateway (auth, rate limits, the guard's
# input check) the same burst arrives with gaps of 1-4 ms, and a 2 ms gap
# split it in most rounds (Gemma 3: 2 prefilled, then 22 joining in a 424 ms
# step; 16, then 8), so that the 22 waited for the 2's prefill and a step, and
# the 2 saw a 0.3-0.4 s pause between tokens.
COALESCE_GAP_S = 0.002
COALESCE_BURST_GAP_S = 0.008
COALESCE_POLL_S = 0.0005
COALESCE_MAX_S = 0.05


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


class Consumer:
    def __init__(self, settings: WorkerSettings, engine: Engine, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.keys = settings.keys
        self.model = settings.served_name
        self.stream = self.keys.requests(self.model)
        self.config = SchedulerConfig(settings.max_batch_size, settings.prefill_budget)
        self.waiting: dict[str, Ticket] = {}
        self.running: dict[str, Ticket] = {}
        self.batch: Batch | None = None
        self.joining: list[Ticket] = []  # admitted, prefilled in the next step's pass
        self._cancels_checked = 0.0
        self._orphans_checked = 0.0
        self.preemptions = 0
        self.orphan_checks = 0
        # Read with a step's records; taken (tokenised) once the step is over,
        # so the tokenizer is never used from two threads at once.
        self._arrived: Entries = []

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; what was taken is still answered first."""
        await self._ensure_group()
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        try:
            # Our own unacknowledged entries first (from a previous life), then new ones.
            await self._take(await self._read("0", count=None, block=None))
            while not stop.is_set() or self.batch is not None or self.waiting or self._arrived:
                if time.monotonic() - self._orphans_checked > ORPHAN_CHECK_S and not stop.is_set():
                    await self._adopt_orphans()
                    self._orphans_checked = time.monotonic()
                if self.batch is None and not stop.is_set():
                    await self._pull()  # while a batch runs, each step's round trip reads
                arrived, self._arrived = self._arrived, []
                await self._take(arrived)
                await self._admit_waiting()
                if self.batch is not None:
                    await self._step(pull=not stop.is_set())
        finally:
            await cancel(heartbeat)
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

    async def _read(self, start: str, count: int | None, block: int | None) -> Entries:
        reply = await self.redis.xreadgroup(
            K.WORKER_GROUP, self.settings.worker_id, {self.stream: start}, count=count, block=block
        )
        return group_entries(reply)

    def _free_slots(self, leaving: int = 0) -> int:
        """Requests there is room for; the rest stays in the stream for other workers."""
        return self.config.max_seqs - (len(self.running) - leaving) - len(self.waiting)

    async def _pull(self) -> None:
        free = self._free_slots()
        if free <= 0:
            return
        idle = self.batch is None and not self.waiting
        await self._take(await self._read(">", count=free, block=READ_BLOCK_MS if idle else None))
        if idle and self.waiting:
            await self._gather_burst()

    async def _gather_burst(self) -> None:
        """A blocking read returns at the first arrival; requests sent with it
        reach the stream over the next milliseconds. Taken now, until the stream
        has been quiet for ``COALESCE_GAP_S`` (``COALESCE_BURST_GAP_S`` once two
        have come) or ``COALESCE_MAX_S`` has passed, they share the first
        prefill instead of waiting for it and a step.
        Polled: Redis times out a blocking read only about every 100 ms."""
        started = last = time.monotonic()
        gap = COALESCE_GAP_S if len(self.waiting) < 2 else COALESCE_BURST_GAP_S
        while (free := self._free_slots()) > 0:
            more = await self._read(">", count=free, block=None)
            now = time.monotonic()
            if more:
                await self._take(more)
                last, gap = now, COALESCE_BURST_GAP_S  # a burst: its gaps are wider
            elif now - last >= gap or now - started >= COALESCE_MAX_S:
                return
            else:
                await asyncio.sleep(COALESCE_POLL_S)

    async def _adopt_orphans(self) -> None:
        """Take over requests that a worker which stopped had taken: pending for
        a consumer whose registration has expired, and handed out at least
        ``ORPHAN_IDLE_MS`` ago. One that had not sent anything yet is served
        here; one whose answer had begun gets a final error record (its text
        cannot be resumed where it broke off)."""
        self.orphan_checks += 1
        free = self._free_slots()
        if free <= 0:
            return
        summary = await self.redis.xpending(self.stream, K.WORKER_GROUP)
        for consumer in summary["consumers"]:
            name = consumer["name"]
            if free <= 0 or name == self.settings.worker_id:
                continue
            if await self.redis.exists(self.keys.worker(self.model, name)):
                continue  # alive: its requests are its own
            pending = await self.redis.xpending_range(
                self.stream, K.WORKER_GROUP, min="-", max="+", count=free,
                consumername=name, idle=ORPHAN_IDLE_MS,
            )  # fmt: skip
            if not pending:
                continue
            ids = [p["message_id"] for p in pending]
            claimed: Entries = await self.redis.xclaim(
                self.stream, K.WORKER_GROUP, self.settings.worker_id, ORPHAN_IDLE_MS, ids
            )
            log.warning("took over %d request(s) from stopped worker %s", len(claimed), name)
            free -= len(claimed)
            for entry_id, fields in claimed:
                request = await self._parse(entry_id, fields)
                if request is None:
                    continue
                if await self.redis.exists(self.keys.answered(request.id)):
                    lost = InternalError(
                        "The worker serving this request stopped before it finished.",
                        code="worker_lost",
                    )
                    await self._publish(request, ResultRecord(kind="error", **_error_fields(lost)))
                    await self._done(entry_id)
                else:
                    await self._wait(entry_id, request)

    async def _take(self, entries: Entries) -> None:
        for entry_id, fields in entries:
            request = await self._parse(entry_id, fields)
            if request is not None:
                await self._wait(entry_id, request)

    async def _parse(
        self, entry_id: str, fields: dict[str, str] | None
    ) -> GenerationRequest | None:
        """The entry's request; None for one that cannot be served (then acknowledged)."""
        if not fields:  # the gateway already gave up on it and deleted it
            await self._done(entry_id)
            return None
        try:
            return GenerationRequest.load(fields)
        except (ValidationError, KeyError):
            log.error("dropping malformed queue entry %s", entry_id)
            await self._done(entry_id)
            return None

    async def _wait(self, entry_id: str, request: GenerationRequest) -> None:
        """Tokenise ``request`` and queue it for admission, or answer it with its error."""
        try:
            seq = self._sequence(request)
        except BastionError as exc:
            await self._publish(request, ResultRecord(kind="error", **_error_fields(exc)))
            await self._done(entry_id)
            return
        self.waiting[request.id] = Ticket(request, entry_id, seq, time.monotonic())

    def _sequence(self, req: GenerationRequest) -> Sequence:
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

    async def _admit_waiting(self) -> None:
        if not self.waiting or (self.batch is not None and not self.batch.joinable):
            return
        queue = [
            Waiting(t.request.id, _context(t.seq), t.arrived, t.request.priority)
            for t in self.waiting.values()
        ]
        chosen = self._within_kv_budget(
            admit(queue, len(self.running), time.monotonic(), self.config)
        )
        tickets = [self.waiting.pop(w.request_id) for w in chosen]
        if not tickets:
            return
        if self.batch is not None and self.engine.can_join_in_step(
            self.batch, [t.seq for t in tickets]
        ):
            self.joining += tickets  # prefilled in the next step's own pass
            self.running.update((t.request.id, t) for t in tickets)
            return
        try:
            new = await asyncio.to_thread(self.engine.prefill, [t.seq for t in tickets])
        except Exception:
            log.exception("prefill of %d sequences failed", len(tickets))
            await self._fail(tickets)
            return
        self.running.update((t.request.id, t) for t in tickets)
        if self.batch is None:
            self.batch = new
        else:
            self.batch = await asyncio.to_thread(self.engine.join, self.batch, new)
        # Their first tokens go out with the next step's records, as that step runs.

    def _within_kv_budget(self, chosen: list[Waiting]) -> list[Waiting]:
        """Drop the last of ``chosen`` until the batch they make fits the KV budget
        (one sequence always runs on an empty batch)."""
        budget = self.settings.kv_budget_tokens
        rows, width = (0, 0) if self.batch is None else self.batch.attention_mask.shape
        while budget and chosen and (self.batch is not None or len(chosen) > 1):
            wide = max(int(width), *(w.prompt_tokens for w in chosen))
            if (int(rows) + len(chosen)) * (wide + 1) <= budget:
                break
            chosen = chosen[:-1]
        return chosen

    def _preempt_over_budget(self) -> None:
        """While the next step would overflow the KV budget, send the newest,
        lowest-priority running sequence back to wait; it resumes by recomputation."""
        budget = self.settings.kv_budget_tokens
        while budget and self.batch is not None and self.batch.joinable:
            live = [s for s in self.batch.seqs if not s.finished]
            if len(live) < 2 or self.batch.kv_tokens + len(self.batch.seqs) <= budget:
                return
            victim = max(
                live,
                key=lambda s: (-self.running[s.request_id].request.priority,
                               self.running[s.request_id].arrived),
            )  # fmt: skip
            self.batch = self.engine.preempt(self.batch, victim)
            self.waiting[victim.request_id] = self.running.pop(victim.request_id)
            self.preemptions += 1
            log.info("preempted %s at %d tokens", victim.request_id, len(victim.output_ids))

    async def _step(self, pull: bool) -> None:
        batch = self.batch
        assert batch is not None
        try:
            # Take the last step's output, let finished rows leave, then send it
            # (and read new requests and cancel marks, in the same round trip)
            # while the next step runs: Redis I/O overlaps the forward pass.
            pipe, ended = self._collect()
            self.batch = self.engine.evict(batch)
            self._preempt_over_budget()
            watched, marks_at = self._watch_cancels(pipe)
            free = self._free_slots(leaving=len(ended)) if pull else 0
            read_at = None
            if free > 0:
                read_at = len(pipe)  # the reply's place among the pipeline's
                pipe.xreadgroup(
                    K.WORKER_GROUP, self.settings.worker_id, {self.stream: ">"}, count=free
                )
            started = time.monotonic()
            step = self._start_step()
            try:
                marks = await self._send(pipe, ended, read_at, marks_at)
            finally:
                if step is not None:
                    self.batch = await step
            if pull and time.monotonic() - started >= READ_AFTER_STEP_S:
                await self._read_arrivals()
            # After the step: the engine is not touched while it runs.
            for seq, mark in zip(watched, marks, strict=True):
                if mark is not None:
                    self.engine.cancel(seq)
        except Exception:
            log.exception("batch of %d sequences failed", len(batch.seqs))
            await self._fail(list(self.running.values()))
            self.batch = None

    async def _read_arrivals(self) -> None:
        """Read what arrived, up to the free slots (less what was read but not yet taken)."""
        free = self._free_slots() - len(self._arrived)
        if free > 0:
            self._arrived += await self._read(">", count=free, block=None)

    def _start_step(self) -> asyncio.Future[Batch] | None:
        """The next forward pass, in the engine's thread: a decode step, which
        also prefills and joins the sequences waiting to join; or, when every
        running row has left, their prefill alone."""
        joining, self.joining = [t.seq for t in self.joining], []
        batch = self.batch
        if batch is None and joining:
            return asyncio.ensure_future(asyncio.to_thread(self.engine.prefill, joining))
        if batch is not None and (joining or not batch.done):
            return asyncio.ensure_future(asyncio.to_thread(self.engine.decode_step, batch, joining))
        return None

    def _watch_cancels(self, pipe: aioredis.client.Pipeline) -> tuple[list[Sequence], int | None]:
        """Every ``CANCEL_CHECK_S``, queue a read of the live sequences' cancel
        marks; those sequences, and the read's place in the pipeline."""
        if self.batch is None or time.monotonic() - self._cancels_checked <= CANCEL_CHECK_S:
            return [], None
        self._cancels_checked = time.monotonic()
        live = [s for s in self.batch.seqs if not s.finished]
        if not live:
            return [], None
        pipe.mget([self.running[s.request_id].request.cancel_key for s in live])
        return live, len(pipe) - 1

    def _collect(self) -> tuple[aioredis.client.Pipeline, list[Ticket]]:
        """Queue every running sequence's new text, or its final record if it
        ended (then it counts as published), on a pipeline not yet sent: one
        entry per gateway result stream, a field per request."""
        assert self.batch is not None
        pipe = self.redis.pipeline(transaction=False)
        ended: list[Ticket] = []
        entries: dict[str, dict[str, str]] = {}
        now = time.monotonic()
        rate = self.settings.stream_records_per_s
        interval = len(self.batch.seqs) / rate if rate else 0.0
        for seq in self.batch.seqs:
            if seq.published:
                continue
            ticket = self.running[seq.request_id]
            if not seq.finished and ticket.sent_at is not None and now - ticket.sent_at < interval:
                continue  # held back: sent with a later step's text, or with its end
            text = self.engine.take_text(seq)
            if seq.finished:
                record = ResultRecord(
                    kind="done",
                    text=text,
                    finish_reason=seq.finish_reason,  # type: ignore[arg-type]
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                )
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
        for ticket in ended:  # after its final record
            _ack(pipe, self.stream, ticket.entry_id)
            if ticket.ttl_set:
                pipe.delete(self.keys.answered(ticket.request.id))
        return pipe, ended

    def _answering(self, pipe: aioredis.client.Pipeline, ticket: Ticket) -> None:
        """Keep the result stream, and the mark that the answer has begun, alive."""
        pipe.expire(ticket.request.result_stream, K.RESULT_TTL_S)
        pipe.set(self.keys.answered(ticket.request.id), "1", ex=K.RESULT_TTL_S)

    async def _send(
        self,
        pipe: aioredis.client.Pipeline,
        ended: list[Ticket],
        read_at: int | None,
        marks_at: int | None,
    ) -> list[str | None]:
        """Send the records (in order: a request is acknowledged and deleted from
        the stream after its final record) and keep the new requests read by
        the command at ``read_at``, if any, even if another command failed.
        Returns the cancel marks read by the command at ``marks_at``, if any."""
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for ticket in ended:
            del self.running[ticket.request.id]
        if read_at is not None and not isinstance(replies[read_at], Exception):
            self._arrived += group_entries(replies[read_at])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        marks: list[str | None] = [] if marks_at is None else replies[marks_at]
        return marks

    async def _fail(self, tickets: list[Ticket]) -> None:
        failure = InternalError("The worker failed while generating.", code="worker_error")
        for ticket in tickets:
            if not ticket.seq.published:
                ticket.seq.published = True
                await self._publish(
                    ticket.request, ResultRecord(kind="error", **_error_fields(failure))
                )
            self.running.pop(ticket.request.id, None)
            await self._done(ticket.entry_id)
            if ticket.ttl_set:
                await self.redis.delete(self.keys.answered(ticket.request.id))

    async def _publish(self, req: GenerationRequest, record: ResultRecord) -> None:
        pipe = self.redis.pipeline(transaction=False)
        _add(pipe, req, record)
        await pipe.execute()

    async def _done(self, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        _ack(pipe, self.stream, entry_id)
        await pipe.execute()


def _add(pipe: aioredis.client.Pipeline, req: GenerationRequest, record: ResultRecord) -> None:
    pipe.xadd(req.result_stream, record.entry(req.id))
    pipe.expire(req.result_stream, K.RESULT_TTL_S)


def _ack(pipe: aioredis.client.Pipeline, stream: str, entry_id: str) -> None:
    """Acknowledge and delete a stream entry: nothing of it stays in Redis."""
    pipe.xack(stream, K.WORKER_GROUP, entry_id)
    pipe.xdel(stream, entry_id)


def _error_fields(exc: BastionError) -> dict[str, str | None]:
    return {
        "error_type": type(exc).__name__,
        "error_message": exc.message,
        "error_code": exc.code,
    }


def _context(seq: Sequence) -> int:
    """Tokens a (re)prefill of ``seq`` covers: its prompt and what it has generated."""
    return len(seq.prompt_ids) + len(seq.output_ids)
