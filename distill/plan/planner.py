"""From a validated recipe to what each role will be: its DeepSpeed config, model config and size.

Everything here runs before any weight is loaded, so an impossible setup fails in seconds with a
message naming the recipe key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from distill.config.deepspeed import requested_placement, role_ds_config
from distill.config.errors import RecipeError
from distill.config.schema import Role, role_grad_clip
from distill.models.build import count_params, load_model_config
from distill.models.lora import lora_param_counts
from distill.plan.placement import choose_placement, device_memory, frozen_zero3_settings


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
    """Frozen roles: replicated, sharded or offload (see distill/plan/placement.py)."""
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


def plan_roles(recipe, trainer_cls, *, world_size: int, vocab_size: int | None) -> dict[str, RolePlan]:
    """Every role the run builds (`trainer_cls.built_roles`), trainable roles first, in the order the trainer declares
    them (the first one owns the primary Accelerator). Any number of roles may be trainable; each steps its own
    optimizer (distill/loop/trainer.py)."""
    plans: dict[str, RolePlan] = {}
    for name in sorted(trainer_cls.built_roles(recipe), key=lambda n: not getattr(recipe, n).trainable):
        plans[name] = plan_role(recipe, name, world_size=world_size, vocab_size=vocab_size, beside=list(plans.values()))
    if not any(p.spec.trainable for p in plans.values()):
        raise RecipeError(f"no role is trainable: set `trainable: true` on one of {list(plans)}")
    return plans


def plan_role(recipe, name: str, *, world_size: int, vocab_size: int | None, beside: Sequence[RolePlan] = (),
              grad_accum: int | None = None) -> RolePlan:
    """One role's plan. A frozen role without a `placement` is replicated where its weights fit on each device beside
    the `beside` roles' memory, else ZeRO-3 (`choose_placement`). `grad_accum`: the loop's, unless given (a role
    planned for a job of its own, such as the teacher-cache writer's forward)."""
    spec: Role = getattr(recipe, name)
    t = recipe.train
    mem = dict(world_size=world_size, micro_batch_size=t.micro_batch_size, seq_len=recipe.data.max_length)
    mcfg = load_model_config(name, spec, vocab_size)
    if spec.lora is not None:
        n, trained = lora_param_counts(mcfg, spec.lora, name)
    else:
        n, trained = count_params(mcfg), None
    kw = dict(micro_batch_size=t.micro_batch_size, grad_accum=grad_accum or t.grad_accum, world_size=world_size,
              grad_clip=role_grad_clip(spec, t), hidden_size=getattr(mcfg, "hidden_size", None),
              frozen_zero3=None if spec.trainable else frozen_zero3_settings(mcfg, n))
    placement, why = requested_placement(spec), "set by the recipe"
    if not spec.trainable and placement is None:
        whole = estimate_memory(RolePlan(name, spec, role_ds_config(name, spec, placement="replicated", **kw), mcfg, n), **mem)
        others = sum(sum(estimate_memory(p, **mem).values()) for p in beside)
        placement, why = choose_placement(weights_bytes=whole["weights"], other_bytes=others + whole["activations"] + whole["logits"],
                                          device_bytes=device_memory(), world_size=world_size)
        why = f"auto: {why}"
    plan = RolePlan(name, spec, role_ds_config(name, spec, placement=placement, **kw), mcfg, n, trained, placement,
                    "" if spec.trainable else why)
    plan.compile = resolve_compile(plan)
    return plan


def resolve_compile(plan: RolePlan) -> bool:
    """`compile` null -> on where it was measured to pay: on GPUs, the weights whole on each GPU (ZeRO-3's hooks
    gather inside the layers), no LoRA adapter (not measured). On CPU the test-sized models' compile costs more
    than the run."""
    if plan.spec.compile is not None:
        return plan.spec.compile
    return torch.cuda.is_available() and plan.zero_stage < 3 and plan.spec.lora is None


def format_plan(plans: dict[str, RolePlan], world_size: int, device: str | None = None) -> str:
    """The roles table; `device`, where the processes compute and why (`distill.runtime.launch.place_processes`)."""
    rows = [("role", "trainable", "ZeRO", "offload", "placement", "precision", "compiled", "params", "trained params")]
    for p in plans.values():
        how = "frozen" if not p.spec.trainable else f"LoRA r={p.spec.lora.r}" if p.spec.lora else "yes"
        trained = f"{p.num_trainable / 1e6:.2f}M ({100 * p.num_trainable / max(p.num_params, 1):.2f}%)" if p.spec.trainable else "-"
        rows.append((p.name, how, str(p.zero_stage), p.offload, p.placement or "-", p.spec.precision,
                     "yes" if p.compile else "no", f"{p.num_params / 1e6:.2f}M", trained))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"{p.name} placement {p.placement}: {p.placement_reason}" for p in plans.values() if p.placement_reason]
    lines += [f"device {device}"] if device else []
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
