"""From a validated recipe to what each role will be: its DeepSpeed config, model config and size.

Everything here runs before any weight is loaded, so an impossible setup fails in seconds with a
message naming the recipe key.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.data.text import looks_like_path
from distill.placement import choose_placement, device_memory, frozen_zero3_settings
from distill.recipe import DEEPSPEED_CONFIG_DIR, RecipeError, Role

_DTYPE_KEYS = {"bf16": "bf16", "fp16": "fp16"}
ZERO2_REDUCE_BUCKET = 50_000_000
"""Elements per gradient-reduction bucket at ZeRO-1/2 when the config says `auto`: as fast as 5e8 (DeepSpeed's
default) in benchmarks/distill_throughput.py, with a tenth of the bucket memory; H² (HF's auto) was 2-3x slower."""


def resolve_deepspeed(value: int | str | dict) -> dict[str, Any]:
    """A role's `deepspeed` value -> a DeepSpeed config dict (a fresh copy)."""
    if isinstance(value, bool):
        raise RecipeError(f"`deepspeed: {value}` is not a ZeRO stage; use 0, 1, 2 or 3, a config name or a path")
    if isinstance(value, int):
        if value not in (0, 1, 2, 3):
            raise RecipeError(f"ZeRO stage {value} does not exist; use 0, 1, 2 or 3")
        return {"zero_optimization": {"stage": value}}
    if isinstance(value, dict):
        cfg = copy.deepcopy(value)
    else:
        path = Path(value)
        if not path.suffix and (DEEPSPEED_CONFIG_DIR / f"{value}.json").is_file():
            path = DEEPSPEED_CONFIG_DIR / f"{value}.json"
        if not path.is_file():
            names = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
            raise RecipeError(f"DeepSpeed config `{value}` not found: use a stage (0-3), one of {names}, or a JSON file path")
        cfg = json.loads(path.read_text())
    stage = cfg.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RecipeError(f"ZeRO stage {stage} in `{value}` does not exist; use 0, 1, 2 or 3")
    return cfg


@dataclass
class RolePlan:
    """What one role will be, decided before loading it."""

    name: str
    spec: Role
    ds_config: dict[str, Any]
    model_config: Any  # transformers.PretrainedConfig
    num_params: int
    """All parameters the role holds (with LoRA: base + adapter)."""
    trainable_params: int | None = None
    """Parameters that train: None means all of a trainable role (none of a frozen one); with LoRA, the adapter's."""
    placement: str | None = None
    """Frozen roles: replicated, sharded or offload (see distill/placement.py)."""
    placement_reason: str = ""
    compile: bool = False
    """Whether its decoder layers are compiled: `compile` as set, or, when null, on GPUs with the weights whole."""

    @property
    def num_trainable(self) -> int:
        if self.trainable_params is not None:
            return self.trainable_params
        return self.num_params if self.spec.trainable else 0

    @property
    def zero_stage(self) -> int:
        return self.ds_config["zero_optimization"]["stage"]

    @property
    def offload(self) -> str:
        z = self.ds_config["zero_optimization"]
        return z.get("offload_param", {}).get("device", "none") if self.zero_stage == 3 else z.get("offload_optimizer", {}).get("device", "none")


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


def check_model_source(name: str, spec: Role) -> None:
    """A `from_pretrained` that names a local path must be a model directory."""
    if spec.from_pretrained is None:
        return
    src = Path(spec.from_pretrained).expanduser()
    if (looks_like_path(spec.from_pretrained) or src.exists()) and not (src / "config.json").is_file():
        raise RecipeError(f"`{name}.from_pretrained`: `{spec.from_pretrained}` is not a model directory (no config.json). "
                          f"Train the shipped teacher with `python -m distill.train recipes/teacher_pretrain.yaml`, or fix the path")


def load_model_config(name: str, spec: Role, vocab_size: int | None):
    """The transformers config of a role, read without loading weights."""
    from transformers import AutoConfig, CONFIG_MAPPING

    if spec.from_pretrained is not None:
        check_model_source(name, spec)
        try:
            return AutoConfig.from_pretrained(spec.from_pretrained, trust_remote_code=spec.trust_remote_code)
        except OSError as e:
            raise RecipeError(f"`{name}.from_pretrained`: cannot load `{spec.from_pretrained}` ({e.__class__.__name__}); give a local directory") from None
    cfg = dict(spec.config)
    model_type = cfg.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise RecipeError(f"`{name}.config.model_type` must name a transformers architecture (e.g. llama), got {model_type!r}")
    if "vocab_size" not in cfg and vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    try:
        return CONFIG_MAPPING[model_type](**cfg)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"`{name}.config`: {e}") from None


