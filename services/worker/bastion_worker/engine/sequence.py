"""What the engine carries between steps: each request's generation state, the
running batch with its cache, and what a step did."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from bastion_common.messages import SamplingParams
from bastion_worker.engine import batching
from bastion_worker.engine.detokenize import IncrementalDetokenizer
from bastion_worker.engine.stops import StopMatcher


@dataclass
class Sequence:
    """One request's generation state."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stops: tuple[str, ...]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    failure: str | None = None  # why, when finish_reason is "error"
    pending_text: str = ""  # released by detokeniser and stop matcher, not yet published
    published: bool = False  # the final record went out
    detok: IncrementalDetokenizer | None = None
    stopper: StopMatcher | None = None
    generator: torch.Generator | None = None
    # Chunked prefill (:meth:`Engine.prefill_part`): context positions in
    # ``partial``, this sequence's own cache, until the whole context is in.
    prefilled: int = 0
    partial: DynamicCache | None = None

    @property
    def context_length(self) -> int:
        """Tokens a (re)prefill covers: the prompt and what was generated."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Step:
    """What one call of :meth:`Engine.step` did."""

    batch: Batch | None  # the running batch after the step
    chunk_done: bool = False  # the chunked sequence's prefill is complete
    ready: Batch | None = None  # ... but the batch takes no rows: it waits
    chunk_failure: Exception | None = None  # the chunk raised; it fails alone
    decode_s: float | None = None  # a plain decode step's time
    chunk_s: float | None = None  # a chunk's time, in a pass of its own
    shared_s: float | None = None  # a decode step's with a chunk in its pass


@dataclass
class Batch:
    seqs: list[Sequence]
    cache: DynamicCache  # layers of kvcache.BufferedLayer: written in place, one column per step
    attention_mask: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B] position of each row's latest token
    last_tokens: torch.Tensor  # [B]

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def joinable(self) -> bool:
        return batching.joinable(self.cache)

    @property
    def kv_tokens(self) -> int:
        """Cached positions, padding included: rows times width."""
        rows, width = self.attention_mask.shape
        return int(rows * width)
