"""`<role>.compile`: torch.compile each decoder layer of a role's model, one static graph per batch shape.

Why layers and not the whole model: identical layers share one compiled graph (torch compiles a
layer's code once, with the parameters as inputs), the compile time does not grow with depth, and
hooks that the loop puts on the decoder around a call (`RoleModel.last_hidden`) do not invalidate
anything compiled. What it buys: fewer, fused kernels in each layer, which is what a small model's
step is short of when its GPU waits on kernel launches (docs/performance.md).

Why static graphs: left to itself, torch recompiles a layer for symbolic sizes at the second batch
shape it sees, and that dynamic graph is markedly slower than static ones (docs/performance.md). So each
shape gets its own graph,
and the data keeps the shapes few: when a role compiles, the collators pad every batch to one of
`WIDTHS` lengths up to `data.max_length` (`distill.data.loading.collator_padding`), not to the next multiple of 8.
Generation does not use these graphs (each decoding step would have another cache length, so another static
graph): distill.generation.decode compiles its own decode step, with the batch and cache dimensions dynamic. And when the
frozen role's forward runs beside the trainable one's, a call that needs
a graph not compiled yet stops and runs again alone (distill/runtime/overlap.py): torch refuses a compiled call from
one thread while another traces.
"""
from __future__ import annotations

import torch

from distill.models.build import leaf_module_classes

SHAPES = 32
"""Static graphs kept per layer (torch's own limit is 8): the widths times the batch sizes a run sees
(training, the last eval batch, DPO's chosen-and-rejected rows). A shape past it runs uncompiled, and
torch warns once."""


def compile_layers(model: torch.nn.Module, *, backend: str = "inductor") -> int:
    """Compile, in place, every module whose class is one of the model's `_no_split_modules` (its
    decoder layers), static shapes; returns how many. Raises when the model names no such class."""
    names = set(leaf_module_classes(model))
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class (`_no_split_modules`) to compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, SHAPES)
    for layer in layers:
        layer.compile(backend=backend, dynamic=False)
    return len(layers)
