"""``torch.compile`` for the written-out forward (:mod:`bastion_worker.model.decode`).

Inductor cannot trace oneDNN's packed weights (a layout fake tensors do not
model) or the KV cache's bookkeeping (Python objects written in place), and
with torch 2.13 it fails to lower SDPA at the worker's cache shapes. So both go
into the graph as opaque operators, as vLLM does with its own kernels: an
:class:`Opaque` layer (a packed product or a fused MLP) is one operator run
eagerly, and :func:`attend` runs a layer's attention, handed over with
:func:`attending`. Inductor fuses everything between them (norms, rotary,
residuals, casts) into a few C++ loops.

Only the rows vary between passes, so one graph with a symbolic length serves
decode steps and packed passes, plus one for a single row. It pays for bf16
models with packed layers and costs fp32 ones (docs/worker.md). In bfloat16
the fused work stays in float32 between operations, so greedy tokens can
differ from the eager path's; in float32 they match (tested).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_layers: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_keys = itertools.count()
_attend: list[Attend] = []  # the pass running now (one engine thread)


@torch.library.custom_op("bastion::product", mutates_args=())
def _product(x: torch.Tensor, key: int, width: int) -> torch.Tensor:
    return _layers[key].eager(x)  # type: ignore[no-any-return, operator]


@_product.register_fake
def _(x: torch.Tensor, key: int, width: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], width))


class Opaque(nn.Module):
    """A layer the compiler calls as one operator: ``eager(x)``, whose output
    is ``width`` wide, run as it is; outside compiling, called directly."""

    width: int

    def __init__(self) -> None:
        super().__init__()
        self.key = next(_keys)
        _layers[self.key] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.bastion.product(x, self.key, self.width)  # type: ignore[no-any-return]
        return self.eager(x)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@torch.library.custom_op("bastion::attend", mutates_args=())
def _attend_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return _attend[-1](layer, q, k, v)


@_attend_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(q)


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Layer ``layer``'s attention of the pass running now, opaque to the compiler."""
    return torch.ops.bastion.attend(q, k, v, layer)  # type: ignore[no-any-return]


@contextlib.contextmanager
def attending(fn: Attend) -> Iterator[None]:
    """Run :func:`attend` as ``fn`` inside the block."""
    _attend.append(fn)
    try:
        yield
    finally:
        _attend.pop()


def compile_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward(tokens, positions)`` compiled with the row count symbolic."""
    return torch.compile(forward, dynamic=True, fullgraph=True)
