"""Run on 2 processes: a LoRA role trained by DistillTrainer or DPOTrainer, checked from the inside.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.lora_check ROOT OUT_JSON MODE [key=value ...]

MODE `distill`: a LoRA student (q_proj, v_proj). Checks: only the adapter trains and its size is the
analytic r * (in + out) per adapted layer; the base weights are bit-identical after training while
the adapter changed; final/student/ (merged, plain transformers) and final/student/adapter/ (peft on
the base) give the trained model's logits.
MODE `dpo`: a LoRA policy from the tiny teacher; the reference as the overrides say. Writes the
metrics, the roles built and the parameters they hold, for the test to compare two runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

R, TARGETS = 4, ["q_proj", "v_proj"]


def analytic_lora_params(cfg) -> int:
    head = cfg.hidden_size // cfg.num_attention_heads
    q_in_out = cfg.hidden_size + cfg.num_attention_heads * head
    v_in_out = cfg.hidden_size + cfg.num_key_value_heads * head
    return cfg.num_hidden_layers * R * (q_in_out + v_in_out)


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 holds a shard; ds_numel is the full size


def held_params(t) -> int:
    """Parameters this rank holds in all its roles (a shard of each ZeRO-3 parameter)."""
    return sum(getattr(p, "ds_tensor", p).numel() for m in t.models.values() for p in m.module.parameters())


def base_key(k: str) -> str:
    """A wrapped model's key of a base weight -> the plain transformers key."""
    return k.removeprefix("base_model.model.").replace(".base_layer", "")


def main(argv: list[str] | None = None) -> None:
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.data.preference import write_preference_dataset
    from distill.trainers.distill import DistillTrainer
    from distill.trainers.dpo import DPOTrainer
    from tests.helpers import end_of_script, tiny_assets, tiny_recipe

    args = argv or sys.argv[1:]
    root, out_json, mode, overrides = Path(args[0]), Path(args[1]), args[2], args[3:]
    assets = tiny_assets(root)
    lora = {"r": R, "alpha": 2.0 * R, "target_modules": TARGETS}
    if mode == "distill":
        raw = tiny_recipe(assets, out_json.parent / "run", overwrite=True, student={"lora": lora})
        raw["train"]["max_steps"] = 4
        cls = DistillTrainer
    else:
        prefs = root / "prefs"
        write_preference_dataset(prefs, seed=0, n_train=96, n_eval=21)
        raw = {
            "trainer": "dpo", "output_dir": str(out_json.parent / "run"), "overwrite": True, "seed": 0,
            "policy": {"from_pretrained": assets["teacher"], "deepspeed": "zero2", "optimizer": {"lr": 1e-2}, "lora": lora},
            "dpo": {"loss": "sigmoid", "beta": 0.5},
            "data": {"train": str(prefs / "train.jsonl"), "eval": str(prefs / "eval.jsonl"), "max_length": 48,
                     "tokenizer": str(prefs / "tokenizer")},
            "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 4, "log_every": 1, "progress": False},
        }
        cls = DPOTrainer
    recipe = validate_recipe(deep_merge(raw, parse_overrides(overrides)), cls)
    t = cls(recipe)
    role = t.trainable
    record = {"roles": sorted(t.models), "held_params": held_params(t),
              "trainable_params": sum(_numel(p) for p in role.module.parameters() if p.requires_grad),
              "analytic_lora_params": analytic_lora_params(role.plan.model_config),
              "planned_trainable_params": role.plan.num_trainable}
    before = {k: v.detach().clone() for k, v in (role.state_dict() or {}).items()}  # ZeRO-2 gives the live tensors
    record["history"] = t.train()
    after = {k: v.detach().clone() for k, v in (role.state_dict() or {}).items()}
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(0))
    role.engine.eval()
    with torch.no_grad():
        live = role(input_ids=ids).logits  # every rank: a ZeRO-3 forward is collective
    if t.accelerator.is_main_process:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        unset_hf_deepspeed_config()  # plain loads below, not under the run's ZeRO-3 config
        lora_keys = [k for k in after if ".lora_" in k]
        record["base_identical"] = all(torch.equal(before[k], after[k]) for k in after if ".lora_" not in k)
        record["adapter_changed"] = all(not torch.equal(before[k], after[k]) for k in lora_keys) and bool(lora_keys)
        final = Path(recipe.output_dir) / "final" / role.name
        record["peft_files_at_top"] = (final / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(final).eval()
        base = AutoModelForCausalLM.from_config(role.plan.model_config)
        base.load_state_dict({base_key(k): v for k, v in before.items() if ".lora_" not in k})
        adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
        with torch.no_grad():
            record["merged_max_diff"] = float((merged(input_ids=ids).logits - live).abs().max())
            record["adapter_max_diff"] = float((adapted(input_ids=ids).logits - live).abs().max())
        record["live_logit_scale"] = float(live.abs().max())
        record["metrics"] = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines()]
        out_json.write_text(json.dumps(record))
    end_of_script()


if __name__ == "__main__":
    main()
