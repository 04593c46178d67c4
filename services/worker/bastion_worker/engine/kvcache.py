"""The worker's KV cache: per-layer buffers with room to grow, written in place.

transformers' DynamicCache concatenates every new position onto the whole
cache, so each decode step copies every layer's keys and values, a cost that
grows with the context. Here a layer keeps a buffer wider than what it holds;
a step writes one column into it and the model attends to a view of the
filled part. A buffer is reallocated (one copy) only when full, with headroom
of a quarter of its length, so the copying per step stays constant.

Rows work the same way: when sequences leave, the rows after the last one kept
move into the gaps (only those are copied), and joining
(:mod:`bastion_worker.engine.batching`) writes new rows into spare ones; the
buffer grows only when it has none left or a longer prompt needs columns on
the left. A packed prefill's buffers get the same headroom, so the first step
after it writes in place. Code that assigns whole tensors to ``layer.keys`` /
``layer.values`` still works: the layer adopts them as its buffer.

Not transformers' StaticCache: that is sized once for a fixed batch, while
continuous batching changes the rows between steps.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from bastion_worker.model.attention import Decoding

MIN_HEADROOM = 64  # columns
MIN_ROW_HEADROOM = 8


def _headroom(needed: int, least: int = MIN_HEADROOM) -> int:
    return max(least, needed // 4)


class _Columns:
    """One layer's keys or values: a [capacity rows, heads, capacity, head_dim]
    buffer whose first ``rows`` rows hold positions [start, end)."""

    def __init__(self, data: torch.Tensor, end: int | None = None) -> None:
        self.data = data
        self.rows = data.shape[0]
        self.start, self.end = 0, data.shape[-2] if end is None else end

    def view(self, start: int | None = None) -> torch.Tensor:
        return self.data[: self.rows, :, self.start if start is None else start : self.end]

    def _move(self, rows: int, width: int, offset: int) -> None:
        """Into a new buffer of ``rows`` x ``width``, the filled part from column ``offset``."""
        held = self.end - self.start
        old = self.data
        self.data = old.new_empty((rows, old.shape[1], width, old.shape[-1]))
        self.data[: self.rows, :, offset : offset + held] = old[
            : self.rows, :, self.start : self.end
        ]
        self.start, self.end = offset, offset + held

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more positions, keeping the filled ones."""
        if self.end + n <= self.data.shape[-2]:
            return
        held = self.end - self.start
        self._move(self.data.shape[0], held + n + _headroom(held + n), 0)

    def join(self, new: torch.Tensor, width: int) -> None:
        """Append ``new``'s rows ([rows, heads, positions, head_dim], right-aligned
        with these), both sides left-padded with zeros to ``width`` positions.
        Only the new rows are copied, unless the buffer must grow (then
        everything, once)."""
        added, held = new.shape[0], self.end - self.start
        rows, wider = self.rows + added, width - held  # columns to open on the left
        assert wider >= 0 and new.shape[-2] <= width
        if rows > self.data.shape[0] or wider > self.start:
            capacity = self.data.shape[0]
            if rows > capacity:
                capacity = rows + _headroom(rows, MIN_ROW_HEADROOM)
            self._move(capacity, held + wider + _headroom(held + wider), wider)
        if wider:
            self.start -= wider
            self.data[: self.rows, :, self.start : self.start + wider] = 0
        split = self.end - new.shape[-2]
        self.data[self.rows : rows, :, self.start : split] = 0
        self.data[self.rows : rows, :, split : self.end] = new
        self.rows = rows

    def keep_rows(self, holes: list[int], movers: list[int], rows: int, trim: int) -> None:
        """Fill the rows at ``holes`` with those at ``movers`` (only these are
        copied), keep the first ``rows`` and drop ``trim`` leading positions."""
        # One slice copy per moved row: usually one or two rows leave a step,
        # and indexing with the lists (a gather and a scatter) cost several
        # times as much, a pause between two steps.
        span = slice(self.start, self.end)
        for hole, mover in zip(holes, movers, strict=True):
            self.data[hole, :, span] = self.data[mover, :, span]
        self.rows = rows  # the buffer keeps its rows for later joins
        self.start += trim

    def write(self, states: torch.Tensor) -> None:
        n = states.shape[-2]
        self.reserve(n)
        self.data[: self.rows, :, self.end : self.end + n] = states
        self.end += n


def _adopt(t: torch.Tensor | None) -> _Columns | None:
    # None, or the empty placeholder transformers' lazy init assigns
    return None if t is None or t.dim() != 4 else _Columns(t)


