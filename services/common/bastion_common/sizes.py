"""Estimating token counts where no tokenizer is at hand (gateway, guard)."""

from __future__ import annotations

import math

# About four bytes a token for English with BPE tokenizers; CJK text runs
# nearer three bytes a character and one or two tokens per character, so this
# under-counts it. Estimates are corrected from the worker's exact counts.
BYTES_PER_TOKEN = 4


def estimate_tokens(text_bytes: int) -> int:
    return max(1, math.ceil(text_bytes / BYTES_PER_TOKEN))
