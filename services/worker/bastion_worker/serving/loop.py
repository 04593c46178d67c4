"""The step loop: the one task that owns the engine. It queues what the
reader takes, carries out the scheduler's decisions (admission, chunked
prefill, preemption), runs the engine's steps in a thread so the event loop
stays responsive, and hands each step's output to the publisher.

While a step computes, one Redis round trip publishes the previous step's
text, acknowledges the requests that ended, reads new requests for the free
slots and, every ``CANCEL_CHECK_S``, the running requests' cancel marks.
Only an idle worker blocks on the stream; woken, it reads on until the
stream is quiet for a moment, so that a burst is prefilled together.

Longer than most modules on purpose: every method here reads or changes the
same state (waiting, running, the batch, a chunked prompt), so it stays one
class; reading, preparing, publishing and the scheduling policy are apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from bastion_common import keys as K
from bastion_common.aio import Entries, cancel, group_entries
from bastion_common.errors import BastionError, InternalError
from bastion_common.messages import ResultRecord
from bastion_worker.engine.core import Engine
from bastion_worker.engine.sequence import Batch, Sequence, Step
from bastion_worker.serving.prepare import prepare
from bastion_worker.serving.publisher import Publisher, Ticket, final_record
from bastion_worker.serving.reader import StreamReader, Taken
from bastion_worker.serving.scheduler import (
    ChunkSizer,
    Running,
    SchedulerConfig,
    Waiting,
    admit,
    fit_kv_budget,
    preemption_victim,
)
from bastion_worker.settings import WorkerSettings

log = logging.getLogger(__name__)
READ_BLOCK_MS = 1000
CANCEL_CHECK_S = 0.05  # how often cancel marks are read while a batch runs
ORPHAN_CHECK_S = K.WORKER_HEARTBEAT_S  # how often the queue is checked for orphans
# After a step at least this long, requests that arrived during it are read
# before the next step starts, so that they are prefilled in the next step
# rather than the one after; the extra round trip is then a small part of a step.
READ_AFTER_STEP_S = 0.02
# An idle worker woken by a request reads on until the stream has been quiet
# COALESCE_GAP_S (COALESCE_BURST_GAP_S once a second request has come, as
# requests through the gateway arrive a few milliseconds apart), at most
# COALESCE_MAX_S, so that a burst shares one prefill. Polled: Redis ends a
# blocking read only about every 100 ms.
COALESCE_GAP_S = 0.002
COALESCE_BURST_GAP_S = 0.008
COALESCE_POLL_S = 0.0005
COALESCE_MAX_S = 0.05
# A request in this many failed steps fails; below it, it is recomputed alone.
MAX_STRIKES = 2
PREPARE_FAILED = InternalError("The worker could not prepare this request.", code="worker_error")
WORKER_LOST = InternalError(
    "The worker serving this request stopped before it finished.", code="worker_lost"
)


class StepLoop:
    def __init__(self, settings: WorkerSettings, engine: Engine, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.model = settings.served_name
        self.reader = StreamReader(settings, redis)
        self.publisher = Publisher(settings, redis, self.reader.stream)
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
        await self.reader.join_group()
        registration = asyncio.create_task(self.reader.register(stop))
        try:
            await self._queue(await self.reader.own_pending())  # from a previous life
            while not stop.is_set() or self._busy or self.waiting or self._arrived:
                if time.monotonic() - self._orphans_checked > ORPHAN_CHECK_S and not stop.is_set():
                    await self._adopt_orphans()
                    self._orphans_checked = time.monotonic()
                if not self._busy and not stop.is_set():
                    await self._pull()  # while a batch runs, each step's round trip reads
                arrived, self._arrived = self._arrived, []
                await self._queue(await self.reader.take(arrived))
                await self._admit_waiting()
                if self._busy:
                    await self._step(pull=not stop.is_set())
        finally:
            await cancel(registration)
            await self.reader.unregister()

    @property
    def _busy(self) -> bool:
        """Whether there are steps to run."""
        return self.batch is not None or self.chunking is not None or self.ready is not None

    def _free_slots(self, leaving: int = 0) -> int:
        """Requests there is room for; the rest stays in the stream for other workers."""
        return self.config.max_seqs - (len(self.running) - leaving) - len(self.waiting)

    # Taking requests ---------------------------------------------------------

    async def _pull(self) -> None:
        free = self._free_slots()
        if free <= 0:
            return
        idle = not self._busy and not self.waiting
        await self._queue(await self.reader.read(free, READ_BLOCK_MS if idle else None))
        if idle and self.waiting:
            await self._gather_burst()

    async def _gather_burst(self) -> None:
        """Requests sent with the one that woke an idle worker reach the stream
        over the next milliseconds: taken now, they share its prefill."""
        started = last = time.monotonic()
        gap = COALESCE_GAP_S if len(self.waiting) < 2 else COALESCE_BURST_GAP_S
        while (free := self._free_slots()) > 0:
            more = await self.reader.read(free)
            now = time.monotonic()
            if more:
                await self._queue(more)
                last, gap = now, COALESCE_BURST_GAP_S  # a burst: its gaps are wider
            elif now - last >= gap or now - started >= COALESCE_MAX_S:
                return
            else:
                await asyncio.sleep(COALESCE_POLL_S)

    async def _adopt_orphans(self) -> None:
        """Take over requests a stopped worker held. One that had not sent
        anything yet is served here; one whose answer had begun gets a final
        error record (its text cannot be resumed where it broke off)."""
        self.orphan_checks += 1
        free = self._free_slots()
        if free <= 0:
            return
        for taken in await self.reader.orphans(free):
            if taken.begun:
                await self.publisher.publish(taken.request, ResultRecord.failure(WORKER_LOST))
                await self.publisher.done(taken.entry_id)
            else:
                await self._queue([taken])

    async def _queue(self, taken: list[Taken]) -> None:
        """Tokenise each request and queue it for admission, or answer it with its error."""
        for t in taken:
            try:
                seq = prepare(self.engine, self.model, t.request)
            except Exception as exc:  # whatever a request's content makes preparing it raise
                if not isinstance(exc, BastionError):
                    log.exception("preparing request %s failed", t.request.id)
                    exc = PREPARE_FAILED
                await self.publisher.publish(t.request, ResultRecord.failure(exc))
                await self.publisher.done(t.entry_id)
                continue
            self.waiting[t.request.id] = Ticket(t.request, t.entry_id, seq, time.monotonic())

    # Admission ---------------------------------------------------------------

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
        rows, width = (0, 0) if self.batch is None else self.batch.attention_mask.shape
        budget = self.settings.kv_budget_tokens
        chosen = fit_kv_budget(admission.whole, int(rows), int(width), budget)
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

    def _preempt_over_budget(self) -> None:
        """Preempt while the scheduler says the next step would overflow the KV
        budget; a preempted sequence waits again and resumes by recomputation."""
        budget = self.settings.kv_budget_tokens
        while budget and self.batch is not None and self.batch.joinable:
            tickets = [self.running[s.request_id] for s in self.batch.seqs if not s.finished]
            live = [Running(t.request.id, t.arrived, t.request.priority) for t in tickets]
            rows = len(self.batch.seqs)
            victim_id = preemption_victim(live, self.batch.kv_tokens, rows, budget)
            if victim_id is None:
                return
            victim = self.running[victim_id].seq
            self.batch = self.engine.preempt(self.batch, victim)
            self.waiting[victim_id] = self.running.pop(victim_id)
            self.preemptions += 1
            log.info("preempted %s at %d tokens", victim_id, len(victim.output_ids))

    # Steps -------------------------------------------------------------------

    async def _step(self, pull: bool) -> None:
        """Take the last step's output, let finished rows leave, then send it
        (and read new requests and cancel marks, in the same round trip) while
        the next step runs: Redis I/O overlaps the forward pass. A failure in
        the engine is recovered from (:meth:`_recover`); one in Redis ends the loop."""
        pipe, ended = self.publisher.collect(self.engine, self.batch, self.running)
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
        read_at = self.reader.queue_read(pipe, free) if free > 0 else None
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
        await self.publisher.publish(ticket.request, final_record(ticket.seq, ""))
        self.running.pop(ticket.request.id, None)
        await self.publisher.done(ticket.entry_id)

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

    async def _fail(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self.running.pop(ticket.request.id, None)
        await self.publisher.fail(tickets)

    # The step's round trip -----------------------------------------------------

    async def _read_arrivals(self) -> None:
        """Read what arrived, up to the free slots (less what was read but not yet taken)."""
        free = self._free_slots() - len(self._arrived)
        if free > 0:
            self._arrived += await self.reader.read_entries(free)

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

    async def _send(
        self,
        pipe: aioredis.client.Pipeline,
        ended: list[Ticket],
        read_at: int | None,
        marks_at: int | None,
    ) -> list[str | None]:
        """Send the step's round trip (in order: a request is acknowledged and
        deleted from the stream after its final record) and keep the new
        requests read by the command at ``read_at``, if any, even if another
        command failed. Returns the cancel marks read at ``marks_at``, if any."""
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
