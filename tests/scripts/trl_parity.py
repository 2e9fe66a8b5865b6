"""Our DPOTrainer against TRL's DPOTrainer on one tiny setup: the pieces of tests/trainers/test_trl_parity.py.

    python -m tests.scripts.trl_parity prepare ROOT    # models, pairs, tokenizer, our recipe
    python -m distill.train ROOT/recipe.yaml                     # our side: ROOT/run_distill/metrics.jsonl
    python -m tests.scripts.trl_parity trl ROOT        # TRL's side: ROOT/trl.json

Each framework trains in its own process: accelerate's state is process-global, so the two trainers
must not share one. What is made equal, and why:

* models: one random tiny Llama saved as the policy, another (other seed, wider) as the reference,
  so rewards are non-zero from step 1. fp32, dropout off (TRL turns it off; the configs have none).
* data: ``PAIRS`` pairs, one batch of exactly that many pairs, so every step of both runs sees all of
  them whatever order each sampler draws (the DPO loss is a mean over the batch's pairs).
* tokenization: each framework tokenizes the text itself. Two things are aligned so they agree:
  - the synthetic tokenizer appends ``<eos>`` to every text it encodes. TRL tokenizes
    ``prompt + response + eos_token`` in one piece, so it would end each response with two eos
    (and keep one after the prompt, which its common-prefix split then drops). The tokenizer used
    here adds ``<bos>`` only, as Llama's tokenizers do;
  - TRL concatenates prompt and response strings, so each response carries its leading space
    (``" cat sat"``), as BPE data does; the word-level tokenizer would otherwise glue the two words
    at the boundary into one unknown token. Our tokenizer of preferences tokenizes the parts
    separately and is indifferent to that space.
  The TRL side records the ids both tokenizers produced; the test checks they are the same.
* optimisation: AdamW (torch's, both sides) with equal lr, betas, eps and weight decay 0, a constant
  learning rate without warmup, gradient clipping at the same norm, one process, no accumulation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PAIRS = 8
STEPS = 3
SETTINGS = dict(beta=0.5, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, max_length=48, grad_clip=1.0, seed=0)


def prepare(root: Path) -> dict[str, str]:
    """Write the pairs, the bos-only tokenizer, the two models and our recipe under `root`; return their paths."""
    import torch
    from tokenizers import processors
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.data.preference import write_preference_dataset
    from tests.helpers import TINY_LLAMA

    root = Path(root)
    prefs = root / "prefs"
    write_preference_dataset(prefs, seed=0, n_train=PAIRS, n_eval=1)
    rows = [json.loads(line) for line in (prefs / "train.jsonl").read_text().splitlines()]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": " " + r["chosen"],
                                         "rejected": " " + r["rejected"]}) + "\n" for r in rows))

    tok = AutoTokenizer.from_pretrained(prefs / "tokenizer")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B:1", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(root / "tokenizer")

    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    for name, seed, extra in (("policy", 11, {}), ("reference", 12, {"hidden_size": 48, "intermediate_size": 96})):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**{**cfg, **extra}, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(root / name)

    s = SETTINGS
    recipe = {
        "trainer": "dpo", "output_dir": str(root / "run_distill"), "overwrite": True, "seed": s["seed"],
        "policy": {"from_pretrained": str(root / "policy"), "deepspeed": "zero2", "precision": "fp32",
                   "optimizer": {"lr": s["lr"], "betas": list(s["betas"]), "eps": s["eps"], "weight_decay": 0.0},
                   "scheduler": {"name": "constant", "warmup_steps": 0}},
        "reference": {"from_pretrained": str(root / "reference"), "deepspeed": "zero3", "precision": "fp32"},
        "dpo": {"loss": "sigmoid", "beta": s["beta"]},
        "data": {"train": str(pairs), "tokenizer": str(root / "tokenizer"), "max_length": s["max_length"]},
        "train": {"micro_batch_size": PAIRS, "grad_accum": 1, "max_steps": STEPS, "log_every": 1,
                  "grad_clip": s["grad_clip"], "progress": False},
        "launch": {"num_processes": 1},
    }
    (root / "recipe.yaml").write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    return {"pairs": str(pairs), "tokenizer": str(root / "tokenizer"), "policy": str(root / "policy"),
            "reference": str(root / "reference"), "recipe": str(root / "recipe.yaml"),
            "metrics": str(root / "run_distill" / "metrics.jsonl")}


def hand_loss(root: Path) -> float:
    """Step-1 DPO loss from the two saved models, one unpadded forward per sequence, in float64."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(root)
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    models = [AutoModelForCausalLM.from_pretrained(root / n).eval() for n in ("policy", "reference")]

    def logp(model, prompt: list[int], response: list[int]) -> float:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(lp[len(prompt) - 1:].sum())  # the positions that predict response tokens

    losses = []
    for line in (root / "pairs.jsonl").read_text().splitlines():
        r = json.loads(line)
        p = [tok.bos_token_id] + tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c, j = (tok(r[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for k in ("chosen", "rejected"))
        (pc, pr), (rc, rr) = ((logp(m, p, c), logp(m, p, j)) for m in models)
        losses.append(-F.logsigmoid(torch.tensor(SETTINGS["beta"] * ((pc - pr) - (rc - rr)), dtype=torch.float64)))
    return float(torch.stack(losses).mean())


def run_trl(root: Path) -> dict:
    """TRL's DPOTrainer on the prepared setup; writes and returns ROOT/trl.json."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from distill.data.preference import load_preference_dataset, tokenize_preferences

    root, s = Path(root), SETTINGS
    torch.set_num_threads(1)  # the models are tiny; threads only add start-up and jitter
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(root / "policy", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(root / "reference", dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(root / "run_trl"), report_to="none", use_cpu=True, bf16=False, fp16=False, seed=s["seed"],
        per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1, max_steps=STEPS, logging_steps=1,
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=s["betas"][0], adam_beta2=s["betas"][1], adam_epsilon=s["eps"], weight_decay=0.0,
        max_grad_norm=s["grad_clip"], beta=s["beta"], loss_type=["sigmoid"], max_length=s["max_length"],
        precompute_ref_log_probs=False, gradient_checkpointing=False, dataloader_drop_last=True,
        save_strategy="no", disable_tqdm=True)
    train = load_dataset("json", data_files=str(root / "pairs.jsonl"), split="train")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=train, processing_class=tok)
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    theirs = [[ex[c] for c in cols] for ex in trainer.train_dataset]
    ours_ds, _ = tokenize_preferences(load_preference_dataset(str(root / "pairs.jsonl")), tok, max_length=s["max_length"])
    ours = [[ex[c] for c in cols] for ex in ours_ds]
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    out = {"loss": [h["loss"] for h in steps], "grad_norm": [h["grad_norm"] for h in steps],
           "rewards/chosen": [h["rewards/chosen"] for h in steps], "trl_ids": theirs, "distill_ids": ours}
    (root / "trl.json").write_text(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("prepare", "trl"):
        sys.exit(__doc__)
    {"prepare": prepare, "trl": run_trl}[args[0]](Path(args[1]))


if __name__ == "__main__":
    main()
