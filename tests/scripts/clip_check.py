"""Run on 2 processes: one optimizer step under DeepSpeed ZeRO-2 against the same step in plain torch.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.clip_check ASSETS_DIR OUT_JSON GRAD_CLIP

GRAD_CLIP: `null` (no clipping) or a number. The `lm` trainer takes one SGD step on SCALE x its CE loss (so the
gradient norm is well above 1); the reference computes the same loss whole over every rank's micro-batches, clips with `torch.nn.utils.clip_grad_norm_` when the recipe
asks for it, and steps `torch.optim.SGD`. The weights after the step must agree, and must differ from the
step clipped at 1.0 (DeepSpeed's own default), so the check would see clipping where none was asked.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

SCALE = 20.0


def reference_step(before, config, micro_batches, lr: float, clip: float | None):
    """The weights after one plain-torch SGD step on the CE of every micro-batch of every rank; its grad norm."""
    from transformers import AutoModelForCausalLM

    from distill.losses import cross_entropy

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(before)
    n = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    loss = SCALE * sum(cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"],
                             num_valid_tokens=n) for b in micro_batches)
    loss.backward()
    params = list(model.parameters())
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    torch.optim.SGD(params, lr=lr).step()
    return {k: v.detach() for k, v in model.state_dict().items()}, norm


def main(argv: list[str] | None = None) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from distill.config.recipe import validate_recipe
    from distill.trainers.lm import LMTrainer
    from tests.helpers import TINY_LLAMA, end_of_script, tiny_assets
    from tests.scripts.nan_check import snapshot

    args = argv or sys.argv[1:]
    root, out_json, clip = Path(args[0]), Path(args[1]), yaml.safe_load(args[2])
    assets = tiny_assets(root)
    lr = 0.5
    recipe = validate_recipe({
        "trainer": "lm", "output_dir": str(root / f"run_clip_{clip}"), "overwrite": True, "seed": 0,
        "model": {"config": TINY_LLAMA, "deepspeed": "zero2", "optimizer": {"name": "sgd", "lr": lr},
                  "scheduler": {"name": "constant"}},
        "data": {"train": assets["train"], "max_length": 64, "tokenizer": assets["tokenizer"]},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 1, "grad_clip": clip, "progress": False,
                  "log_every": 1, "report_to": "none"},
    }, LMTrainer)
    batches: list[dict] = []

    class Probe(LMTrainer):
        def loss_step(self, batch, num_tokens):
            batches.append({k: v.cpu() for k, v in batch.items()})
            return {k: SCALE * v for k, v in super().loss_step(batch, num_tokens).items()}

    t = Probe(recipe)
    before = {k: v.cpu() for k, v in snapshot(t.model.module).items()}
    t.train()
    after = {k: v.cpu() for k, v in snapshot(t.model.module).items()}
    everyone = [None] * t.world_size
    dist.all_gather_object(everyone, batches)
    if t.rank == 0:
        unset_hf_deepspeed_config()  # the reference is plain torch, whole
        config = t.plans["model"].model_config
        micro = [b for per_rank in everyone for b in per_rank]
        expected, norm = reference_step(before, config, micro, lr, clip)
        at_one, _ = reference_step(before, config, micro, lr, 1.0)
        metrics = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
        diff = max(float((after[k] - expected[k]).abs().max()) for k in expected)
        diff_at_one = max(float((after[k] - at_one[k]).abs().max()) for k in at_one)
        out_json.write_text(json.dumps({"grad_norm": metrics[0]["grad_norm"], "reference_norm": norm, "max_diff": diff,
                                        "max_diff_to_clipped_at_1": diff_at_one}))
    end_of_script()


if __name__ == "__main__":
    main()
