"""Joining sequences into a running batch and dropping finished ones, on the
KV cache itself: the continuous part of continuous batching.

Rows are left-padded to one width; the attention mask marks the padding.
Joining pads the shorter side's cache on the left and concatenates rows;
leaving moves the last rows into the gaps and trims columns that are padding
in every row. Full-attention layers can always be joined; a sliding-window
layer (Gemma 3) only while its window has not filled, when it still holds
every position. After that the batch takes no new rows until it ends, but
finished rows still leave.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from bastion_worker.engine.kvcache import BufferedLayer, BufferedSlidingWindowLayer, kv_layers


def _holds_everything(layer: object) -> bool:
    if type(layer) is BufferedLayer:
        return True
    if type(layer) is BufferedSlidingWindowLayer and layer.keys is not None:
        return bool(layer.keys.shape[-2] == layer.cumulative_length < layer.sliding_window - 1)
    return False


def joinable(cache: DynamicCache) -> bool:
    return all(_holds_everything(layer) for layer in cache.layers)


def _resync(layer: object) -> None:
    """A sliding-window layer counts the positions it has seen; keep it true."""
    if isinstance(layer, DynamicSlidingWindowLayer) and layer.keys is not None:
        layer.cumulative_length = layer.keys.shape[-2]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_caches(a: DynamicCache, b: DynamicCache, width: int) -> None:
    """Append ``b``'s rows to ``a`` (in place), both left-padded to ``width`` positions."""
    for la, lb in zip(kv_layers(a), kv_layers(b), strict=True):
        assert la.keys is not None and la.values is not None
        assert lb.keys is not None and lb.values is not None
        if isinstance(la, BufferedLayer):  # in place: only b's rows are copied
            la.join(lb.keys, lb.values, width)
            _resync(la)
            continue
        la.keys = torch.cat([_left_pad(la.keys, width, -2), _left_pad(lb.keys, width, -2)])
        la.values = torch.cat([_left_pad(la.values, width, -2), _left_pad(lb.values, width, -2)])
        _resync(la)


def merge_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate two [B, T] masks, left-padding the narrower with zeros."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([_left_pad(a, width, 1), _left_pad(b, width, 1)])


def keep_rows(
    cache: DynamicCache, mask: torch.Tensor, keep: list[int]
) -> tuple[list[int], torch.Tensor]:
    """Keep the rows ``keep`` (in place) and return their new order and mask.

    Rows past the last kept position move into the gaps left by those that go,
    so only the moved rows are copied. Where the cache still holds every
    position, columns that are padding in every remaining row are dropped; a
    sliding-window layer past its window keeps its columns (its positions
    count on), and only loses rows.
    """
    n = len(keep)
    kept = set(keep)
    holes = [i for i in range(n) if i not in kept]
    movers = [r for r in keep if r >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    mask = mask[order]
    trim = 0
    if joinable(cache):
        used = mask.any(dim=0).nonzero()
        trim = int(used[0]) if len(used) else mask.shape[1]
    for layer in kv_layers(cache):
        if isinstance(layer, BufferedLayer):
            layer.keep_rows(holes, movers, n, trim)
        else:
            assert layer.keys is not None and layer.values is not None
            layer.keys = layer.keys[order, :, trim:, :]
            layer.values = layer.values[order, :, trim:, :]
        if trim:
            _resync(layer)
    return order, mask[:, trim:]


def length_groups(lengths: list[int], slack: float = 0.8, min_saved: int = 128) -> list[list[int]]:
    """Indices of prompts grouped for separate prefill passes, longest first.

    One left-padded pass computes every row at the longest prompt's width; for
    prompts of 16 to 96 tokens that is 40% padding. A new group starts where the
    next prompt is shorter than ``slack`` times its group's longest and the
    padding saved over the prompts still to place is at least ``min_saved``
    tokens (so a few short prompts do not pay for extra passes).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for placed, i in enumerate(order):
        if groups:
            top = lengths[groups[-1][0]]
            saved = (top - lengths[i]) * (len(order) - placed)
            if not (lengths[i] < slack * top and saved >= min_saved):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def joinable_after_prefill(config: Any, width: int) -> bool:
    """Whether a cache prefilled ``width`` positions wide can still be joined:
    always without sliding-window layers, else while the window holds it all."""
    window = getattr(config, "sliding_window", None)
    return not window or width < window - 1