def count_params(model_config) -> int:
    """Parameters of a model built on the meta device: exact, instant, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def plan_roles(recipe, trainer_cls, *, world_size: int, vocab_size: int | None) -> dict[str, RolePlan]:
    """Every role the run builds (`trainer_cls.built_roles`), trainable roles first (the first one owns the
    primary Accelerator)."""
    plans: dict[str, RolePlan] = {}
    t = recipe.train
    mem = dict(world_size=world_size, micro_batch_size=t.micro_batch_size, seq_len=recipe.data.max_length)
    for name in sorted(trainer_cls.built_roles(recipe), key=lambda n: not getattr(recipe, n).trainable):
        spec: Role = getattr(recipe, name)
        mcfg = load_model_config(name, spec, vocab_size)
        if spec.lora is not None:
            from distill.lora import lora_param_counts  # peft only where a recipe asks for LoRA

            n, trained = lora_param_counts(mcfg, spec.lora, name)
        else:
            n, trained = count_params(mcfg), None
        kw = dict(micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, world_size=world_size,
                  grad_clip=t.grad_clip, hidden_size=getattr(mcfg, "hidden_size", None),
                  frozen_zero3=None if spec.trainable else frozen_zero3_settings(mcfg, n))
        placement, why = requested_placement(spec), "set by the recipe"
        if not spec.trainable and placement is None:
            whole = estimate_memory(RolePlan(name, spec, role_ds_config(name, spec, placement="replicated", **kw), mcfg, n), **mem)
            others = sum(sum(estimate_memory(p, **mem).values()) for p in plans.values())
            placement, why = choose_placement(weights_bytes=whole["weights"], other_bytes=others + whole["activations"] + whole["logits"],
                                              device_bytes=device_memory(), world_size=world_size)
            why = f"auto: {why}"
        ds = role_ds_config(name, spec, placement=placement, **kw)
        plans[name] = RolePlan(name, spec, ds, mcfg, n, trained, placement, "" if spec.trainable else why)
        plans[name].compile = resolve_compile(plans[name])
    trainable = [n for n, p in plans.items() if p.spec.trainable]
    if not trainable:
        raise RecipeError(f"no role is trainable: set `trainable: true` on one of {list(plans)}")
    if len(trainable) > 1:
        raise RecipeError(f"roles {trainable} are all trainable; the shared loop steps one role: set `trainable: false` "
                          "on all but one, or override `train` in your trainer to step several")
    return plans


def resolve_compile(plan: RolePlan) -> bool:
    """`compile` null -> on where it was measured to pay: on GPUs, the weights whole on each GPU (ZeRO-3's hooks
    gather inside the layers), no LoRA adapter (not measured). On CPU the test-sized models' compile costs more
    than the run."""
    if plan.spec.compile is not None:
        return plan.spec.compile
    import torch

    return torch.cuda.is_available() and plan.zero_stage < 3 and plan.spec.lora is None


def format_plan(plans: dict[str, RolePlan], world_size: int) -> str:
    rows = [("role", "trainable", "ZeRO", "offload", "placement", "precision", "compiled", "params", "trained params")]
    for p in plans.values():
        how = "frozen" if not p.spec.trainable else f"LoRA r={p.spec.lora.r}" if p.spec.lora else "yes"
        trained = f"{p.num_trainable / 1e6:.2f}M ({100 * p.num_trainable / max(p.num_params, 1):.2f}%)" if p.spec.trainable else "-"
        rows.append((p.name, how, str(p.zero_stage), p.offload, p.placement or "-", p.spec.precision,
                     "yes" if p.compile else "no", f"{p.num_params / 1e6:.2f}M", trained))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{p.name} placement {p.placement}: {p.placement_reason}" for p in plans.values() if p.placement_reason]
    return f"roles ({world_size} process{'es' if world_size > 1 else ''}):\n  " + "\n  ".join(lines)


def estimate_memory(plan: RolePlan, *, world_size: int, micro_batch_size: int, seq_len: int) -> dict[str, float]:
    """Rough bytes per GPU of one role, by kind; a planning aid, not a measurement.

    weights: P x dtype bytes, divided by the world under ZeRO-3 (0 with parameter offload);
    gradients (trainable): T x dtype bytes, divided by the world from ZeRO-2;
    optimizer (trainable): AdamW's two fp32 moments, plus fp32 master weights for 16-bit roles, of
    T parameters, divided by the world from ZeRO-1 (0 with optimizer offload);
    (T: the trained parameters, P for a full role, the adapter's with LoRA;)
    activations (trainable): 34 x hidden bytes per token per layer in 16-bit, doubled in fp32
    (Korthikanti et al. 2022, no recomputation), 2 x hidden with gradient checkpointing;
    logits: one fp32 [tokens, vocab] tensor and its log-softmax.
    """
    p, spec, cfg = plan.num_params, plan.spec, plan.model_config
    b = 4 if spec.precision == "fp32" else 2
    stage, zero = plan.zero_stage, plan.ds_config["zero_optimization"]
    shard = lambda n, from_stage: n / world_size if stage >= from_stage else n  # noqa: E731
    out = {"weights": 0.0 if zero.get("offload_param", {}).get("device") == "cpu" else shard(p * b, 3)}
    tokens = micro_batch_size * seq_len
    hidden, layers = getattr(cfg, "hidden_size", 0), getattr(cfg, "num_hidden_layers", 0)
    if spec.trainable:
        t = plan.num_trainable
        out["gradients"] = shard(t * b, 2)
        opt = t * (8 + (4 if b == 2 else 0))
        out["optimizer"] = 0.0 if zero.get("offload_optimizer", {}).get("device") == "cpu" else shard(opt, 1)
        per_token_layer = 2 * hidden * b if spec.gradient_checkpointing else 34 * hidden * (2 if b == 4 else 1)
        out["activations"] = float(tokens * layers * per_token_layer)
    else:
        out["gradients"] = out["optimizer"] = 0.0
        out["activations"] = float(tokens * hidden * b * 4)  # no_grad: a few live [tokens, hidden] buffers
    out["logits"] = float(tokens * getattr(cfg, "vocab_size", 0) * 4 * 2)
    return out


def format_memory(plans: dict[str, RolePlan], *, world_size: int, micro_batch_size: int, seq_len: int) -> str:
    kinds = ("weights", "gradients", "optimizer", "activations", "logits")
    rows = [("role", *kinds, "total")]
    grand = 0.0
    for p in plans.values():
        est = estimate_memory(p, world_size=world_size, micro_batch_size=micro_batch_size, seq_len=seq_len)
        total = sum(est.values())
        grand += total
        rows.append((p.name, *(_gib(est[k]) for k in kinds), _gib(total)))
    rows.append(("all roles", *("" for _ in kinds), _gib(grand)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return (f"estimated memory per GPU (GiB; {world_size} process{'es' if world_size > 1 else ''}, micro-batch "
            f"{micro_batch_size} x {seq_len} tokens):\n  " + "\n  ".join(lines))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"
