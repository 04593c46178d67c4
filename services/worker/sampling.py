"""Choosing the next token for each row of a batch, each with its own parameters."""

from __future__ import annotations

import torch

from bastion_common.messages import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(params.seed)
    return generator


def sample_row(
    logits: torch.Tensor,  # [V] float
    params: SamplingParams,
    generator: torch.Generator | None,
) -> int:
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sample(
    logits: torch.Tensor,  # [B, V]
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    chosen = torch.argmax(logits, dim=-1).tolist()  # greedy rows, all at once
    for i, p in enumerate(params):
        if p.temperature != 0.0:
            chosen[i] = sample_row(logits[i], p, generators[i])
    return [int(c) for c in chosen]
