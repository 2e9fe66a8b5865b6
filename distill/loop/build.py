"""What the loop builds for each role: its options applied to a fresh model, its optimizer and schedule."""
from __future__ import annotations

import json
import math

import torch

from distill.config.schema import Role
from distill.models.compile import compile_layers
from distill.models.lora import apply_lora


def apply_role_options(plan, model: torch.nn.Module) -> torch.nn.Module:
    """A freshly built model with its role's gradient checkpointing, compiled layers and LoRA adapter, as
    the recipe block asks; before `RoleManager.build` prepares it (and before the optimizer: LoRA leaves
    only the adapter trainable)."""
    if plan.spec.gradient_checkpointing and plan.spec.trainable:
        model.gradient_checkpointing_enable()
        if plan.spec.lora is not None:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    if plan.compile:
        compile_layers(model)
    if plan.spec.lora is not None:
        model = apply_lora(model, plan.spec.lora, plan.name)
    return model


def build_optimizer(spec: Role, model: torch.nn.Module, *, total_steps: int, device: torch.device):
    """The optimizer and learning-rate schedule a trainable role's block asks for (`optimizer`, `scheduler`)."""
    opt_spec, sched = spec.optimizer, spec.scheduler
    params = [p for p in model.parameters() if p.requires_grad]
    fused = opt_spec.fused if opt_spec.fused is not None else device.type == "cuda"
    if opt_spec.name == "adamw":
        opt = torch.optim.AdamW(params, lr=opt_spec.lr, betas=opt_spec.betas, eps=opt_spec.eps,
                                weight_decay=opt_spec.weight_decay, fused=fused)
    else:
        opt = torch.optim.SGD(params, lr=opt_spec.lr, weight_decay=opt_spec.weight_decay, fused=fused)
    warm, floor = sched.warmup_steps, sched.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[sched.name]
        return floor + (1 - floor) * shape  # constant: shape 1, so the floor does not matter

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def init_key(spec: Role) -> str | None:
    """What makes two random-init roles the same model at step 0 (None: loaded, or adapted by LoRA)."""
    if spec.from_pretrained is not None or spec.config is None or spec.lora is not None:
        return None
    return json.dumps([spec.model_class, spec.config], sort_keys=True, default=str)
