"""A decode step's forward pass written out for Gemma 3 and Llama, instead of
run through transformers' module stack.

A decode step computes one token for each of a few dozen rows, so beyond the
matrix products its cost is the number of small operations and Python calls.
Through transformers each step builds masks, passes several wrappers per layer
and normalises and rotates queries and keys separately. Here the weights,
norms, MLPs and cache are the model's own modules (the packed, merged and fused
ones where the loader swapped them in); only the glue is written out: the
padding mask is the mask, rotary tables are computed once per layer type, a
layer's query and key heads are normalised and rotated as one tensor, and each
kv head's query heads go to SDPA as one block of query positions
(:func:`bastion_worker.model.attention.one_token`), which the CPU runs much
faster than SDPA's own grouping.

The arithmetic is transformers': in float32 the logits match theirs to
rounding (tested, sliding windows and left padding included). Decode steps,
packed passes and chunks of a long prompt take this path; left-padded
prefills and other architectures keep transformers' forward. vLLM writes its
models out the same way, over its own kernels. Measurements: bench/history.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, LlamaForCausalLM
from transformers.models.gemma3.modeling_gemma3 import rotate_half

from bastion_worker.model import attention, compiled
from bastion_worker.model.norms import GemmaRMSNorm, normalised


class Decoder:
    """``decoder(tokens, positions, mask, cache)``: the next-token logits ([B, V])
    for ``tokens`` ([B], one per row) at ``positions`` ([B]), each row attending
    to its cached positions where ``mask`` ([B, width], the batch's padding mask
    with this step's column) is 1; ``cache``'s layers get this step's keys and values."""

    def __init__(self, model: Any) -> None:
        config = model.config
        inner = model.model
        self.gemma = isinstance(model, Gemma3ForCausalLM)
        self.layers = list(inner.layers[: config.num_hidden_layers])
        types = getattr(config, "layer_types", None)
        self.types = list(types or ["full_attention"] * len(self.layers))
        # Per layer: the sliding window it attends within, or None.
        window = getattr(config, "sliding_window", None)
        self.windows = [window if t == "sliding_attention" else None for t in self.types]
        attn = self.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.qk_width = (self.heads + self.kv_heads) * self.head_dim
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.head = model.lm_head
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.compiled_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # Gemma 3's query and key norms as one: both normalise over head_dim,
        # each head with its own scale. [heads + kv_heads, head_dim]
        self.qk_scales: list[torch.Tensor | None] = [None] * len(self.layers)
        if self.gemma:
            for i, layer in enumerate(self.layers):
                q, k = layer.self_attn.q_norm, layer.self_attn.k_norm
                if isinstance(q, GemmaRMSNorm) and isinstance(k, GemmaRMSNorm) and q.eps == k.eps:
                    self.qk_scales[i] = torch.cat(
                        [q.scale.expand(self.heads, -1), k.scale.expand(self.kv_heads, -1)]
                    )

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        return self._logits(self._hidden(tokens, positions, self._decoding(mask, cache)))

    def _decoding(self, mask: torch.Tensor, cache: Any) -> compiled.Attend:
        """Attention for one token a row against the batch's cache, which gets
        their keys and values; ``mask`` is the batch's padding mask."""
        attends = mask.bool()[:, None, None, :]  # [B, 1, 1, width]
        unpadded = bool(attends.all())  # then SDPA runs without a mask

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            scale = self.layers[i].self_attn.scaling
            keys, values = cache.layers[i].update(k[:, :, None], v[:, :, None])  # [B, kv, n, d]
            window = None if unpadded else attends[..., -keys.shape[2] :]
            return attention.one_token(q, keys, values, window, scale)

        return attend

    def compile(self) -> None:
        """Run the layers through ``torch.compile`` from now on
        (:mod:`bastion_worker.model.compiled`); the first passes compile."""
        self.compiled_forward = compiled.compile_forward(
            lambda tokens, positions: self._forward(tokens, positions, compiled.attend)
        )

    def _hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attend: compiled.Attend,
    ) -> torch.Tensor:
        if self.compiled_forward is None:
            return self._forward(tokens, positions, attend)
        with compiled.attending(attend):
            return self.compiled_forward(tokens, positions)

    def packed(
        self,
        tokens: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        writer: Any,  # kvcache.PackedWriter
        keep: torch.Tensor,  # [rows] the positions whose logits are wanted
        spans: list[tuple[int, int]],
        decoding: attention.Decoding | None,
    ) -> torch.Tensor:
        """A packed pass (:mod:`bastion_worker.model.attention`): prompts back to back,
        after ``decoding``'s running rows' one token each; logits at ``keep``."""

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            a = self.layers[i].self_attn
            # [1, heads, T, head_dim]: one row holding every prompt, as transformers lays it out
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            k, v = writer.update(k, v, i)
            extra: dict[str, Any] = {attention.SPANS: spans, attention.DECODING: decoding}
            out, _ = attention.packed_sdpa(a, q, k, v, None, scaling=a.scaling, **extra)
            return out[0]  # [T, heads, head_dim]

        return self._logits(self._hidden(tokens, positions, attend)[keep])

    def chunk(
        self,
        tokens: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N] consecutive, from the cached length on
        cache: Any,  # the sequence's own one-row cache (kvcache.new_cache)
    ) -> torch.Tensor:
        """A piece of one sequence's context (chunked prefill): each token
        attends to the positions before it in ``cache``, which gets their keys
        and values; the logits of the last ([1, V]). Eager: a compiled graph
        is shaped for decode steps."""
        attend = self._chunking(positions, cache)
        return self._logits(self._forward(tokens, positions, attend)[-1:])

    def step_and_chunk(
        self,
        tokens: torch.Tensor,  # [B] each row's latest token
        positions: torch.Tensor,  # [B]
        mask: torch.Tensor,  # [B, width] the batch's padding mask with this step's column
        cache: Any,
        chunk_tokens: torch.Tensor,  # [N]
        chunk_positions: torch.Tensor,  # [N]
        chunk_cache: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step and a chunk of another sequence's prefill in one pass,
        so that each weight is read once for both (vLLM schedules chunked
        prefill into the decode batch the same way): the rows' logits
        ([B, V]) and the chunk's last ([1, V]). Eager, as :meth:`chunk`."""
        rows = tokens.shape[0]
        decoding = self._decoding(mask, cache)
        chunking = self._chunking(chunk_positions, chunk_cache)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            head = decoding(i, q[:rows], k[:rows], v[:rows])
            return torch.cat([head, chunking(i, q[rows:], k[rows:], v[rows:])])

        hidden = self._forward(
            torch.cat([tokens, chunk_tokens]), torch.cat([positions, chunk_positions]), attend
        )
        logits = self._logits(torch.cat([hidden[:rows], hidden[-1:]]))
        return logits[:rows], logits[rows:]

    def _chunking(self, positions: torch.Tensor, cache: Any) -> compiled.Attend:
        """Attention for a piece of one sequence at ``positions`` against the
        positions before it in its own ``cache``, which gets their keys and values."""
        n = positions.shape[0]
        end = int(positions[-1]) + 1  # positions held once this piece is in
        query = positions[:, None]  # [N, 1]
        group = self.heads // self.kv_heads

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = cache.layers[i].update(
                k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            )  # [1, kv_heads, width, head_dim]: the columns this layer attends over
            width = keys.shape[2]
            held = torch.arange(end - width, end, device=q.device)[None]  # [1, width]
            mask = held <= query  # [N, width]
            window = self.windows[i]
            if window is not None:
                mask &= held > query - window
            # Each kv head's query heads as one block of query positions, as in decode steps.
            folded = q.transpose(0, 1).reshape(1, self.kv_heads, group * n, self.head_dim)
            out = F.scaled_dot_product_attention(
                folded, keys, values, attn_mask=mask.repeat(group, 1),
                scale=self.layers[i].self_attn.scaling,
            )  # fmt: skip
            return out.reshape(self.heads, n, self.head_dim).transpose(0, 1)

        return attend

    def _forward(
        self,
        tokens: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        attend: compiled.Attend,
    ) -> torch.Tensor:
        """The last hidden states ([N, hidden]) of ``tokens``, layer ``i``'s
        attention being ``attend(i, q, k, v)`` ([N, heads or kv_heads, head_dim] each)."""
        n = tokens.shape[0]
        x: torch.Tensor = self.embed(tokens)  # [N, hidden]
        rope = {}
        for kind in set(self.types):
            args = (kind,) if self.gemma else ()
            cos, sin = self.rotary(x, positions[:, None], *args)  # [N, 1, head_dim]
            rope[kind] = cos, sin
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            merged = getattr(a, "qkv_proj", None)  # onednn.MergedProjections
            if merged is not None:  # query and key heads side by side already
                qkv = merged.product(h)
                qk = qkv[:, : self.qk_width].view(n, self.heads + self.kv_heads, self.head_dim)
                v = qkv[:, self.qk_width :].view(n, self.kv_heads, self.head_dim)
            else:
                q = a.q_proj(h).view(n, self.heads, self.head_dim)
                k = a.k_proj(h).view(n, self.kv_heads, self.head_dim)
                v = a.v_proj(h).view(n, self.kv_heads, self.head_dim)
                qk = torch.cat([q, k], dim=1)  # [N, heads + kv_heads, head_dim]
            if self.gemma:
                scale = self.qk_scales[i]
                if scale is not None:
                    qk = normalised(qk, a.q_norm.eps).mul_(scale).type_as(qk)
                else:
                    q, k = qk[:, : self.heads], qk[:, self.heads :]
                    qk = torch.cat([a.q_norm(q), a.k_norm(k)], dim=1)
            cos, sin = rope[self.types[i]]
            qk = qk * cos + rotate_half(qk) * sin
            out = attend(i, qk[:, : self.heads], qk[:, self.heads :], v)
            out = a.o_proj(out.reshape(n, self.heads * self.head_dim))
            if self.gemma:
                x = x + layer.post_attention_layernorm(out)
                mlp = layer.mlp(layer.pre_feedforward_layernorm(x))
                x = x + layer.post_feedforward_layernorm(mlp)
            else:
                x = x + out
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.norm(x))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def supports(model: Any) -> bool:
    """Whether ``model``'s architecture is one written out here and runs plain
    causal SDPA attention (not FlashAttention-2, eager or soft-capped logits)."""
    config = model.config
    if config._attn_implementation not in ("sdpa", attention.NAME):
        return False
    if type(model) is Gemma3ForCausalLM:
        return config.attn_logit_softcapping is None and not config.use_bidirectional_attention
    return type(model) is LlamaForCausalLM


def for_model(model: Any) -> Decoder | None:
    """A :class:`Decoder` for ``model`` where :func:`supports` says so; else None
    (transformers' forward)."""
    return Decoder(model) if supports(model) else None
