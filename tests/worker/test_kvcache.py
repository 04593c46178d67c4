"""The worker's buffered KV cache gives the model exactly what transformers'
dynamic cache would, while writing each step in place."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from bastion_worker.engine.kvcache import (
    BufferedLayer,
    BufferedSlidingWindowLayer,
    PackedWriter,
    new_cache,
)


def _states(rows: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (rows, 2, n, 4)  # [B, kv heads, positions, head_dim]
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _run_side_by_side(ours: DynamicLayer, reference: DynamicLayer, steps: list[int]) -> int:
    """Feed both layers the same updates; return how often our buffer moved."""
    gen = torch.Generator().manual_seed(0)
    moves, last = 0, None
    for n in steps:
        k, v = _states(3, n, gen)
        got, want = ours.update(k, v), reference.update(k.clone(), v.clone())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == reference.get_seq_length()
        assert ours.get_mask_sizes(1) == reference.get_mask_sizes(1)
        assert ours.keys is not None
        ptr = ours.keys.untyped_storage().data_ptr()
        moves += ptr != last
        last = ptr
    return moves


def test_full_attention_layer_matches_concatenation_and_rarely_moves():
    steps = [17] + [1] * 300
    moves = _run_side_by_side(BufferedLayer(), DynamicLayer(), steps)
    # Growth by a quarter (at least 64 columns): a handful of moves, not one per step.
    assert moves <= 6


def test_sliding_window_layer_matches_transformers_past_its_window():
    window = 8
    # A prompt longer than the window, decoding well past it, then a 3-token chunk.
    steps = [12] + [1] * 200 + [3, 1, 1]
    moves = _run_side_by_side(
        BufferedSlidingWindowLayer(sliding_window=window),
        DynamicSlidingWindowLayer(sliding_window=window),
        steps,
    )
    assert moves <= 5  # it keeps 7 positions, moving them to the front once per ~64 steps


def test_assigned_tensors_are_adopted_and_grown_from():
    """Joining and leaving assign whole tensors, as batching.py does."""
    gen = torch.Generator().manual_seed(1)
    layer = BufferedLayer()
    layer.update(*_states(3, 5, gen))
    keys, values = layer.keys, layer.values
    assert keys is not None and values is not None
    layer.keys, layer.values = keys[[0, 2]], values[[0, 2]]  # a row left
    k, v = _states(2, 1, gen)
    got_k, got_v = layer.update(k, v)
    assert got_k.shape == (2, 2, 6, 4)
    assert torch.equal(got_k[:, :, :5], keys[[0, 2]]) and torch.equal(got_k[:, :, 5:], k)
    assert torch.equal(got_v[:, :, :5], values[[0, 2]]) and torch.equal(got_v[:, :, 5:], v)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys is None


def _hybrid_config():  # type: ignore[no-untyped-def]
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
    )


def test_new_cache_buffers_each_layer_type_of_a_hybrid_model():
    cache = new_cache(_hybrid_config())
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [BufferedSlidingWindowLayer] * 3 + [BufferedLayer]


def test_a_packed_pass_leaves_each_prompt_left_padded_with_room_for_the_next_steps():
    """The packed prefill's cache holds each prompt right-aligned after zeros,
    and the decode steps after it write into the same buffers (no copy of the
    whole cache on the first one, as when it was allocated exactly full)."""
    gen = torch.Generator().manual_seed(4)
    lengths = [3, 5, 2]
    writer = PackedWriter(_hybrid_config(), lengths, torch.device("cpu"))
    packed_k, packed_v = torch.randn((2, 1, 1, 10, 16), generator=gen)  # [1, kv, T, head_dim]
    for i in range(4):
        writer.update(packed_k, packed_v, i)
    starts = [0, 3, 8]
    for layer in writer.cache.layers:
        assert layer.keys is not None and layer.values is not None
        assert layer.keys.shape == (3, 1, 5, 16)
        for row, (start, n) in enumerate(zip(starts, lengths, strict=True)):
            assert not layer.keys[row, :, : 5 - n].any()
            assert torch.equal(layer.keys[row, :, 5 - n :], packed_k[0, :, start : start + n])
            assert torch.equal(layer.values[row, :, 5 - n :], packed_v[0, :, start : start + n])
        buffer = layer.keys.untyped_storage().data_ptr()
        for _ in range(8):
            k, v = torch.randn((2, 3, 1, 1, 16), generator=gen)
            got_k, _ = layer.update(k, v)
            assert torch.equal(got_k[:, :, -1:], k)
        assert layer.keys.untyped_storage().data_ptr() == buffer


def test_leaving_rows_moves_only_the_last_rows_into_the_gaps_and_trims_padding():
    from bastion_worker.engine.batching import keep_rows

    gen = torch.Generator().manual_seed(2)
    cache = DynamicCache()
    cache.layers = [BufferedLayer(), BufferedLayer()]
    states = [_states(5, 6, gen) for _ in cache.layers]
    for layer, (k, v) in zip(cache.layers, states, strict=True):
        layer.update(k, v)
    mask = torch.ones((5, 6), dtype=torch.long)
    mask[1:4, :2] = 0  # rows 1-3 are two positions shorter; rows 0 and 4 leave
    order, kept_mask = keep_rows(cache, mask, [1, 2, 3])
    assert order == [3, 1, 2]  # row 3 fills row 0's place; rows 1 and 2 stay put
    assert torch.equal(kept_mask, torch.ones((3, 4), dtype=torch.long))
    order, _ = keep_rows(cache, kept_mask, [0, 1])  # the last row leaves: nothing moves
    assert order == [0, 1]
    for layer, (k, v) in zip(cache.layers, states, strict=True):
        assert layer.keys is not None and layer.values is not None
        assert torch.equal(layer.keys, k[[3, 1], :, 2:])
        assert torch.equal(layer.values, v[[3, 1], :, 2:])


def test_several_leaving_rows_each_take_one_of_the_last_rows():
    from bastion_worker.engine.batching import keep_rows

    gen = torch.Generator().manual_seed(4)
    cache = DynamicCache()
    cache.layers = [BufferedLayer()]
    k, v = _states(6, 5, gen)
    cache.layers[0].update(k, v)
    mask = torch.ones((6, 5), dtype=torch.long)
    order, _ = keep_rows(cache, mask, [1, 3, 4, 5])  # rows 0 and 2 leave
    assert order == [4, 1, 5, 3]
    layer = cache.layers[0]
    assert layer.keys is not None and layer.values is not None
    assert torch.equal(layer.keys, k[order])
    assert torch.equal(layer.values, v[order])


def test_joining_writes_new_rows_in_place_and_pads_both_sides():
    """A join equals left-padding both caches to one width and stacking them;
    while the buffer has spare rows it is not reallocated, so nothing already
    cached is copied."""
    from bastion_worker.engine.batching import merge_caches

    gen = torch.Generator().manual_seed(3)

    def cache_of(rows: int, n: int) -> tuple[DynamicCache, tuple[torch.Tensor, torch.Tensor]]:
        cache = DynamicCache()
        cache.layers = [BufferedLayer()]
        states = _states(rows, n, gen)
        cache.layers[0].update(*states)
        return cache, states

    def padded(t: torch.Tensor, width: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))

    running, (k0, v0) = cache_of(4, 6)
    layer = running.layers[0]
    new, (k1, v1) = cache_of(1, 3)  # shorter: padded on the left
    merge_caches(running, new, 6)
    want_k, want_v = torch.cat([k0, padded(k1, 6)]), torch.cat([v0, padded(v1, 6)])
    assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)

    longer, (k2, v2) = cache_of(2, 9)  # longer: the running rows gain padding on the left
    merge_caches(running, longer, 9)
    want_k, want_v = torch.cat([padded(want_k, 9), k2]), torch.cat([padded(want_v, 9), v2])
    assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)

    step_k, step_v = _states(7, 1, gen)  # a decode step after the joins writes in place
    got_k, got_v = layer.update(step_k, step_v)
    assert torch.equal(got_k, torch.cat([want_k, step_k], dim=-2))
    assert torch.equal(got_v, torch.cat([want_v, step_v], dim=-2))

    short, (k3, v3) = cache_of(1, 2)
    before = layer.keys.untyped_storage().data_ptr()
    merge_caches(running, short, 10)
    assert layer.keys.untyped_storage().data_ptr() == before  # spare rows: no reallocation
    assert torch.equal(layer.keys[:7], padded(got_k, 10))
    assert torch.equal(layer.keys[7:], padded(k3, 10))
    assert torch.equal(layer.values[7:], padded(v3, 10))
