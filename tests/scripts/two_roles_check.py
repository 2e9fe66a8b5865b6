"""Run on 2 processes: two trainable roles, ZeRO-2 and ZeRO-3, each against a plain-torch reference; resume.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.two_roles_check ASSETS_DIR OUT_JSON

Two students of different sizes learn from one frozen teacher (CE + forward KL each). Each has its own optimizer
settings, warm-up, clipping norm and ZeRO stage. Checks, on rank 0:

- each student's weights after 4 steps equal those of one process that trains the same model whole in plain torch
  (AdamW, the warm-up lr, `clip_grad_norm_` at the role's own norm) on every rank's micro-batches; each step's
  logged `<role>/grad_norm` and `<role>/lr` are the reference's;
- a run resumed from the checkpoint of step 2 ends with exactly the weights of the uninterrupted run. The warm-up
  outlasts the run, so a scheduler that restarted at resume would give other weights;
- one more step with student_b's loss NaN skips student_b's update (and its schedule) while student_a steps, and a
  `loss_step` without a role's loss is refused, naming it.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distill import Role, RoleTrainer
from distill.losses import cross_entropy, forward_kl

STEPS = 4
SETTINGS = {  # role -> (ZeRO stage, model width, AdamW, warm-up steps, clipping norm: 0 is none)
    "student_a": {"deepspeed": "zero2", "hidden_size": 32, "optimizer": {"lr": 3e-3}, "warmup": 10, "grad_clip": 0.3},
    "student_b": {"deepspeed": "zero3", "hidden_size": 48, "optimizer": {"lr": 1e-3, "betas": [0.8, 0.95], "weight_decay": 0.1},
                  "warmup": 20, "grad_clip": 0},
}
TRAIN_CLIP = 0.01
"""`train.grad_clip`: every role overrides it, student_b with no clipping at all."""


class TwoStudents(RoleTrainer):
    name = "two_students_check"
    roles = {"student_a": Role(trainable=True), "student_b": Role(trainable=True), "teacher": Role(deepspeed="zero3")}

    def loss_step(self, batch, num_tokens):
        return student_losses(self.teacher, {n: self.models[n] for n in SETTINGS}, batch, num_tokens)


def student_losses(teacher, students, batch, num_tokens) -> dict:
    """Per student `<name>/loss` = (CE + KL(teacher || student)) / 2 over the micro-batch, divided by `num_tokens`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        target = teacher(**inputs).logits  # [B, T, V]
    out = {}
    for name, model in students.items():
        logits = model(**inputs).logits  # [B, T, V]
        ce = cross_entropy(logits, batch["labels"], num_valid_tokens=num_tokens)
        kd = forward_kl(logits, target, batch["labels"], num_valid_tokens=num_tokens)
        out[f"{name}/loss"], out[f"{name}/kd"] = 0.5 * ce + 0.5 * kd, kd
    return out


def recipe(assets: dict, out: Path, **train) -> dict:
    from tests.helpers import TINY_LLAMA

    roles = {name: {"config": {**TINY_LLAMA, "hidden_size": s["hidden_size"], "intermediate_size": 2 * s["hidden_size"]},
                    "deepspeed": s["deepspeed"], "optimizer": s["optimizer"], "grad_clip": s["grad_clip"],
                    "scheduler": {"name": "constant", "warmup_steps": s["warmup"]}} for name, s in SETTINGS.items()}
    return {"trainer": TwoStudents.name, "output_dir": str(out), "overwrite": True, "seed": 0, **roles,
            "teacher": {"from_pretrained": assets["teacher"], "deepspeed": "zero3"},
            "data": {"train": assets["train"], "max_length": 64},
            "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": STEPS, "log_every": 1, "progress": False,
                      "grad_clip": TRAIN_CLIP, "report_to": "none", **train},
            "launch": {"num_processes": 2}}


