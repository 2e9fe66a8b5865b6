"""The DeepSpeed config of one role, from its recipe block: presets resolved, every `auto` made concrete.

Pure functions of the recipe values, so a recipe is checked against them before anything loads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distill.config.errors import RecipeError
from distill.config.presets import resolve_deepspeed

if TYPE_CHECKING:
    from distill.config.schema import Role

ZERO2_REDUCE_BUCKET = 50_000_000
"""Elements per gradient-reduction bucket at ZeRO-1/2 when the config says `auto`: as fast as DeepSpeed's default
(5e8) with a tenth of its bucket memory; HF's hidden x hidden splits a small model's reduction into hundreds of
collectives (measured by benchmarks/distill_throughput.py; docs/performance.md)."""


def requested_placement(spec: Role) -> str | None:
    """A frozen role's placement as the recipe fixes it, or None when the planner chooses (`auto` at ZeRO-3)."""
    if spec.trainable:
        return None
    if spec.placement != "auto":
        return spec.placement
    zero = resolve_deepspeed(spec.deepspeed)["zero_optimization"]
    if spec.offload == "cpu" or zero.get("offload_param", {}).get("device", "none") not in ("none", None):
        return "offload"
    return None if zero["stage"] == 3 else "replicated"


def role_ds_config(name: str, spec: Role, *, micro_batch_size: int, grad_accum: int, world_size: int,
                   grad_clip: float | None, hidden_size: int | None, placement: str | None = None,
                   frozen_zero3: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config one role runs with: every `auto` replaced by a concrete value.

    placement (frozen roles): replicated -> ZeRO-0, sharded -> ZeRO-3, offload -> ZeRO-3 with
    parameters on CPU; None keeps the stage of `deepspeed`. frozen_zero3: the ZeRO-3 settings a
    frozen role gets where its config leaves them unset or `auto` (`frozen_zero3_settings`)."""
    try:
        cfg = resolve_deepspeed(spec.deepspeed)
    except RecipeError as e:
        raise RecipeError(f"`{name}.deepspeed`: {e}") from None
    zero = cfg["zero_optimization"]
    if not spec.trainable and placement is not None:
        zero["stage"] = 0 if placement == "replicated" else 3
        if placement == "offload":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        else:
            zero.pop("offload_param", None)
    stage = zero["stage"]
    if spec.trainable and stage == 0:
        # Only DeepSpeed's ZeRO optimizers refuse a step whose gradient norm is NaN/Inf.
        raise RecipeError(f"`{name}` is trainable at ZeRO-0; use `{name}.deepspeed: zero2` (or 1): on one process it "
                          "costs the same memory, and it lets a NaN/Inf step be skipped instead of applied")
    if spec.compile and stage == 3 and (spec.trainable or placement is not None):  # a frozen role's is known at plan time
        how = f"`{name}.placement: replicated`" if not spec.trainable else f"`{name}.deepspeed: zero2`"
        raise RecipeError(f"`{name}.compile` cannot run under ZeRO-3 (its hooks gather weights inside each layer): "
                          f"use {how}, or remove `{name}.compile`")
    if not spec.trainable and stage in (1, 2):
        # ZeRO-1/2 partition optimizer state and gradients; a frozen role has neither, so it is replicated.
        zero["stage"] = stage = 0
    if not spec.trainable:
        zero.pop("offload_optimizer", None)
    for key in ("bf16", "fp16"):
        enabled = str(cfg.get(key, {}).get("enabled", False)).lower() == "true"
        if enabled and spec.precision != key:
            raise RecipeError(f"`{name}.deepspeed` enables {key} but `{name}.precision` is {spec.precision}: set `{name}.precision: {key}` or remove {key} from the DeepSpeed config")
        cfg[key] = {**cfg.get(key, {}), "enabled": spec.precision == key}
    if spec.offload == "cpu" and placement != "replicated":
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        elif not spec.trainable:
            raise RecipeError(f"`{name}.offload: cpu` offloads a frozen role's parameters, which needs ZeRO-3: set `{name}.deepspeed: zero3`")
        if spec.trainable:  # ZeRO-1 or above, checked above
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.get("offload_param", {}).get("device", "none") not in ("none", None) and stage != 3:
        raise RecipeError(f"`{name}.deepspeed` offloads parameters at ZeRO-{stage}; parameter offload needs ZeRO-3")
    ga = grad_accum if spec.trainable else 1
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = ga
    cfg["train_batch_size"] = micro_batch_size * ga * world_size
    if spec.trainable:
        # DeepSpeed clips at 1.0 when the key is absent; 0.0 is its "off" (`train.grad_clip: null`).
        cfg["gradient_clipping"] = float(grad_clip or 0.0)
    else:
        cfg.pop("gradient_clipping", None)
    cfg["steps_per_print"] = 10**12
    cfg.setdefault("wall_clock_breakdown", False)
    # A sharded frozen role gets settings scaled to its layers; other roles keep DeepSpeed's defaults
    # for what the shipped configs leave `auto`.
    tuned = {"stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 10**9}
    if stage == 3 and not spec.trainable and frozen_zero3:
        tuned = {**tuned, **frozen_zero3}
    for key, value in tuned.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    if stage in (1, 2) and zero.get("reduce_bucket_size") == "auto":
        # DeepSpeed's own default. HF's hidden x hidden is sized for ZeRO-3; at ZeRO-2 it split a 0.3B
        # student's gradient reduction into ~300 collectives (docs/performance.md).
        zero["reduce_bucket_size"] = ZERO2_REDUCE_BUCKET
    if hidden_size:
        # The sizes HF Trainer derives from the hidden size, for configs that leave them `auto`.
        derived = {"reduce_bucket_size": hidden_size * hidden_size,
                   "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                   "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in derived.items():
            if zero.get(key) == "auto":
                zero[key] = value
    left = [k for k, v in _walk(cfg) if v == "auto"]
    if left:
        raise RecipeError(f"`{name}.deepspeed` leaves {left} as `auto`, which distill cannot derive: give numbers")
    return cfg


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


