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
from typing import Any, cast

import redis.asyncio as aioredis
from pydantic import ValidationError

from bastion_common import keys as K
from bastion_common.aio import Entries, cancel, group_entries
from bastion_common.errors import BastionError, InternalError, InvalidRequestError, TimeoutError_
from bastion_common.messages import GenerationRequest, ResultRecord
from bastion_worker import undelivered
from bastion_worker.engine import Batch, Engine, Sequence, Step
from bastion_worker.scheduler import ChunkSizer, SchedulerConfig, Waiting, admit
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
# A request in this many failed steps fails; below it, it is recomputed alone.
MAX_STRIKES = 2
STEP_CODE = "worker_error"
STEP_FAILED = InternalError("The worker failed while generating this request.", code=STEP_CODE)


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
    # fails at MAX_STRIKES.
    strikes: int = 0


class Consumer:
    def __init__(self, settings: WorkerSettings, engine: Engine, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.keys = settings.keys
        self.model = settings.served_name
        self.stream = self.keys.requests(self.model)
        self.config = SchedulerConfig(
            max_seqs=settings.max_batch_size,
            prefill_budget=settings.prefill_budget,
            long_prompt=settings.long_prompt_tokens,
        )
        self.waiting: dict[str, Ticket] = {}
        self.running: dict[str, Ticket] = {}
        self.batch: Batch | None = None
        self.joining: list[Ticket] = []  # admitted, prefilled in the next step's pass
        # A long prompt being prefilled in chunks beside the decode steps, and
        # one whose prefill is complete but waits for the batch to take rows.
        self.chunking: Ticket | None = None
        self.ready: Batch | None = None
        self.chunks = ChunkSizer(settings.prefill_budget)
        self._cancels_checked = 0.0
        self._chunk_tokens = 0  # the size of the chunk in the step under way
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
            history = await self._read("0", count=None, block=None)
            await self._take(history, await self._deliveries(history))
            while not stop.is_set() or self._busy or self.waiting or self._arrived:
                if time.monotonic() - self._orphans_checked > ORPHAN_CHECK_S and not stop.is_set():
                    await self._adopt_orphans()
                    self._orphans_checked = time.monotonic()
                if not self._busy and not stop.is_set():
                    await self._pull()  # while a batch runs, each step's round trip reads
                arrived, self._arrived = self._arrived, []
                await self._take(arrived)
                await self._admit_waiting()
                if self._busy:
                    await self._step(pull=not stop.is_set())
        finally:
            await cancel(heartbeat)
            await self.redis.delete(self.keys.worker(self.model, self.settings.worker_id))

    @property
    def _busy(self) -> bool:
        """Whether there are steps to run."""
        return self.batch is not None or self.chunking is not None or self.ready is not None

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
        idle = not self._busy and not self.waiting
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
                    self.stream, K.WORKER_GROUP, self.settings.worker_id, ORPHAN_IDLE_MS, ids
                ),
            )
            log.warning("took over %d request(s) from stopped worker %s", len(claimed), name)
            free -= len(claimed)
            for entry_id, fields in claimed:
                if await self._dead_lettered(entry_id, fields, deliveries.get(entry_id, 1)):
                    continue
                request = await self._parse(entry_id, fields)
                if request is None:
                    continue
                if await self.redis.exists(self.keys.answered(request.id)):
                    lost = InternalError(
                        "The worker serving this request stopped before it finished.",
                        code="worker_lost",
                    )
                    await self._publish(request, ResultRecord.failure(lost))
                    await self._done(entry_id)
                else:
                    await self._wait(entry_id, request)

    async def _take(self, entries: Entries, deliveries: dict[str, int] | None = None) -> None:
        """Queue the entries' requests; ``deliveries`` counts how often each was
        handed out (where it may have been before), and one handed out more
        than ``max_deliveries`` times is not tried again."""
        for entry_id, fields in entries:
            if await self._dead_lettered(entry_id, fields, (deliveries or {}).get(entry_id, 1)):
                continue
            request = await self._parse(entry_id, fields)
            if request is not None:
                await self._wait(entry_id, request)

    async def _deliveries(self, entries: Entries) -> dict[str, int]:
        """How many times each of our own pending ``entries`` has been delivered."""
        if not entries:
            return {}
        pending: list[dict[str, Any]] = await self.redis.xpending_range(
            self.stream, K.WORKER_GROUP, min=entries[0][0], max=entries[-1][0],
            count=len(entries), consumername=self.settings.worker_id,
        )  # fmt: skip
        return {p["message_id"]: p["times_delivered"] for p in pending}

    async def _parse(
        self, entry_id: str, fields: dict[str, str] | None
    ) -> GenerationRequest | None:
        """The entry's request; None for one that cannot be served (then
        acknowledged, and answered with an error where it says where to)."""
        if not fields:  # the gateway already gave up on it and deleted it
            await self._done(entry_id)
            return None
        try:
            return GenerationRequest.load(fields)
        except (ValidationError, KeyError) as exc:
            log.error("refusing unreadable queue entry %s: %s", entry_id, undelivered.describe(exc))
            pipe = self.redis.pipeline(transaction=False)
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

    async def _wait(self, entry_id: str, request: GenerationRequest) -> None:
        """Tokenise ``request`` and queue it for admission, or answer it with its error."""
        try:
            seq = self._sequence(request)
        except Exception as exc:  # whatever a request's content makes preparing it raise
            if not isinstance(exc, BastionError):
                log.exception("preparing request %s failed", request.id)
                exc = InternalError("The worker could not prepare this request.", code=STEP_CODE)
            await self._publish(request, ResultRecord.failure(exc))
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
        if not prompt_ids:  # an empty prompt: generate from the start of a text
            if lm.tokenizer.bos_token_id is None:
                raise InvalidRequestError(
                    "The prompt is empty.", param="prompt", code="empty_prompt"
                )
            prompt_ids = [lm.tokenizer.bos_token_id]
        room = lm.context_length - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"The prompt is {len(prompt_ids)} tokens; this model's context is "
                f"{lm.context_length} tokens.",
                param="messages" if req.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        vocab = lm.model.config.vocab_size
        if req.params.top_k > vocab:
            raise InvalidRequestError(
                f"top_k may be at most this model's vocabulary size, {vocab}.", param="top_k"
            )
        wanted = req.params.max_tokens or self.settings.default_max_tokens
        return self.engine.new_sequence(req.id, prompt_ids, req.params, min(wanted, room), stops)

    async def _admit_waiting(self) -> None:
        if not self.waiting or (self.batch is not None and not self.batch.joinable):
            return
        tickets = self._chosen()
        long = [t for t in tickets if t.seq.context_length > self.config.long_prompt]
        if long:  # a suspect, alone: prefilled in chunks like any long prompt, one at a time
            if self.chunking is None and self.ready is None:
                self._start_chunking(long[0])
            else:
                self.waiting[long[0].request.id] = long[0]
            return
        if not tickets:
            return
        suspect = any(t.strikes for t in tickets)
        if (
            not suspect
            and self.batch is not None
            and self.engine.can_join_in_step(self.batch, [t.seq for t in tickets])
        ):
            self.joining += tickets  # prefilled in the next step's own pass
            self.running.update((t.request.id, t) for t in tickets)
            return
        await self._prefill(tickets)
        # Their first tokens go out with the next step's records, as that step runs.

    def _chosen(self) -> list[Ticket]:
        """The waiting requests to admit now, taken out of ``waiting``. After a
        failed step, its requests come back one at a time, so that one whose
        prefill fails again fails alone."""
        suspects = [t for t in self.waiting.values() if t.strikes]
        if suspects:
            if len(self.running) >= self.config.max_seqs:
                return []
            return [self.waiting.pop(suspects[0].request.id)]
        queue = [
            Waiting(t.request.id, t.seq.context_length, t.arrived, t.request.priority)
            for t in self.waiting.values()
        ]
        chunking = self.chunking is not None or self.ready is not None
        admission = admit(queue, len(self.running), time.monotonic(), self.config, chunking)
        if admission.chunked is not None:
            self._start_chunking(self.waiting.pop(admission.chunked.request_id))
        chosen = self._within_kv_budget(admission.whole)
        return [self.waiting.pop(w.request_id) for w in chosen]

    def _start_chunking(self, ticket: Ticket) -> None:
        """Prefill ``ticket`` in chunks, beside the decode steps, from the next step on."""
        self.chunking = ticket
        self.running[ticket.request.id] = ticket

    async def _prefill(self, tickets: list[Ticket]) -> None:
        """Prefill ``tickets`` on their own and join them to the batch. Where the
        prefill fails, each is tried alone, and only those failing alone fail."""
        try:
            new = await asyncio.to_thread(self.engine.prefill, [t.seq for t in tickets])
        except Exception:
            log.exception("prefill of %d sequence(s) failed", len(tickets))
            if len(tickets) == 1:
                await self._fail(tickets)
                return
            for ticket in tickets:
                await self._prefill([ticket])
            return
        self.running.update((t.request.id, t) for t in tickets)
        if self.batch is None:
            self.batch = new
            return
        try:
            self.batch = await asyncio.to_thread(self.engine.join, self.batch, new)
        except Exception:
            log.exception("joining %d sequence(s) to the batch failed", len(tickets))
            await self._recover()

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
        """Take the last step's output, let finished rows leave, then send it
        (and read new requests and cancel marks, in the same round trip) while
        the next step runs: Redis I/O overlaps the forward pass. A failure in
        the engine is recovered from (:meth:`_recover`); one in Redis ends the loop."""
        pipe, ended = self._collect()
        try:
            if self.batch is not None:
                self.batch = self.engine.evict(self.batch)
            if self.batch is None and self.ready is not None:
                self.batch, self.ready = self.ready, None
            self._preempt_over_budget()
        except Exception:
            log.exception("preparing a step of %d sequences failed", len(self.running))
            await self._send(pipe, ended, None, None)
            await self._recover()
            return
        watched, marks_at = self._watch_cancels(pipe)
        free = self._free_slots(leaving=len(ended)) if pull else 0
        read_at = None
        if free > 0:
            read_at = len(pipe)  # the reply's place among the pipeline's
            pipe.xreadgroup(K.WORKER_GROUP, self.settings.worker_id, {self.stream: ">"}, count=free)
        started = time.monotonic()
        step = self._start_step()
        try:
            marks = await self._send(pipe, ended, read_at, marks_at)
        finally:
            stepped = await self._finish_step(step)
        if pull and time.monotonic() - started >= READ_AFTER_STEP_S:
            await self._read_arrivals()
        # After the step: the engine is not touched while it runs.
        for seq, mark in zip(watched, marks, strict=True):
            if mark is not None and stepped:
                self.engine.cancel(seq)
        if self.chunking is not None and self.chunking.seq.finished:  # cancelled
            await self._end_chunking()

    async def _finish_step(self, step: asyncio.Future[Step] | None) -> bool:
        """Wait for the step; False if it failed (and was recovered from)."""
        if step is None:
            return True
        try:
            result = await step
        except Exception:
            log.exception("a step of %d sequences failed", len(self.running))
            await self._recover()
            return False
        self.batch = result.batch
        if result.decode_s is not None:
            self.chunks.observe_decode(result.decode_s)
        if result.chunk_s is not None:
            self.chunks.observe_chunk(self._chunk_tokens, result.chunk_s)
        if result.shared_s is not None:
            self.chunks.observe_shared(self._chunk_tokens, result.shared_s)
        if result.chunk_failure is not None and self.chunking is not None:
            log.error("a chunk of %s's prefill failed", self.chunking.request.id,
                      exc_info=result.chunk_failure)  # fmt: skip
            await self._fail([self.chunking])
            self.chunking = None
        elif result.chunk_done:
            self.chunking, self.ready = None, result.ready
        return True

    async def _end_chunking(self) -> None:
        """Answer a request cancelled while its prompt was being prefilled in chunks."""
        ticket, self.chunking = self.chunking, None
        assert ticket is not None
        self.engine.drop_part(ticket.seq)
        ticket.seq.published = True
        await self._publish(ticket.request, _final_record(ticket.seq, ""))
        self.running.pop(ticket.request.id, None)
        await self._done(ticket.entry_id)

    async def _recover(self) -> None:
        """After a failed step the batch's cache cannot be trusted: drop it and
        send every running request back to wait, to be recomputed (as
        preemption does) one at a time, so that one whose prefill fails again
        fails alone. Each gets a strike; a request at ``MAX_STRIKES`` fails.
        What a request had sent is neither lost nor repeated."""
        self.batch, self.joining, self.ready = None, [], None
        if self.chunking is not None:
            self.engine.drop_part(self.chunking.seq)
            self.chunking = None
        failed = []
        for ticket in list(self.running.values()):
            del self.running[ticket.request.id]
            if ticket.seq.published:
                continue
            ticket.strikes += 1
            if ticket.strikes >= MAX_STRIKES:
                failed.append(ticket)
            else:
                self.waiting[ticket.request.id] = ticket
        await self._fail(failed)

    async def _read_arrivals(self) -> None:
        """Read what arrived, up to the free slots (less what was read but not yet taken)."""
        free = self._free_slots() - len(self._arrived)
        if free > 0:
            self._arrived += await self._read(">", count=free, block=None)

    def _start_step(self) -> asyncio.Future[Step] | None:
        """The next step, in the engine's thread (:meth:`Engine.step`): a decode
        step, which also prefills and joins the sequences waiting to join (or,
        when every running row has left, their prefill alone), and the next
        chunk of a long prompt's prefill."""
        joining, self.joining = [t.seq for t in self.joining], []
        batch, chunk = self.batch, None if self.chunking is None else self.chunking.seq
        decoding = batch is not None and not batch.done
        if not (joining or decoding or chunk is not None):
            return None
        self._chunk_tokens = self.chunks.size(decoding)
        # A prompt whose chunk was in a failed step goes in passes of its own,
        # where a failure of its own is its alone.
        shared = self.chunking is not None and not self.chunking.strikes
        step = asyncio.to_thread(
            self.engine.step, batch, joining, chunk, self._chunk_tokens, shared
        )
        return asyncio.ensure_future(step)

    def _watch_cancels(self, pipe: aioredis.client.Pipeline) -> tuple[list[Sequence], int | None]:
        """Every ``CANCEL_CHECK_S``, queue a read of the live sequences' cancel
        marks; those sequences, and the read's place in the pipeline."""
        if not self._busy or time.monotonic() - self._cancels_checked <= CANCEL_CHECK_S:
            return [], None
        self._cancels_checked = time.monotonic()
        live = [] if self.batch is None else [s for s in self.batch.seqs if not s.finished]
        if self.chunking is not None:
            live.append(self.chunking.seq)
        if not live:
            return [], None
        pipe.mget([self.running[s.request_id].request.cancel_key for s in live])
        return live, len(pipe) - 1

    def _collect(self) -> tuple[aioredis.client.Pipeline, list[Ticket]]:
        """Queue every running sequence's new text, or its final record if it
        ended (then it counts as published), on a pipeline not yet sent: one
        entry per gateway result stream, a field per request."""
        pipe = self.redis.pipeline(transaction=False)
        ended: list[Ticket] = []
        entries: dict[str, dict[Any, Any]] = {}
        if self.batch is None:
            return pipe, ended
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
                record = _final_record(seq, text)
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
            undelivered.ack(pipe, self.stream, ticket.entry_id)
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

    async def _fail(self, tickets: list[Ticket], error: BastionError = STEP_FAILED) -> None:
        for ticket in tickets:
            if not ticket.seq.published:
                ticket.seq.published = True
                await self._publish(ticket.request, ResultRecord.failure(error))
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
        undelivered.ack(pipe, self.stream, entry_id)
        await pipe.execute()


def _add(pipe: aioredis.client.Pipeline, req: GenerationRequest, record: ResultRecord) -> None:
    pipe.xadd(req.result_stream, record.entry(req.id))
    pipe.expire(req.result_stream, K.RESULT_TTL_S)


def _final_record(seq: Sequence, text: str) -> ResultRecord:
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
