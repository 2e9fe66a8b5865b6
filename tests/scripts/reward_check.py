"""Run on 2 processes: the reward trainer against plain torch, and its saved model as GRPO's reward role.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.reward_check ROOT OUT_JSON [key=value ...]
    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.reward_check ROOT OUT_JSON quickstart

With overrides: a tiny config-built classifier, trainable at ZeRO-3, on pairs with a margin column `gap`. Checks: the
step-1 loss and gradient norm equal the loss of every rank's micro-batches computed whole in plain torch (pairs
normalised over the step); the eval before training equals plain torch over every eval pair (padding pairs count
in nothing); ranks see disjoint pairs.

`quickstart`: recipes/reward_quickstart.yaml, shortened; then a GRPO run whose `reward.from_pretrained` is its
final/reward/, with REINFORCE++ advantages, GSPO's ratio per completion over 2 updates per batch, and the KL as a
reward penalty. Checks: every completion's reward is the saved classifier's score of it (each prompt + completion
alone, unpadded, through plain transformers) less beta times its KL; the KL is 0 while the policy is the
reference; the advantages are the rewards of both ranks normalised in float64.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = 4


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def plain_torch(state, config, batches, spec) -> dict:
    """Loss (summed over pairs / all pairs) and its gradient norm over `batches`, whole, in plain torch; and the
    accuracy and margin, with the loss again without margins (to show that they count)."""
    from transformers import AutoModelForSequenceClassification

    from distill.losses.reward import bradley_terry, centering

    model = AutoModelForSequenceClassification.from_config(config)
    model.load_state_dict(state)
    pairs = sum(int((b["labels"][: len(b["labels"]) // 2] != -100).any(-1).sum()) for b in batches)
    total, plain, right, gap = 0.0, 0.0, 0.0, 0.0
    for b in batches:
        half = len(b["labels"]) // 2
        real = (b["labels"][:half] != -100).any(-1)
        # Chosen and rejected in two separate forwards here: the trainer's concatenated one must agree.
        c = model(input_ids=b["input_ids"][:half], attention_mask=b["attention_mask"][:half]).logits[:, 0][real]
        r = model(input_ids=b["input_ids"][half:], attention_mask=b["attention_mask"][half:]).logits[:, 0][real]
        m = b["gap"][real] if spec.margin_column else None
        center = spec.center_rewards_coefficient * centering(c, r) if spec.center_rewards_coefficient else 0
        total = total + (bradley_terry(c, r, margin=m) + center).sum() / pairs
        plain += float((bradley_terry(c, r) + center).sum()) / pairs
        right += float((c > r).sum()) / pairs
        gap += float((c - r).sum()) / pairs
    if not torch.is_grad_enabled():
        return {"loss": float(total), "accuracy": right, "margin": gap}
    total.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    return {"loss": float(total), "grad_norm": float(norm), "accuracy": right, "margin": gap,
            "margin_effect": abs(float(total) - plain)}


def margin_run(root: Path, out_json: Path, overrides: list[str]) -> None:
    from transformers import AutoTokenizer

    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.data.preference import PreferenceCollator, write_preference_dataset
    from distill.data.synthetic import write_atomic
    from distill.trainers.reward import RewardTrainer
    from tests.helpers import TINY_LLAMA

    prefs, data = root / "prefs", root / "prefs_gap"
    write_preference_dataset(prefs, seed=0, n_train=96, n_eval=21)
    data.mkdir(exist_ok=True)
    for split in ("train", "eval"):  # every rank writes the same bytes, each file whole (no process group yet)
        rows = [json.loads(line) for line in (prefs / f"{split}.jsonl").read_text().splitlines()]
        write_atomic(data / f"{split}.jsonl", "".join(json.dumps({**r, "gap": (i % 5) / 2}) + "\n" for i, r in enumerate(rows)))
    raw = {
        "trainer": "reward", "output_dir": str(root / "run_reward"), "overwrite": True, "seed": 0,
        "reward": {"config": TINY_LLAMA, "deepspeed": "zero3", "optimizer": {"lr": 1e-3}},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_length": 48,
                 "tokenizer": str(prefs / "tokenizer")},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": STEPS, "log_every": 1, "progress": False},
    }
    recipe = validate_recipe(deep_merge(raw, parse_overrides(overrides)), RewardTrainer)
    seen, first_step = [], []

    class Probe(RewardTrainer):
        def loss_step(self, batch, num_tokens):
            if self.reward.module.training:  # not during evaluation
                seen.extend(int(i) for i in batch["index"])
                if len(first_step) < self.recipe.train.grad_accum:
                    first_step.append({k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)})
            return super().loss_step(batch, num_tokens)

    t = Probe(recipe)
    state0 = t.reward.state_dict()  # collective: gathered from ZeRO-3 on the main process (None elsewhere)
    state0 = state0 and {k: v.detach().clone() for k, v in state0.items()}
    history = t.train()
    all_seen, all_first = _gather(seen), _gather(first_step)
    if t.accelerator.is_main_process:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        config = t.plans["reward"].model_config
        metrics = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
        first = next(m for m in metrics if "grad_norm" in m)
        ref = plain_torch(state0, config, [b for per_rank in all_first for b in per_rank], recipe.rm)
        assert abs(first["grad_norm"] - ref["grad_norm"]) <= 1e-4 * ref["grad_norm"], (first, ref)
        assert abs(first["loss"] - ref["loss"]) <= 1e-5 * ref["loss"], (first, ref)
        # The eval before training: every eval pair once, in plain torch.
        tok = AutoTokenizer.from_pretrained(prefs / "tokenizer")
        pairs = [t.data.eval[i] for i in range(len(t.data.eval))]
        whole = PreferenceCollator(tok.pad_token_id)(pairs)
        whole["gap"] = torch.tensor([p["gap"] for p in pairs])
        with torch.no_grad():
            state_eval = plain_torch(state0, config, [whole], recipe.rm)
        for key in ("loss", "accuracy", "margin"):
            assert abs(history["before"][key] - state_eval[key]) <= 1e-5 * max(1.0, abs(state_eval[key])), (key, history, state_eval)
        out_json.write_text(json.dumps({"first": first, "reference": ref, "history": history, "eval_reference": state_eval,
                                        "disjoint": not set(all_seen[0]) & set(all_seen[1])}))


def quickstart_run(root: Path, out_json: Path) -> None:
    from distill.config.recipe import validate_recipe
    from distill.runtime.roles import forget_roles
    from distill.trainers import load_recipe
    from distill.trainers.grpo import GRPOTrainer
    from distill.trainers.reward import RewardTrainer

    run = root / "run_reward_quickstart"
    recipe, cls = load_recipe("reward_quickstart", [
        f"output_dir={run}", f"data.train={root / 'rq_data/train.jsonl'}", f"data.eval={root / 'rq_data/eval.jsonl'}",
        "train.max_steps=40", "train.progress=false", "train.eval_batches=10"])
    assert cls is RewardTrainer
    history = RewardTrainer(recipe).train()
    dist.barrier()
    forget_roles()

    beta, records = 0.1, []
    raw = {
        "trainer": "grpo", "output_dir": str(root / "run_grpo_rm"), "overwrite": True, "seed": 0,
        "policy": {"from_pretrained": "distill:assets/teacher", "optimizer": {"lr": 5e-3}},
        "reference": {"deepspeed": "zero3"},
        "reward": {"from_pretrained": str(run / "final" / "reward")},
        "grpo": {"num_generations": 4, "max_completion_length": 10, "advantage": "reinforce_pp", "loss_type": "grpo",
                 "importance_sampling_level": "sequence", "num_iterations": 2, "beta": beta, "kl_penalty": "reward"},
        "data": {"train": str(root / "grpo_data/train.jsonl"), "synthetic_seed": 0, "max_length": 32},
        "train": {"micro_batch_size": 8, "grad_accum": 2, "max_steps": STEPS, "log_every": 1, "progress": False,
                  "eval_samples": 0},
    }

    class Probe(GRPOTrainer):
        def prepare_step(self, step, micro_batches):
            micro = super().prepare_step(step, micro_batches)
            if (step - 1) % self.recipe.grpo.num_iterations == 0:  # a new generation batch
                keys = ("input_ids", "attention_mask", "rewards", "advantages", "kl")
                records.append({"step": step, **{k: torch.cat([mb[k] for mb in micro]).cpu() for k in keys}})
            return micro

    grpo = Probe(validate_recipe(raw, GRPOTrainer))
    assert "reward" in grpo.models and grpo.reward_model.tokenizer is None  # the same tokenizer: it reads the ids
    grpo.train()
    everyone = _gather(records)
    if dist.get_rank() == 0:
        from transformers import AutoModelForSequenceClassification
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        scorer = AutoModelForSequenceClassification.from_pretrained(run / "final" / "reward").eval()
        errors, scores, kl_first, kl_later = [], [], 0.0, 0.0
        for batches in zip(*everyone):  # the same generation batch on each rank
            rewards = torch.cat([b["rewards"] for b in batches]).double()
            adv = torch.cat([b["advantages"] for b in batches]).double()
            mean, std = rewards.mean(), rewards.std()  # REINFORCE++ over both ranks, float64
            assert torch.allclose(adv, (rewards - mean) / (std + 1e-4), atol=1e-5), (adv, rewards)
            for b in batches:
                with torch.no_grad():
                    for row in range(b["input_ids"].shape[0]):
                        ids = b["input_ids"][row][b["attention_mask"][row].bool()][None]
                        score = float(scorer(input_ids=ids).logits[0, 0])
                        scores.append(score)
                        errors.append(abs(float(b["rewards"][row] + beta * b["kl"][row]) - score))
                kl = float(b["kl"].abs().max())
                kl_first, kl_later = (max(kl_first, kl), kl_later) if b["step"] == 1 else (kl_first, max(kl_later, kl))
        assert kl_first < 1e-5 < kl_later, (kl_first, kl_later)  # the policy starts as the reference, then moves
        metrics = [json.loads(line) for line in (Path(raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in metrics if "loss" in m]
        assert len(train) == STEPS and all(math.isfinite(m["loss"]) for m in train)
        assert all("kl" in m for m in train if "reward" in m)  # the penalty's KL, logged per generation batch
        out_json.write_text(json.dumps({"history": history, "grpo": {
            "rows": len(scores), "max_score_error": max(errors), "score_spread": max(scores) - min(scores),
            "kl_first": kl_first, "kl_later": kl_later}}))


def main(argv: list[str] | None = None) -> None:
    from tests.helpers import end_of_script

    args = argv or sys.argv[1:]
    root, out_json, rest = Path(args[0]), Path(args[1]), args[2:]
    if rest == ["quickstart"]:
        quickstart_run(root, out_json)
    else:
        margin_run(root, out_json, rest)
    end_of_script()


if __name__ == "__main__":
    main()
