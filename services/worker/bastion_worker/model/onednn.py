"""Linear layers on the CPU through oneDNN with weights packed once at load.

``torch.nn.Linear`` on the CPU re-blocks the weight on every call; at decode
shapes (a few rows against a large weight) that is about half the time.
oneDNN can reorder the weight once into its blocked layout and reuse it, as
torch.compile's "freezing" and Intel's extension do; neither fits (freezing
wants static shapes, the extension is discontinued). So each ``nn.Linear`` is
swapped for a small module calling the two oneDNN operators Inductor uses
(``mkldnn._reorder_linear_weight``, ``mkldnn._linear_pointwise``), which ship
in every x86 CPU build of torch. Under ``torch.compile`` each packed layer is
one opaque operator (:mod:`bastion_worker.model.compiled`).

The packed call has a fixed cost, so only fp32 weights of at least
``MIN_PACKED`` elements are packed; bf16 weights are all packed where the CPU
has native bf16, since torch's dense bf16 product is never faster. Results
match ``nn.Linear`` to float rounding. A tied output head gets its own packed
copy; the input embedding keeps the original. Gated MLPs and attention
projections can also run merged or fused (below); each form was chosen by
measurement (bench/history.md).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers.activations import GELUTanh, SiLUActivation

from bastion_worker.model import compiled, modules

MIN_PACKED = 1 << 19  # fp32 weight elements; every bf16 weight is packed


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build and CPU can run packed layers in ``dtype``
    (float32 anywhere oneDNN is built in; bfloat16 where oneDNN says the CPU
    does it natively)."""
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(compiled.Opaque):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = self.width = linear.out_features
        weight = linear.weight.detach()
        # Plain attributes, not buffers: a packed tensor has no strides to save or move.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, "none", [], ""
        )
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


def pack_linears(model: nn.Module, min_elements: int = MIN_PACKED) -> int:
    """Replace (in place) each ``nn.Linear`` in ``model`` with bf16 weights or
    with at least ``min_elements`` weights; the count replaced."""

    def make(child: nn.Module) -> nn.Module | None:
        if type(child) is not nn.Linear:
            return None
        wanted = child.weight.dtype == torch.bfloat16 or child.weight.numel() >= min_elements
        return PackedLinear(child) if wanted else None

    return modules.replace(model, make)


# The gated MLPs' activations that oneDNN applies as a post-op of the gate's
# product: (attr, algorithm) as inductor's CPU fusion names them.
POST_OPS: dict[type, tuple[str, str]] = {GELUTanh: ("gelu", "tanh"), SiLUActivation: ("swish", "")}


class FusedMLP(compiled.Opaque):
    """A gated MLP, ``down(act(gate(x)) * up(x))``, in three oneDNN calls instead
    of five operations: the activation is applied to the gate's product as it is
    written out, and the up projection's product is multiplied by that as it is
    written out (oneDNN's unary and binary post-ops, as inductor fuses them).

    The activation now sees the gate's product at float32 accumulator precision
    instead of rounded to the model's dtype, so in bfloat16 the output moves by
    rounding (closer to a float32 reference; tested). Faster in bf16 at every
    row count measured.
    """

    gate: PackedLinear  # the model's projections, packed by pack_linears first
    up: PackedLinear
    down: PackedLinear

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down = (
            cast(PackedLinear, layer) for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        )
        self.attr, self.algorithm = POST_OPS[type(mlp.act_fn)]
        self.width = self.down.out_features

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        gated = torch.ops.mkldnn._linear_pointwise(
            x, self.gate.packed, self.gate.bias, self.attr, [], self.algorithm
        )
        both = torch.ops.mkldnn._linear_pointwise.binary(
            x, gated, self.up.packed, self.up.bias, "mul"
        )
        return self.down(both)  # type: ignore[no-any-return]


def _mergeable(layers: list[nn.Linear], min_elements: int, bf16: bool = False) -> bool:
    """Whether ``layers`` can be packed side by side (one input width, all with
    biases or none): float32 ones into at least ``min_elements`` weights, or,
    with ``bf16``, bfloat16 ones of any size (every bf16 weight is packed)."""
    if len({layer.in_features for layer in layers}) != 1:
        return False
    if len({layer.bias is None for layer in layers}) != 1:
        return False
    dtypes = {layer.weight.dtype for layer in layers}
    if bf16 and dtypes == {torch.bfloat16}:
        return True
    size = sum(layer.weight.numel() for layer in layers)
    return dtypes == {torch.float32} and size >= min_elements


def packed_side_by_side(layers: list[nn.Linear]) -> PackedLinear:
    """One packed layer whose output is ``layers``' outputs side by side (all
    of one input width, with biases or all without)."""
    both = nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers),
                     bias=layers[0].bias is not None, dtype=layers[0].weight.dtype)  # fmt: skip
    with torch.no_grad():
        both.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if both.bias is not None:
            both.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return PackedLinear(both)


