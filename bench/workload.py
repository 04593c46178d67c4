"""The benchmark workload: a fixed-seed synthetic set of requests.

Prompt lengths are uniform between ``prompt_range`` tokens and output lengths
uniform between ``output_range`` tokens; prompts are random words of a fixed
vocabulary, tokenised by the model under test; every request generates exactly
its output length (end-of-sequence ignored), greedily, so all systems do the
same work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = (
    "the gateway checks every request before it reaches a model tokens stream back to the "
    "client bank hospital factory security audit private deployment batch scheduler cache "
    "prompt output latency throughput worker guard policy tenant key budget limit"
).split()


@dataclass(frozen=True, slots=True)
class Item:
    prompt_ids: list[int]
    output_tokens: int


def make(
    tokenizer: object,
    n: int,
    prompt_range: tuple[int, int] = (16, 96),
    output_range: tuple[int, int] = (16, 96),
    seed: int = 1234,
) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        want = rng.randint(*prompt_range)
        words: list[str] = []
        ids: list[int] = []
        while len(ids) < want:
            words.append(rng.choice(WORDS))
            ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        items.append(Item(ids[:want], rng.randint(*output_range)))
    return items
