"""`<role>.compile`: torch.compile each decoder layer of a role's model.

Why layers and not the whole model: identical layers share one compiled graph (torch compiles a
layer's code once, with the parameters as inputs), the compile time does not grow with depth, and
hooks that the loop puts on the decoder around a call (`RoleModel.last_hidden`) do not invalidate
anything compiled. What it buys: fewer, fused kernels in each layer, which is what a small model's
step is short of when its GPU waits on kernel launches (docs/performance.md).
"""
from __future__ import annotations

import torch


def compile_layers(model: torch.nn.Module, *, backend: str = "inductor") -> int:
    """Compile, in place, every module whose class is one of the model's `_no_split_modules` (its
    decoder layers); returns how many. Raises when the model names no such class."""
    from distill.roles import leaf_module_classes  # the same layer classes ZeRO-3 gathers as one unit

    names = set(leaf_module_classes(model))
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class (`_no_split_modules`) to compile")
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)
