"""Which waiting requests join the running batch at the next step. Pure
Python, no torch: the policy is unit-tested on its own.

- At most ``max_seqs`` sequences run at once.
- The prompt tokens prefilled in one step stay within ``prefill_budget``, so a
  burst of long prompts does not stall the sequences already decoding; a
  single prompt longer than the budget still gets in when the batch is empty.
- Order is by priority, then arrival (FCFS); waiting raises a request's
  effective priority by one level per ``aging_s`` seconds, so nothing starves.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def order(waiting: list[Waiting], now: float, config: SchedulerConfig) -> list[Waiting]:
    def key(w: Waiting) -> tuple[float, float]:
        return (-(w.priority + (now - w.arrived) / config.aging_s), w.arrived)

    return sorted(waiting, key=key)


def admit(
    waiting: list[Waiting], running: int, now: float, config: SchedulerConfig
) -> list[Waiting]:
    """The requests to prefill and join now, in order."""
    chosen: list[Waiting] = []
    budget = config.prefill_budget
    for w in order(waiting, now, config):
        if running + len(chosen) >= config.max_seqs:
            break
        alone = running == 0 and not chosen
        if w.prompt_tokens > budget and not alone:
            break  # keep the order: nothing overtakes the request at the head
        chosen.append(w)
        budget -= w.prompt_tokens
    return chosen
