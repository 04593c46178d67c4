"""Every admission decision of the worker: which waiting requests join the
running batch at the next step, how much of a long prompt to prefill in it,
what fits the KV budget, and which running sequence to preempt when the next
step would not. Pure Python, no torch: the policy is unit-tested on its own,
and the step loop (:mod:`bastion_worker.serving.loop`) only carries it out.

- At most ``max_seqs`` sequences run at once.
- The prompt tokens prefilled whole in one step stay within
  ``prefill_budget``, so a burst of prompts does not stall the sequences
  already decoding. A prompt longer than ``long_prompt`` is prefilled in
  chunks instead, one such prompt at a time, beside the decode steps
  (chunked prefill, as in vLLM and TGI, whose ``long_prefill_token_threshold``
  this is); :class:`ChunkSizer` sizes the chunks.
- Order is by priority, then arrival (FCFS); waiting raises a request's
  effective priority by one level per ``aging_s`` seconds, so nothing starves.
- Under a KV budget (cached positions, rows x width), admission takes the
  longest prefix of its choice that fits (:func:`fit_kv_budget`), and the
  newest, lowest-priority running sequence is preempted while the next step
  would not fit (:func:`preemption_victim`); it resumes by recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Waiting:
    request_id: str
    prompt_tokens: int
    arrived: float
    priority: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_seqs: int = 8
    prefill_budget: int = 2048
    aging_s: float = 10.0
    long_prompt: int = 512


@dataclass(frozen=True, slots=True)
class Admission:
    whole: list[Waiting] = field(default_factory=list)  # prefilled whole, in order
    chunked: Waiting | None = None  # prefilled in chunks from now on


def order(waiting: list[Waiting], now: float, config: SchedulerConfig) -> list[Waiting]:
    def key(w: Waiting) -> tuple[float, float]:
        return (-(w.priority + (now - w.arrived) / config.aging_s), w.arrived)

    return sorted(waiting, key=key)


def admit(
    waiting: list[Waiting],
    running: int,
    now: float,
    config: SchedulerConfig,
    chunking: bool = False,
) -> Admission:
    """The requests to start now. ``chunking``: a chunked prefill is under way
    already, so a long prompt waits (and nothing overtakes it)."""
    whole: list[Waiting] = []
    chunked: Waiting | None = None
    budget = config.prefill_budget
    for w in order(waiting, now, config):
        if running + len(whole) + (chunked is not None) >= config.max_seqs:
            break
        if w.prompt_tokens > config.long_prompt:
            if chunking or chunked is not None:
                break  # keep the order: nothing overtakes the request at the head
            chunked = w
            continue
        if w.prompt_tokens > budget:
            break
        whole.append(w)
        budget -= w.prompt_tokens
    return Admission(whole, chunked)


@dataclass(frozen=True, slots=True)
class Running:
    request_id: str
    arrived: float
    priority: int = 0


def fit_kv_budget(chosen: list[Waiting], rows: int, width: int, budget: int) -> list[Waiting]:
    """The longest prefix of ``chosen`` whose batch fits ``budget`` cached positions,
    joining a batch of ``rows`` x ``width`` (0 x 0: none). Every row is padded to
    the widest, and the next step adds one column. One sequence always runs on an
    empty batch. A budget of 0 means no limit."""
    while budget and chosen and (rows or len(chosen) > 1):
        wide = max(width, *(w.prompt_tokens for w in chosen))
        if (rows + len(chosen)) * (wide + 1) <= budget:
            break
        chosen = chosen[:-1]
    return chosen


def preemption_victim(live: list[Running], kv_tokens: int, rows: int, budget: int) -> str | None:
    """The running sequence to preempt before the next step, or None when the
    step fits: that step writes one position for each of ``rows`` rows on top of
    ``kv_tokens``. The newest of the lowest priority goes; the last live
    sequence never does. A budget of 0 means no limit."""
    if not budget or len(live) < 2 or kv_tokens + rows <= budget:
        return None
    return max(live, key=lambda r: (-r.priority, r.arrived)).request_id


# A chunk takes about this many times as long as the decode step beside it, so
# that a step with a chunk lasts under twice a plain one (the estimate lags as
# a chunk's cost grows with the positions before it); with nothing decoding,
# about IDLE_CHUNK_S, so that a request arriving meanwhile waits no longer
# than that for its first token.
CHUNK_TIME_RATIO = 0.7
IDLE_CHUNK_S = 0.05
SMOOTHING = 0.3  # weight of the newest measurement in the running averages


@dataclass
class ChunkSizer:
    """How many positions of a long prompt to prefill in the next step: about
    as long as the decode step beside it takes (IDLE_CHUNK_S when nothing is
    decoding), from running averages of both (a chunk's cost per position
    grows with the positions before it), at least ``least`` and at most
    ``budget``."""

    budget: int
    least: int = 16
    decode_s: float | None = None
    position_s: float | None = None

    def observe_decode(self, seconds: float) -> None:
        self.decode_s = _average(self.decode_s, seconds)

    def observe_chunk(self, positions: int, seconds: float) -> None:
        """A chunk in a pass of its own."""
        self.position_s = _average(self.position_s, seconds / max(1, positions))

    def observe_shared(self, positions: int, seconds: float) -> None:
        """A decode step with a chunk in its pass: the chunk's share is what
        the step took over a plain one (at least a tenth of the step)."""
        chunk_s = max(seconds - (self.decode_s or 0.0), 0.1 * seconds)
        self.observe_chunk(positions, chunk_s)

    def size(self, decoding: bool) -> int:
        if not decoding:
            target = IDLE_CHUNK_S
        elif self.decode_s is not None:
            target = CHUNK_TIME_RATIO * self.decode_s
        else:
            return self.least
        if self.position_s is None:
            return self.least
        return max(self.least, min(self.budget, int(target / self.position_s)))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
