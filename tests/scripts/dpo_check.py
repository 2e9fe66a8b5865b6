"""Run on 2 processes: a DPOTrainer run checked against a slow single-process reference.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.dpo_check ROOT OUT_JSON [key=value ...]

The policy starts from one tiny model and the reference is another, so rewards are non-zero from
the first step. Checks: the step-1 gradient norm equals that of the same loss computed whole in
plain torch over every rank's micro-batches (pairs normalised over the whole step); the reference
does not change (after training, its gathered weights are still those of the directory it was loaded from,
bit for bit); ranks see disjoint pairs.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist


def reference_grad_norm(policy_state, ref_dir, config, micro_batches, spec) -> tuple[float, float]:
    """Step-1 (gradient norm, loss) of the DPO loss over every micro-batch of every rank, whole, in plain torch."""
    from transformers import AutoModelForCausalLM

    from distill.losses import get_preference_loss
    from distill.trainers.dpo import sequence_logps

    policy = AutoModelForCausalLM.from_config(config)
    policy.load_state_dict(policy_state)
    reference = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    pairs = sum(int((b["labels"][: len(b["labels"]) // 2] != -100).any(-1).sum()) for b in micro_batches)
    total = 0.0
    for b in micro_batches:
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        half = len(b["labels"]) // 2
        # Chosen and rejected in two separate forwards here: the trainer's concatenated one must agree.
        pc = sequence_logps(policy(input_ids=inputs["input_ids"][:half], attention_mask=inputs["attention_mask"][:half]).logits, b["labels"][:half])
        pr = sequence_logps(policy(input_ids=inputs["input_ids"][half:], attention_mask=inputs["attention_mask"][half:]).logits, b["labels"][half:])
        with torch.no_grad():
            ref = sequence_logps(reference(**inputs).logits, b["labels"])
        losses = get_preference_loss(spec.loss)(pc, pr, ref[:half], ref[half:], beta=spec.beta, label_smoothing=spec.label_smoothing)
        total = total + losses.sum() / pairs
    total.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in policy.parameters()]))
    return float(norm), float(total)


def main(argv: list[str] | None = None) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.data.preference import write_preference_dataset
    from distill.trainers.dpo import DPOTrainer
    from tests.helpers import TINY_LLAMA, end_of_script, tiny_assets

    args = argv or sys.argv[1:]
    root, out_json, overrides = Path(args[0]), Path(args[1]), args[2:]
    assets = tiny_assets(root)
    prefs = root / "prefs"
    write_preference_dataset(prefs, seed=0, n_train=96, n_eval=21)
    raw = {
        "trainer": "dpo", "output_dir": str(root / "run_dpo"), "overwrite": True, "seed": 0,
        "policy": {"config": TINY_LLAMA, "deepspeed": "zero2", "optimizer": {"lr": 1e-3}},
        "reference": {"from_pretrained": assets["teacher"], "deepspeed": "zero3"},
        "dpo": {"loss": "sigmoid", "beta": 0.5},
        "data": {"train": str(prefs / "train.jsonl"), "eval": str(prefs / "eval.jsonl"), "max_length": 48,
                 "tokenizer": str(prefs / "tokenizer")},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 4, "log_every": 1, "progress": False},
    }
    # No eval samples: generating them builds the cache `generate` asks for; what is checked below is that the
    # training and scoring forwards build none.
    raw = deep_merge(raw, {"train": {"eval_samples": 0}})
    recipe = validate_recipe(deep_merge(raw, parse_overrides(overrides)), DPOTrainer)

    seen, first_step = [], []

    heads: list[str] = []  # whose log-probs went through an lm_head, in order

    class Probe(DPOTrainer):
        def head_logps(self, role, hidden, labels):
            heads.append(role.name)
            return super().head_logps(role, hidden, labels)

        def loss_step(self, batch, num_tokens):
            if self.policy.module.training:  # not during evaluation
                seen.extend(int(i) for i in batch["index"])
                if len(first_step) < self.recipe.train.grad_accum:
                    first_step.append({k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)})
            return super().loss_step(batch, num_tokens)

    t = Probe(recipe)
    ref_threads: set[str] = set()  # where the reference's forwards ran (train.overlap_frozen)
    if "reference" in t.models:
        t.reference.module.register_forward_pre_hook(lambda *_: ref_threads.add(threading.current_thread().name))
        # A slow reference: beside it, the policy's decoder finishes first, and its head must still wait.
        t.reference.module.register_forward_hook(lambda *_: time.sleep(0.05))
    caches: set[str] = set()  # roles whose forward built a KV cache (it should not: memory, see RoleModel)
    for name, role in t.models.items():
        role.module.register_forward_hook(
            lambda m, args, out, name=name: caches.add(name) if getattr(out, "past_key_values", None) is not None else None)
    policy0 = {k: v.detach().clone() for k, v in t.policy.state_dict().items()}
    history = t.train()
    reference_after = t.reference.state_dict() if "reference" in t.models else None  # collective; freed when precomputed
    all_seen, all_first = [None] * t.world_size, [None] * t.world_size
    dist.all_gather_object(all_seen, seen)
    dist.all_gather_object(all_first, first_step)
    if t.accelerator.is_main_process:
        assert t.world_size == 1 or not set(all_seen[0]) & set(all_seen[1]), "ranks trained on the same pairs"
        metrics = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in metrics if "loss" in m and "rewards/accuracy" in m]
        unset_hf_deepspeed_config()
        if reference_after is not None:
            from transformers import AutoModelForCausalLM

            source = AutoModelForCausalLM.from_pretrained(assets["teacher"]).state_dict()
            assert reference_after.keys() == source.keys()
            for k, v in source.items():
                assert torch.equal(reference_after[k], v), f"the reference's {k} changed in training"
        ref_norm, ref_loss = reference_grad_norm(policy0, assets["teacher"], t.plans["policy"].model_config,
                                                 [b for per_rank in all_first for b in per_rank], recipe.dpo)
        assert abs(train[0]["grad_norm"] - ref_norm) <= 1e-4 * ref_norm, (train[0]["grad_norm"], ref_norm)
        assert abs(train[0]["loss"] - ref_loss) <= 1e-5, (train[0]["loss"], ref_loss)
        out_json.write_text(json.dumps({"first": train[0], "last": train[-1], "history": history,
                                        "reference_grad_norm": ref_norm, "reference_threads": sorted(ref_threads),
                                        "kv_caches": sorted(caches), "reference_checked": reference_after is not None,
                                        "policy_heads": heads.count("policy"),
                                        "policy_head_before_reference_done": any(
                                            cur == "policy" and prev != "reference" for prev, cur in zip([None] + heads, heads))}))
    end_of_script()


if __name__ == "__main__":
    main()
