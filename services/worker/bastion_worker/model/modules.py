"""Swapping a loaded model's submodules for faster equivalents, in place."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace (in place) each submodule for which ``make`` returns a module;
    the count replaced."""
    targets = [
        (parent, name, new)
        for parent in model.modules()
        for name, child in parent.named_children()
        if (new := make(child)) is not None
    ]
    for parent, name, new in targets:
        setattr(parent, name, new)
    return len(targets)
