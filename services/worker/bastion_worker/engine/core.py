"""The batched forward passes. Owns torch; knows nothing of Redis or HTTP.

New sequences are prefilled together, packed into one row without padding
(:mod:`bastion_worker.model.attention`) where the model's attention allows, else
left-padded to one length, and, where the cache allows
(:mod:`bastion_worker.engine.batching`), joined to the running batch; packed, they
can also be prefilled in a decode step's own pass and joined after it. Every
step decodes one token for each live row with the KV cache carried between
steps (through :mod:`bastion_worker.model.decode`'s written-out forward where the
architecture has one); finished rows leave the batch at once.

Longer than most modules on purpose: every kind of pass (whole, packed,
chunked, within a decode step) shares the bookkeeping of the batch, its cache
and its sampling, which stays here in one class.
"""

from __future__ import annotations

import logging
import time

import torch

from bastion_common.messages import SamplingParams
from bastion_worker.engine import batching, kvcache
from bastion_worker.engine.detokenize import IncrementalDetokenizer
from bastion_worker.engine.sampling import RowFailure, make_generator, sample
from bastion_worker.engine.sequence import Batch, Sequence, Step
from bastion_worker.engine.stops import StopMatcher
from bastion_worker.model import attention, decode
from bastion_worker.model.loader import LoadedModel

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.packs = attention.packs(lm.model)
        # None: transformers' forward runs decode steps and packed passes
        self.decoder = decode.for_model(lm.model)
        if lm.compiled:
            if self.decoder is None:
                raise RuntimeError(
                    "BASTION_COMPILE=true compiles the worker's written-out forward, which "
                    "runs Gemma 3 and Llama-family models with SDPA attention only"
                )
            self.decoder.compile()

    def new_sequence(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        stops: tuple[str, ...],
    ) -> Sequence:
        seq = Sequence(request_id, prompt_ids, params, max_tokens, stops)
        seq.detok = IncrementalDetokenizer(self.lm.tokenizer, prompt_ids)
        seq.stopper = StopMatcher(stops)
        seq.generator = make_generator(params)
        return seq

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> Batch:
        """Prefill prompts, plus what a preempted sequence had already generated:
        packed into one pass where the model's attention allows, else
        left-padded in passes of similar length (less padding computed) joined
        into one batch. Past a sliding window, one left-padded pass."""
        lengths = [s.context_length for s in seqs]
        if not batching.joinable_after_prefill(self.lm.model.config, max(lengths)):
            return self._prefill(seqs)
        if self.packs:
            return self._packed(seqs, running=None)
        batch: Batch | None = None
        for group in batching.length_groups(lengths):
            new = self._prefill([seqs[i] for i in group])
            batch = new if batch is None else self.join(batch, new)
        assert batch is not None
        return batch

    def _prefill(self, seqs: list[Sequence]) -> Batch:
        device = self.lm.device
        contexts = [s.prompt_ids + s.output_ids for s in seqs]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(seqs), width), self.lm.pad_id, dtype=torch.long)  # [B, T]
        for row, context in enumerate(contexts):
            ids[row, width - len(context) :] = torch.tensor(context)
        ids, mask = ids.to(device), _left_padded([len(c) for c in contexts], width).to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = kvcache.new_cache(self.lm.model.config)
        out = self.lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = Batch(seqs, cache, mask, positions[:, -1], ids[:, -1])
        self._advance(batch, out.logits[:, -1, :])
        return batch

    def step(
        self,
        batch: Batch | None,
        joining: list[Sequence],
        chunk: Sequence | None = None,
        chunk_tokens: int = 0,
        shared: bool = True,
    ) -> Step:
        """One step: decode a token for each row of ``batch``, prefilling
        ``joining`` in the same pass (or on their own when there is no batch),
        and the next ``chunk_tokens`` positions of ``chunk``'s prefill, which
        joins the batch once complete if the batch can take rows. With
        ``shared``, where the written-out forward can, the chunk goes into the
        decode step's own pass (:meth:`Decoder.step_and_chunk`); an exception
        there fails the step. A chunk in a pass of its own that raises ends
        only its sequence: the exception is returned, not raised."""
        result = Step(batch)
        decoding = batch is not None and not batch.done
        one_pass = shared and self.decoder is not None and decoding and not joining
        if one_pass and chunk is not None and not chunk.finished:
            return self._shared_step(result, chunk, chunk_tokens)
        started = time.perf_counter()
        if batch is None and joining:
            result.batch = self.prefill(joining)
        elif batch is not None and (joining or decoding):
            result.batch = self.decode_step(batch, joining)
            if not joining:
                result.decode_s = time.perf_counter() - started
        if chunk is None or chunk.finished:
            return result
        started = time.perf_counter()
        try:
            done = self.prefill_part(chunk, chunk_tokens)
        except Exception as exc:
            self.drop_part(chunk)
            result.chunk_failure = exc
            return result
        result.chunk_s = time.perf_counter() - started
        return self._chunked(result, done)

    @torch.inference_mode()
    def _shared_step(self, result: Step, chunk: Sequence, tokens: int) -> Step:
        """The decode step and the chunk in one written-out pass."""
        batch = result.batch
        assert batch is not None and self.decoder is not None
        started = time.perf_counter()
        ids, positions, complete = self._piece(chunk, tokens)
        self._extend(batch)
        rows, last = self.decoder.step_and_chunk(
            batch.last_tokens, batch.positions, batch.attention_mask, batch.cache,
            ids, positions, chunk.partial,
        )  # fmt: skip
        self._advance(batch, rows)
        result.shared_s = time.perf_counter() - started
        return self._chunked(result, self._pieced(chunk, ids, positions, last, complete))

    def _chunked(self, result: Step, done: Batch | None) -> Step:
        """``result`` once a chunk ran: with ``done`` (its sequence's complete
        one-row batch), joined to the batch, or waiting where it takes no rows."""
        if done is not None:
            result.chunk_done = True
            if result.batch is None:
                result.batch = done
            elif result.batch.joinable:
                result.batch = self.join(result.batch, done)
            else:
                result.ready = done
        return result

    @torch.inference_mode()
    def prefill_part(self, seq: Sequence, tokens: int) -> Batch | None:
        """Prefill the next ``tokens`` positions of ``seq``'s context into its
        own cache (through the written-out forward where the model has one),
        attending to the positions before them: chunked prefill,
        so that a long prompt is taken in pieces between decode steps instead
        of in one pass that stalls them. Returns None until the last piece,
        then a one-row batch with the first token sampled, ready to join."""
        ids, positions, complete = self._piece(seq, tokens)
        if self.decoder is not None:
            logits = self.decoder.chunk(ids, positions, seq.partial)  # [1, V]
        else:
            logits = self.lm.model(
                input_ids=ids[None],
                attention_mask=torch.ones((1, seq.prefilled + len(ids)), dtype=torch.long,
                                          device=ids.device),
                position_ids=positions[None],
                cache=seq.partial,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]  # fmt: skip
        return self._pieced(seq, ids, positions, logits, complete)

    def _piece(self, seq: Sequence, tokens: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The next ``tokens`` of ``seq``'s context ([n]), their positions
        ([n]), and whether they complete it; makes its cache if it has none."""
        context = seq.prompt_ids + seq.output_ids
        start, end = seq.prefilled, min(len(context), seq.prefilled + tokens)
        if seq.partial is None:
            seq.partial = kvcache.new_cache(self.lm.model.config)
        device = self.lm.device
        ids = torch.tensor(context[start:end], device=device)
        return ids, torch.arange(start, end, device=device), end == len(context)

    def _pieced(
        self,
        seq: Sequence,
        ids: torch.Tensor,
        positions: torch.Tensor,
        logits: torch.Tensor,  # [1, V] at the piece's last position
        complete: bool,
    ) -> Batch | None:
        """Note a piece as prefilled; the complete sequence's one-row batch,
        its first token sampled from ``logits``."""
        seq.prefilled = int(positions[-1]) + 1
        if not complete:
            return None
        assert seq.partial is not None  # the cache its pieces were written to
        mask = torch.ones((1, seq.prefilled), dtype=torch.long, device=ids.device)  # [1, T]
        batch = Batch([seq], seq.partial, mask, positions[-1:], ids[-1:])
        seq.partial, seq.prefilled = None, 0
        self._advance(batch, logits)
        return batch

    @staticmethod
    def drop_part(seq: Sequence) -> None:
        """Forget a chunked prefill in progress (it starts over if resumed)."""
        seq.partial, seq.prefilled = None, 0

    def can_join_in_step(self, batch: Batch, seqs: list[Sequence]) -> bool:
        """Whether :meth:`decode_step` can prefill ``seqs`` in its own pass and join them."""
        longest = max(s.context_length for s in seqs)
        config = self.lm.model.config
        return self.packs and batch.joinable and batching.joinable_after_prefill(config, longest)

    def _packed(self, seqs: list[Sequence], running: Batch | None) -> Batch:
        """One packed pass prefilling ``seqs`` and, with ``running``, decoding
        one token for each of its rows first; the new rows' batch (not joined)."""
        device = self.lm.device
        contexts = [s.prompt_ids + s.output_ids for s in seqs]
        lengths = [len(c) for c in contexts]
        skip = 0 if running is None else len(running.seqs)
        ends = torch.tensor(lengths).cumsum(0) + skip  # [B]
        spans = [(int(e) - n, int(e)) for e, n in zip(ends, lengths, strict=True)]
        ids = torch.tensor([t for c in contexts for t in c], device=device)  # [T]
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)  # [T]
        keep = ends - 1  # each prompt's last position
        decoding = None
        if running is not None:
            self._extend(running)
            ids = torch.cat([running.last_tokens, ids])
            positions = torch.cat([running.positions, positions])
            keep = torch.cat([torch.arange(skip), keep])
            decoding = attention.Decoding(skip, running.attention_mask.bool()[:, None, None, :])
        writer = kvcache.PackedWriter(
            self.lm.model.config,
            lengths,
            device,
            None if running is None else running.cache,
            decoding,
        )
        keep = keep.to(device)
        if self.decoder is not None:
            logits = self.decoder.packed(ids, positions, writer, keep, spans, decoding)
        else:
            logits = self.lm.model(
                input_ids=ids[None],  # [1, T]
                attention_mask=attention.NO_MASK,
                position_ids=positions[None],  # [1, T]
                cache=writer,
                use_cache=True,
                logits_to_keep=keep,
                **{attention.SPANS: spans, attention.DECODING: decoding},
            ).logits[0]  # [rows, V]
        if running is not None:
            self._advance(running, logits[:skip])
        last = torch.tensor([c[-1] for c in contexts])
        new = Batch(
            seqs, writer.cache, _left_padded(lengths, writer.width).to(device),
            torch.tensor(lengths, device=device) - 1, last.to(device),
        )  # fmt: skip
        self._advance(new, logits[skip:])
        return new

    @torch.inference_mode()
    def join(self, batch: Batch, new: Batch) -> Batch:
        """The running batch with ``new``'s (already prefilled) rows appended."""
        width = max(batch.attention_mask.shape[1], new.attention_mask.shape[1])
        batching.merge_caches(batch.cache, new.cache, width)
        return Batch(
            batch.seqs + new.seqs,
            batch.cache,
            batching.merge_rows(batch.attention_mask, new.attention_mask),
            torch.cat([batch.positions, new.positions]),
            torch.cat([batch.last_tokens, new.last_tokens]),
        )

    @torch.inference_mode()
    def evict(self, batch: Batch) -> Batch | None:
        """Drop the rows whose sequences have finished and been published."""
        return self._keep(batch, [i for i, s in enumerate(batch.seqs) if not s.published])

    @torch.inference_mode()
    def preempt(self, batch: Batch, seq: Sequence) -> Batch | None:
        """Take an unfinished sequence out to free its KV memory; prefilling it
        again later (prompt plus its output so far) resumes it exactly."""
        return self._keep(batch, [i for i, s in enumerate(batch.seqs) if s is not seq])

    def _keep(self, batch: Batch, keep: list[int]) -> Batch | None:
        if not keep:
            return None
        if len(keep) == len(batch.seqs):
            return batch
        order, mask = batching.keep_rows(batch.cache, batch.attention_mask, keep)
        rows = torch.tensor(order, device=batch.attention_mask.device)
        return Batch(
            [batch.seqs[i] for i in order],
            batch.cache,
            mask,
            batch.positions[rows],
            batch.last_tokens[rows],
        )

    @torch.inference_mode()
    def decode_step(self, batch: Batch, joining: list[Sequence] | None = None) -> Batch:
        """Decode one token for each row; with ``joining`` (where
        :meth:`can_join_in_step` says so), prefill those in the same packed
        pass and return the batch with them joined."""
        if joining:
            return self.join(batch, self._packed(joining, batch))
        self._extend(batch)
        if self.decoder is not None:
            logits = self.decoder(
                batch.last_tokens, batch.positions, batch.attention_mask, batch.cache
            )
        else:
            logits = self.lm.model(
                input_ids=batch.last_tokens[:, None],  # [B, 1]
                attention_mask=batch.attention_mask,
                position_ids=batch.positions[:, None],
                cache=batch.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
        self._advance(batch, logits)
        return batch

    def _extend(self, batch: Batch) -> None:
        """Give every row its next position, for the token it decodes now."""
        ones = torch.ones((len(batch.seqs), 1), dtype=torch.long, device=self.lm.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=-1)
        batch.positions = batch.positions + 1

    def _advance(self, batch: Batch, logits: torch.Tensor) -> None:  # logits: [B, V]
        live = [i for i, s in enumerate(batch.seqs) if not s.finished]
        if not live:  # a finished batch stepped only to carry joining rows
            return
        if len(live) < len(batch.seqs):
            logits = logits[live]  # a copy: [rows, vocab] is 25 MB at 24 rows of Gemma 3
        chosen = sample(
            logits,
            [batch.seqs[i].params for i in live],
            [batch.seqs[i].generator for i in live],
            [(batch.seqs[i].prompt_ids, batch.seqs[i].output_ids) for i in live],
        )
        next_tokens = batch.last_tokens.tolist()
        for row, token in zip(live, chosen, strict=True):
            seq = batch.seqs[row]
            if isinstance(token, RowFailure):
                self.fail(seq, str(token))
                continue  # the row keeps its last token until it leaves the batch
            next_tokens[row] = token
            try:
                self._accept(seq, token)
            except Exception as exc:  # detokenising or stop matching this row's text
                log.exception("accepting a token for %s failed", seq.request_id)
                self.fail(seq, f"decoding the output failed: {type(exc).__name__}")
        batch.last_tokens = torch.tensor(next_tokens, device=batch.last_tokens.device)

    @staticmethod
    def fail(seq: Sequence, why: str) -> None:
        """End ``seq`` with an error; the rest of its batch goes on."""
        if not seq.finished:
            seq.finish_reason, seq.failure = "error", why

    def _accept(self, seq: Sequence, token: int) -> None:
        assert seq.detok is not None and seq.stopper is not None
        if token in self.lm.eos_ids and not seq.params.ignore_eos:
            seq.pending_text += seq.stopper.feed(seq.detok.flush()) + seq.stopper.flush()
            seq.finish_reason = "stop"
            return
        seq.output_ids.append(token)
        seq.pending_text += seq.stopper.feed(seq.detok.add(token))
        if seq.stopper.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.max_tokens:
            seq.pending_text += seq.stopper.feed(seq.detok.flush()) + seq.stopper.flush()
            seq.finish_reason = "length"

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run a prefill and two decode steps at 2 rows, then at 1, and throw them
        away: torch.compile compiles these shapes here, at start-up, and a model
        it cannot compile fails here instead of at a first request."""
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        for rows in (2, 1):
            seqs = [
                self.new_sequence(f"warm-up-{i}", [self.lm.pad_id] * (4 + i), params, 3, ())
                for i in range(rows)
            ]
            batch = self.prefill(seqs)
            for _ in range(2):
                self.decode_step(batch)

    @staticmethod
    def cancel(seq: Sequence) -> None:
        if not seq.finished:
            seq.finish_reason = "cancelled"

    @staticmethod
    def take_text(seq: Sequence) -> str:
        text, seq.pending_text = seq.pending_text, ""
        return text


def _left_padded(lengths: list[int], width: int) -> torch.Tensor:
    """The attention mask of rows of these lengths right-aligned in ``width``
    columns: [rows, width], 1 where a row has a position."""
    columns = torch.arange(width)
    return (columns >= width - torch.tensor(lengths)[:, None]).long()
