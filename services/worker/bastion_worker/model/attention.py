"""Attention for packed prefill: several prompts in one forward pass, back to
back in one row, with no padding.

A left-padded prefill computes every prompt at the longest one's width: the
bench's prompts of 16 to 96 tokens are about 40% padding, and splitting them
into passes of similar length costs a fixed overhead per pass. Packed, the
linear layers (most of the work) see each real token once, in one large
product. Only attention must keep the prompts apart; it runs per prompt over
its own span, with the same first token for every prompt as a padded pass.

transformers picks attention by the name in ``config._attn_implementation``,
so this module registers :data:`NAME`: PyTorch SDPA as transformers calls it,
except in a forward pass given ``bastion_spans``, where each span attends
causally to itself only. vLLM's transformers backend plugs its varlen
attention in the same way; transformers' SDPA has no varlen form to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "bastion_sdpa"
SPANS = "bastion_spans"  # the forward-pass keyword: [(start, end)] of each prompt
DECODING = "bastion_decoding"  # and, when running rows decode in the same pass: a Decoding


@dataclass
class Decoding:
    """Running rows decoding one token each at the front of a packed pass
    (before the prompts' spans), each attending to its own cached positions."""

    rows: int
    mask: torch.Tensor  # [rows, 1, 1, width] bool: the positions each row attends to
    # Per layer, the rows' keys and values with this step's written in:
    # [rows, kv_heads, width, head_dim]. Filled by the cache as the pass runs.
    cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def attend(self, query: torch.Tensor, layer: int, scaling: float | None) -> torch.Tensor:
        """``query``'s first ``rows`` positions ([1, heads, T, head_dim]) against
        their caches: [heads, rows, head_dim]."""
        keys, values = self.cached[layer]
        q = query[0, :, : self.rows].transpose(0, 1)  # [rows, heads, head_dim]
        return one_token(q, keys, values, self.mask, scaling).transpose(0, 1)


def one_token(
    query: torch.Tensor,  # [rows, heads, head_dim]: one position per row
    keys: torch.Tensor,  # [rows, kv_heads, width, head_dim]: each row's cache
    values: torch.Tensor,
    mask: torch.Tensor | None,  # [rows, 1, 1, width] bool: the positions each row attends to
    scale: float | None,
) -> torch.Tensor:
    """Each row's one query against its cache: [rows, heads, head_dim]. A kv
    head's query heads attend as one block of "positions", so the keys need no
    repeating (as transformers' SDPA does for one-token queries)."""
    rows, heads, dim = query.shape
    q = query.reshape(rows, keys.shape[1], -1, dim)  # [rows, kv_heads, heads per kv head, dim]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(rows, heads, dim)


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, heads, T, head_dim]
    key: torch.Tensor,  # [B, kv_heads, T, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    spans: list[tuple[int, int]] | None = kwargs.pop(SPANS, None)
    decoding: Decoding | None = kwargs.pop(DECODING, None)
    if spans is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # One row holding every prompt; a sliding window wider than each prompt
    # (the engine packs only then) changes nothing within a span.
    causal = bool(getattr(module, "is_causal", True))
    out = torch.empty_like(query)
    if decoding is not None:
        out[0, :, : decoding.rows] = decoding.attend(query, cast(int, module.layer_idx), scaling)
    for start, end in spans:
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            is_causal=causal,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None  # [B, T, heads, head_dim]


def register() -> None:
    """Make :data:`NAME` loadable (``attn_implementation=NAME``); outside packed
    passes it builds SDPA's masks and calls SDPA."""
    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def packs(model: Any) -> bool:
    """Whether ``model`` runs this module's attention, so can prefill packed."""
    return bool(model.config._attn_implementation == NAME)


# Stands in for the attention mask of a packed pass: transformers returns a 4D
# mask as it is instead of building one, and packed_sdpa never reads it.
NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)
