"""Run on 2 processes: a DistillTrainer run checked against a slow single-process reference.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.train_check ASSETS_DIR OUT_JSON [key=value ...]

Checks: the first step's gradient norm equals the one of the same loss computed whole in plain torch
over all ranks' micro-batches (so losses are divided by the valid tokens of the whole accumulated
step, on all ranks); ranks see disjoint batches; the teacher does not change, the student does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def reference_grad_norm(student_state, teacher_dir, config, micro_batches, kd) -> float:
    """The step-1 gradient norm of alpha*CE + (1-alpha)*KD over every micro-batch of every rank, whole."""
    from transformers import AutoModelForCausalLM

    from distill.losses import cross_entropy, get_kd_loss

    student = AutoModelForCausalLM.from_config(config)
    student.load_state_dict(student_state)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    n = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        logits = student(**inputs).logits
        ce = cross_entropy(logits, b["labels"], num_valid_tokens=n)
        div = get_kd_loss(kd.loss)(logits, t_logits, b["labels"], num_valid_tokens=n, temperature=kd.temperature, **kd.params)
        total = total + kd.alpha * ce + (1 - kd.alpha) * div
    total.backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters()])))


def main(argv: list[str] | None = None) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.trainers.distill import DistillTrainer
    from tests.helpers import end_of_script, tiny_assets, tiny_recipe

    args = argv or sys.argv[1:]
    root, out_json, overrides = Path(args[0]), Path(args[1]), args[2:]
    assets = tiny_assets(root)
    raw = deep_merge(tiny_recipe(assets, root / "run_train", overwrite=True), parse_overrides(overrides))
    recipe = validate_recipe(raw, DistillTrainer)

    seen: list[list[int]] = []
    first_step: list[dict] = []

    class Probe(DistillTrainer):
        def loss_step(self, batch, num_tokens):
            ids = batch["input_ids"].cpu()
            seen.append([hash(tuple(row.tolist())) for row in ids])
            if len(first_step) < self.recipe.train.grad_accum:
                first_step.append({k: v.cpu() for k, v in batch.items()})
            return super().loss_step(batch, num_tokens)

    t = Probe(recipe)
    student0 = {k: v.detach().clone() for k, v in t.student.state_dict().items()}
    teacher0 = t.teacher.state_dict()
    history = t.train()
    student1, teacher1 = t.student.state_dict(), t.teacher.state_dict()

    gathered_seen = [None] * t.world_size
    dist.all_gather_object(gathered_seen, seen)
    gathered_first = [None] * t.world_size
    dist.all_gather_object(gathered_first, first_step)
    if t.accelerator.is_main_process:
        rows = [set(h for batch in s for h in batch) for s in gathered_seen]
        assert not rows[0] & rows[1], "ranks trained on the same sequences"
        for k, v in teacher0.items():
            torch.testing.assert_close(teacher1[k], v, rtol=0, atol=0)
        assert any(not torch.equal(student1[k], v) for k, v in student0.items()), "student weights did not change"
        metrics = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in metrics if "loss" in m]
        unset_hf_deepspeed_config()  # the reference is plain torch, whole
        ref = reference_grad_norm(student0, assets["teacher"], t.plans["student"].model_config,
                                  [b for per_rank in gathered_first for b in per_rank], recipe.kd)
        got = train[0]["grad_norm"]
        assert abs(got - ref) <= 1e-4 * ref, f"step-1 grad norm {got} != reference {ref}"
        assert train[-1]["loss"] < train[0]["loss"], "loss did not go down"
        out_json.write_text(json.dumps({"grad_norm": got, "reference": ref, "history": history,
                                        "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
                                        "batches_per_rank": [len(s) for s in gathered_seen],
                                        # what a CPU run imports: inductor only when a role compiles
                                        "inductor_loaded": "torch._inductor.compile_fx" in sys.modules}))
    end_of_script()


if __name__ == "__main__":
    main()