class BufferedLayer(DynamicLayer):
    """A full-attention layer: holds every position."""

    _k: _Columns | None
    _v: _Columns | None

    # ``keys`` and ``values`` stay attributes to transformers and to batching.py:
    # reading gives the filled view, assigning adopts the tensor as the buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k.view()

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k = _adopt(t)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v.view()

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v = _adopt(t)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        """Take ``keys`` and ``values`` as the buffers, their first ``filled``
        positions held (the rest is room to grow)."""
        self._k, self._v = _Columns(keys, filled), _Columns(values, filled)

    def keep_rows(self, holes: list[int], movers: list[int], rows: int, trim: int) -> None:
        """See :func:`bastion_worker.engine.batching.keep_rows`."""
        for columns in (self._k, self._v):
            if columns is not None:
                columns.keep_rows(holes, movers, rows, trim)

    def join(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Append rows (another cache's keys and values) in place, both sides
        left-padded to ``width``; see :func:`bastion_worker.engine.batching.merge_caches`."""
        assert self._k is not None and self._v is not None
        self._k.join(keys, width)
        self._v.join(values, width)

    def _columns(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[_Columns, _Columns]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None or self._v is None:
            self._k = _Columns(key_states[:, :, :0])
            self._v = _Columns(value_states[:, :, :0])
        return self._k, self._v

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._columns(key_states, value_states)
        k.write(key_states)
        v.write(value_states)
        return k.view(), v.view()


class BufferedSlidingWindowLayer(BufferedLayer, DynamicSlidingWindowLayer):
    """A sliding-window layer: attends to the new positions and the
    ``sliding_window - 1`` before them, and keeps only those."""

    def __init__(self, sliding_window: int, **kwargs: object) -> None:
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window, **kwargs)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        BufferedLayer.lazy_initialization(self, key_states, value_states)
        self._sliding_window_tensor = self._sliding_window_tensor.to(self.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record_past:
            raise NotImplementedError("the worker's cache does not record past states")
        n = key_states.shape[-2]
        self.cumulative_length += n
        full = []
        kv = self._columns(key_states, value_states)
        for columns, states in zip(kv, (key_states, value_states), strict=True):
            columns.reserve(n)  # may move what is kept to the front
            first = columns.start
            columns.write(states)
            full.append(columns.view(first))
            columns.start = max(first, columns.end - (self.sliding_window - 1))
        return full[0], full[1]


class PackedWriter:
    """Stands in for the cache during a packed pass
    (:mod:`bastion_worker.model.attention`): each layer's new keys and values, every
    prompt's positions back to back in one row, are scattered into a fresh
    left-padded ``[prompts, kv_heads, width, head_dim]`` cache for the decode
    steps, and handed back as they are for the packed attention.

    With ``decoding``, the pass starts with one token for each row of the
    ``running`` cache: those are written into it (one column per row), and
    the rows' whole cached keys and values go to ``decoding`` for their attention.
    """

    def __init__(
        self, config: object, lengths: list[int], device: torch.device,
        running: DynamicCache | None = None, decoding: Decoding | None = None,
    ) -> None:  # fmt: skip
        self.cache = new_cache(config)
        self.rows, self.width = len(lengths), max(lengths)
        self.running, self.decoding = running, decoding
        self.skip = 0 if decoding is None else decoding.rows  # packed positions before the prompts
        # Where each packed position goes: its prompt's row, right-aligned columns.
        row = torch.repeat_interleave(torch.arange(self.rows), torch.tensor(lengths))  # [T]
        col = torch.cat([torch.arange(self.width - n, self.width) for n in lengths])  # [T]
        self._row, self._col = row.to(device), col.to(device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if self.decoding is not None and self.running is not None:
            # [rows, kv_heads, 1, head_dim]: each running row's one new position
            k, v = (
                s[0, :, : self.skip].transpose(0, 1)[:, :, None] for s in (key_states, value_states)
            )
            self.decoding.cached[layer_idx] = kv_layers(self.running)[layer_idx].update(k, v)
        layer = self.cache.layers[layer_idx]
        assert isinstance(layer, BufferedLayer)
        layer.lazy_initialization(key_states, value_states)
        keys, values = (self._scatter(s[:, :, self.skip :]) for s in (key_states, value_states))
        layer.adopt(keys, values, self.width)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = self.width  # the engine packs only within the window
        return key_states, value_states

    def _scatter(self, states: torch.Tensor) -> torch.Tensor:  # [1, kv_heads, T, head_dim]
        """A buffer with the prompts in its first ``width`` columns, left-padded
        with zeros, and room after them for the decode steps' positions."""
        heads, dim = states.shape[1], states.shape[-1]
        padded = states.new_empty((self.rows, heads, self.width + _headroom(self.width), dim))
        padded[:, :, : self.width].zero_()
        padded[self._row, :, self._col] = states[0].transpose(0, 1)  # [T, kv_heads, head_dim]
        return padded


def kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """``cache``'s layers, typed as what the worker builds them from: key and value
    tensors per layer (transformers types them as any kind of cache layer)."""
    return cast(list[DynamicLayer], cache.layers)


def new_cache(config: object) -> DynamicCache:
    """A cache for ``config``'s layer types with buffered layers in place of
    transformers' dynamic ones (other layer types are kept as they are)."""
    cache = DynamicCache(config=config)  # type: ignore[arg-type]
    layers: list[object] = []
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            layers.append(BufferedSlidingWindowLayer(sliding_window=layer.sliding_window))
        elif type(layer) is DynamicLayer:
            layers.append(BufferedLayer())  # type: ignore[no-untyped-call]  # transformers' __init__ is untyped
        else:
            layers.append(layer)
    cache.layers = layers  # type: ignore[assignment]
    return cache