def reference(initial: dict, config, teacher, steps: list[list[dict]], spec: dict, name: str):
    """One role trained whole in plain torch: its weights after the steps, and each step's gradient norm and lr."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(initial)
    o = spec["optimizer"]
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))),
                            weight_decay=o.get("weight_decay", 0.0))
    norms, lrs = [], []
    for k, micro in enumerate(steps):
        lr = o["lr"] * (k + 1) / (spec["warmup"] + 1)  # linear warm-up, from step 0
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        n = sum(int((b["labels"] != -100).sum()) for b in micro)
        sum(student_losses(teacher, {name: model}, b, n)[f"{name}/loss"] for b in micro).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"] or float("inf"))))
        lrs.append(lr)
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, norms, lrs


def one_role_nan(t) -> dict:
    """One more step of a trained `t` whose student_b loss is NaN: student_b skips its update and its scheduler's
    step, student_a steps. Collective."""
    before = {n: t.models[n].state_dict() for n in SETTINGS}
    lrs = {n: t.models[n].lr() for n in SETTINGS}
    losses = t.loss_step
    t.loss_step = lambda batch, n: {k: v * float("nan") if k == "student_b/loss" else v for k, v in losses(batch, n).items()}
    out = t.train_step(STEPS + 1, next(t.data.train_batches(start_step=STEPS)))
    del t.loss_step
    after = {n: t.models[n].state_dict() for n in SETTINGS}
    changed = {n: any(not torch.equal(after[n][k], before[n][k]) for k in before[n]) for n in SETTINGS} if t.rank == 0 else {}
    return {"finite": out["finite"], "roles_finite": {n: r["finite"] for n, r in out["roles"].items()}, "changed": changed,
            "lr_moved": {n: t.models[n].lr() != lrs[n] for n in SETTINGS}}


def missing_loss(t) -> str:
    """The error of a step whose `loss_step` leaves out a trainable role's loss."""
    t.loss_step = lambda batch, n: {"loss": torch.zeros(())}
    try:
        t.train_step(STEPS + 2, next(t.data.train_batches(start_step=STEPS)))
    except ValueError as e:
        return str(e)
    finally:
        del t.loss_step
    return ""


def _weights(run: Path, role: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / role / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "student_a/loss" in line]


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from distill.config.recipe import validate_recipe
    from distill.runtime.roles import forget_roles
    from tests.helpers import end_of_script, tiny_assets

    args = argv or sys.argv[1:]
    root, out_json = Path(args[0]), Path(args[1])
    assets = tiny_assets(root)
    whole, resumed = out_json.parent / "whole", out_json.parent / "resumed"
    steps: list[list[dict]] = []

    class Recorded(TwoStudents):
        def train_step(self, step, micro_batches, **kw):
            steps.append([{k: v.clone() for k, v in b.items()} for b in micro_batches])
            return super().train_step(step, micro_batches, **kw)

    t = Recorded(validate_recipe(recipe(assets, whole, save_every=2), TwoStudents), log=lambda s: None)
    initial = {n: t.models[n].state_dict() for n in SETTINGS}  # gathered on rank 0 (collective)
    configs = {n: t.plans[n].model_config for n in SETTINGS}
    t.train()
    everyone = [None] * t.world_size
    dist.all_gather_object(everyone, steps)
    dist.barrier()
    forget_roles()

    # The checkpoint of step 2 in a run directory of its own, resumed there to the last step.
    if dist.get_rank() == 0:
        shutil.rmtree(resumed, ignore_errors=True)
        shutil.copytree(whole / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
        (resumed / "checkpoints" / "latest").write_text("step_00000002")
    dist.barrier()
    again = TwoStudents(validate_recipe({**recipe(assets, resumed, save_every=2), "resume": True, "overwrite": False},
                                        TwoStudents), log=lambda s: None)
    again.train()
    after_nan, refused = one_role_nan(again), missing_loss(again)

    if dist.get_rank() == 0:
        unset_hf_deepspeed_config()  # the references are plain torch, whole
        teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
        merged = [[b for per_rank in everyone for b in per_rank[k]] for k in range(STEPS)]
        metrics, out = _metrics(whole), {"roles": {}}
        for name, spec in SETTINGS.items():
            want, norms, lrs = reference(initial[name], configs[name], teacher, merged, spec, name)
            got, again = _weights(whole, name), _weights(resumed, name)
            out["roles"][name] = {
                "max_diff": max(float((got[k] - want[k]).abs().max()) for k in want),
                "moved": max(float((got[k] - initial[name][k]).abs().max()) for k in want),
                "grad_norms": [m[f"{name}/grad_norm"] for m in metrics], "reference_norms": norms,
                "lrs": [m[f"{name}/lr"] for m in metrics], "reference_lrs": lrs,
                "resumed_equal": got.keys() == again.keys() and all(torch.equal(got[k], again[k]) for k in got)}
        out["steps"] = [m["step"] for m in metrics]
        out["nan_step"], out["missing_loss"] = after_nan, refused
        out["resumed_steps"] = [m["step"] for m in _metrics(resumed)]
        out_json.write_text(json.dumps(out))
    end_of_script()


if __name__ == "__main__":
    main()
