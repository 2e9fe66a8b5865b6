"""Where a frozen role's weights live: replicated on every GPU, sharded by ZeRO-3, or offloaded to CPU.

A frozen role (teacher, reference) has no gradients and no optimizer, so its only cost is its weights
and the forward. Replicated ("gather once and keep") is the fastest forward; ZeRO-3 saves memory but
gathers every layer on every forward; parameter offload saves GPU memory at the price of PCIe copies.
`choose_placement` picks the fastest one that fits; the recipe's `<role>.placement` overrides it.

A sharded forward gathers every layer on every call: with DeepSpeed's defaults (each Linear gathered
on its own) that is several times the replicated forward; gathering whole decoder layers as one unit
(leaf modules) with prefetch and live-parameter limits scaled to a layer brings it close
(docs/performance.md has the figures).
"""
from __future__ import annotations

import os
from typing import Any

import torch

GIB = 2**30
USABLE_FRACTION = 0.9
"""Share of a GPU's memory the planner counts on: the CUDA context, NCCL buffers and allocator
fragmentation take the rest."""
REPLICATE_FRACTION = 0.5
"""A frozen role is replicated when its full weights take at most this share of the memory left
after every other need, so replication never takes the room the student's batches grow into."""


def choose_placement(*, weights_bytes: float, other_bytes: float, device_bytes: float | None,
                     world_size: int) -> tuple[str, str]:
    """(placement, why) for one frozen role. Pure: every input is a number.

    weights_bytes: the role's full weights (params x dtype bytes);
    other_bytes: what the GPU must hold besides those weights (the other roles' estimates, and this
    role's activations and logits);
    device_bytes: memory of one GPU, None without a GPU (then `sharded`: nothing to size it against,
    and it is what a CPU run of the tests checks).
    """
    if device_bytes is None:
        return "sharded", "no GPU to size it against"
    left = USABLE_FRACTION * device_bytes - other_bytes
    w, l = weights_bytes / GIB, left / GIB
    if weights_bytes <= REPLICATE_FRACTION * left:
        return "replicated", f"{w:.1f} GiB of weights fit in half of the {l:.1f} GiB left per GPU"
    if world_size > 1 and weights_bytes / world_size <= left:
        return "sharded", f"{w:.1f} GiB of weights take more than half of the {l:.1f} GiB left; a 1/{world_size} shard fits"
    return "offload", f"{w:.1f} GiB of weights{f' (1/{world_size}: {w / world_size:.1f})' if world_size > 1 else ''} do not fit in the {l:.1f} GiB left per GPU"


def device_memory() -> int | None:
    """Bytes of memory of this rank's GPU, or None without one.

    The total, not the free memory: every rank must choose the same placement (a teacher sharded on
    one rank and replicated on another deadlocks the first gather), and free memory differs between
    ranks by what else runs there. `DISTILL_GPU_MEMORY_GB` overrides it (a smaller budget, or a plan
    made on a machine without the run's GPUs).
    """
    if os.environ.get("DISTILL_GPU_MEMORY_GB"):
        return int(float(os.environ["DISTILL_GPU_MEMORY_GB"]) * GIB)
    if not torch.cuda.is_available():
        return None
    # Device properties create no CUDA context, so no rank leaves one on another rank's GPU.
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()).total_memory


def layer_params(model_config, num_params: int) -> int:
    """Parameters of one decoder layer: all but the embedding and an untied head, over the layers."""
    hidden, layers = getattr(model_config, "hidden_size", 0), getattr(model_config, "num_hidden_layers", 0)
    vocab = getattr(model_config, "vocab_size", 0)
    embeds = vocab * hidden * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    return max(1, (num_params - embeds) // max(1, layers))


def frozen_zero3_settings(model_config, num_params: int) -> dict[str, Any]:
    """ZeRO-3 settings for a frozen role, scaled to one decoder layer (whole layers are gathered at
    once: see `distill.runtime.roles.leaf_module_classes`).

    prefetch: the next two layers are fetched while one computes (large buckets, few collectives);
    live parameters and reuse distance: four layers, so released layers do not pile up;
    persistence: parameters of up to 10 x hidden elements (norms, biases) stay gathered for good.
    """
    per_layer = layer_params(model_config, num_params)
    hidden = getattr(model_config, "hidden_size", 1)
    return {"stage3_prefetch_bucket_size": 2 * per_layer,
            "stage3_max_live_parameters": 4 * per_layer,
            "stage3_max_reuse_distance": 4 * per_layer,
            "stage3_param_persistence_threshold": 10 * hidden}