class MergedMLP(nn.Module):
    """A float32 gated MLP, ``down(act(gate(x)) * up(x))``, with the gate and up
    projections as one packed product twice as wide, split, then the model's
    own activation and multiply; ``down`` is packed by :func:`pack_linears`.

    In float32 this beats :class:`FusedMLP`: one product reads its input once
    and blocks better than two half as wide, and oneDNN's tanh-GELU post-op
    costs more than torch's own GELU. The arithmetic is the model's, in its
    order (the products' rounding aside: about 1e-6).
    """

    down: nn.Module
    act_fn: nn.Module

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        gate, up = cast(nn.Linear, mlp.gate_proj), cast(nn.Linear, mlp.up_proj)
        self.gate_up = packed_side_by_side([gate, up])
        self.width = gate.out_features
        self.down, self.act_fn = cast(nn.Module, mlp.down_proj), cast(nn.Module, mlp.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.width, dim=-1)
        return self.down(self.act_fn(gate).mul_(up))  # type: ignore[no-any-return]


def merge_mlps(model: nn.Module, min_elements: int = MIN_PACKED) -> int:
    """Replace (in place) each float32 gated MLP whose gate and up projections
    are dense, with a known activation (:data:`POST_OPS`) and, merged, at
    least ``min_elements`` weights, with a :class:`MergedMLP`; the count
    replaced. Run before :func:`pack_linears`, which then packs ``down``."""

    def make(child: nn.Module) -> nn.Module | None:
        parts: list[Any] = [getattr(child, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(p) is nn.Linear for p in parts):
            return None
        wanted = type(getattr(child, "act_fn", None)) in POST_OPS and _mergeable(
            parts[:2], min_elements
        )
        return MergedMLP(child) if wanted else None

    return modules.replace(model, make)


def fuse_mlps(model: nn.Module) -> int:
    """Replace (in place) each gated MLP whose three layers are packed and whose
    activation oneDNN applies (:data:`POST_OPS`); the count replaced. Run after
    :func:`pack_linears`."""

    def make(child: nn.Module) -> nn.Module | None:
        parts: list[Any] = [getattr(child, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        fusable = all(isinstance(p, PackedLinear) for p in parts) and (
            type(getattr(child, "act_fn", None)) in POST_OPS
        )
        return FusedMLP(child) if fusable else None

    return modules.replace(model, make)


PROJECTIONS = ("q_proj", "k_proj", "v_proj")


class MergedProjections(nn.Module):
    """An attention layer's query, key and value projections (all of one input)
    as one packed product: ``forward(x)`` returns the three outputs, views of
    one tensor, side by side in that order. The layer's ``q_proj``, ``k_proj``
    and ``v_proj`` become :class:`ProjectionPart`s of it, for transformers'
    forward; :mod:`bastion_worker.model.decode` calls it directly.

    One product of three times the width beats three products (the key's and
    value's alone too small to pack in float32), in float32 and bfloat16,
    with the same greedy tokens.
    """

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.sizes = [layer.out_features for layer in layers]
        self.product = packed_side_by_side(layers)
        # The last input's outputs, until each part has taken its own.
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._untaken: set[int] = set()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.product(x).split(self.sizes, dim=-1)  # type: ignore[no-any-return]

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Output ``index`` for ``x``: the first part asked computes all three,
        the others take theirs (the same tensor object only, so never stale)."""
        if x is not self._input or index not in self._untaken:
            self._input, self._outputs = x, self(x)
            self._untaken = set(range(len(self.sizes)))
        self._untaken.discard(index)
        out = self._outputs[index]
        if not self._untaken:  # all taken: hold nothing between calls
            self._input, self._outputs = None, ()
        return out


class ProjectionPart(nn.Module):
    """One of a :class:`MergedProjections`' outputs, where an ``nn.Linear`` was."""

    def __init__(self, merged: MergedProjections, index: int) -> None:
        super().__init__()
        self.index = index
        self.out_features = merged.sizes[index]
        self.__dict__["merged"] = merged  # not a submodule: the attention layer holds it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged: MergedProjections = self.__dict__["merged"]
        return merged.part(self.index, x)


def merge_projections(model: nn.Module, min_elements: int = MIN_PACKED) -> int:
    """Give each attention layer whose query, key and value projections are
    dense, of one input width and bias alike, and either bfloat16 or float32
    of at least ``min_elements`` weights together, a :class:`MergedProjections`
    as ``qkv_proj`` (its three projections become its parts); the count
    merged. Run before :func:`pack_linears`."""
    count = 0
    for module in list(model.modules()):  # listed first: this adds submodules
        layers: list[Any] = [getattr(module, n, None) for n in PROJECTIONS]
        if not all(type(layer) is nn.Linear for layer in layers):
            continue
        if not _mergeable(layers, min_elements, bf16=True):
            continue
        merged = MergedProjections(layers)
        module.qkv_proj = merged
        for index, name in enumerate(PROJECTIONS):
            setattr(module, name, ProjectionPart(merged, index))
        count += 1
    return count
