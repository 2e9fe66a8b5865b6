"""Preference pairs sampled from a model and labelled by a ground-truth function, with label noise.

For each prompt the model samples `completions_per_prompt` completions; the truth scores each; the best and the worst
by the truth become `chosen` and `rejected` (empty completions left out; a prompt whose others all score the same
gives no pair). In the train split each pair is swapped with probability `label_noise` (the annotators' mistakes);
the eval split is never swapped, so a reward model's eval accuracy is its agreement with the truth. Records are what the reward trainer reads
(`{"prompt", "chosen", "rejected"}`) plus `truth_chosen`, `truth_rejected` and `flipped`, which it ignores.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import torch

from distill.data.synthetic import write_atomic
from distill.generation.generate import generate_completions
from distill.generation.sampling import SamplingSpec


def sample_completions(model, tokenizer, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float,
                       batch_size: int, seed: int) -> list[list[str]]:
    """`n` sampled completions (text, special tokens dropped) of each prompt, as the RL trainers prompt the model:
    bos, then the prompt's tokens, nothing after (`distill.data.prompts.tokenize_prompts`)."""
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spec = SamplingSpec(max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=(tokenizer.eos_token_id,),
                        pad_token_id=pad)
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [([bos] if bos is not None else []) + tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(len(i) for i in ids)
        device = next(model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)  # [B, P], left-padded
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)  # [B, P]
        done = generate_completions(model, input_ids, mask, spec, seed=seed + start, num_generations=n,
                                    expected_rows=batch_size * n)  # tokens [B * n, C], pad after each eos
        texts = tokenizer.batch_decode(done.tokens, skip_special_tokens=True)
        out += [texts[i * n:(i + 1) * n] for i in range(len(chunk))]
    return out


def label_pairs(records: list[dict], completions: list[list[str]], truth: Callable[..., list], *, label_noise: float,
                rng: random.Random) -> tuple[list[dict], dict[str, Any]]:
    """Pairs from each prompt's best and worst completion by `truth` (a reward function), swapped with probability
    `label_noise`; and statistics: the truth's mean over every completion (the sampling model's score), the pairs
    made, the prompts skipped for ties (or fewer than two non-empty completions), the share swapped."""
    flat_prompts = [r["prompt"] for r, group in zip(records, completions) for _ in group]
    columns = {k: [r[k] for r, group in zip(records, completions) for _ in group] for k in records[0] if k != "prompt"}
    flat = [c for group in completions for c in group]
    scores = truth(prompts=flat_prompts, completions=flat, completion_ids=[[] for _ in flat], **columns)
    pairs, ties, at = [], 0, 0
    for record, group in zip(records, completions):
        s = [float(x) for x in scores[at:at + len(group)]]
        at += len(group)
        kept = [i for i, c in enumerate(group) if c.strip()]  # an empty response (eos first) is no preference record
        best, worst = max(kept, key=s.__getitem__, default=0), min(kept, key=s.__getitem__, default=0)
        if s[best] == s[worst]:
            ties += 1
            continue
        flipped = rng.random() < label_noise
        chosen, rejected = (worst, best) if flipped else (best, worst)
        pairs.append({"prompt": record["prompt"], "chosen": group[chosen], "rejected": group[rejected],
                      "truth_chosen": s[chosen], "truth_rejected": s[rejected], "flipped": flipped})
    stats = {"pairs": len(pairs), "prompts": len(records), "ties_skipped": ties,
             "flipped": sum(p["flipped"] for p in pairs) / max(len(pairs), 1),
             "truth_mean": sum(float(x) for x in scores) / max(len(scores), 1)}
    return pairs, stats


def write_pairs(out_dir: Path, *, model_dir: str, prompts_dir: Path, truth: Callable[..., list], n_train: int,
                n_eval: int, completions_per_prompt: int, max_completion_length: int, temperature: float,
                label_noise: float, batch_size: int, seed: int) -> dict[str, Any]:
    """Write `train.jsonl` and `eval.jsonl` pairs from the first `n_train` / `n_eval` prompts of `prompts_dir`'s
    splits, then `meta.json` (last: its presence marks the directory complete). Samples on the GPU when one is
    visible. Returns the meta."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"model": str(model_dir), "label_noise": label_noise, "seed": seed}
    for split, n, noise in (("train", n_train, label_noise), ("eval", n_eval, 0.0)):
        lines = (prompts_dir / f"{split}.jsonl").read_text().splitlines()[:n]
        records = [json.loads(line) for line in lines if line.strip()]
        groups = sample_completions(model, tokenizer, [r["prompt"] for r in records], n=completions_per_prompt,
                                    max_new_tokens=max_completion_length, temperature=temperature,
                                    batch_size=batch_size, seed=seed + (split == "eval"))
        pairs, stats = label_pairs(records, groups, truth, label_noise=noise, rng=random.Random(f"{seed}-{split}"))
        if not pairs:
            raise ValueError(f"no {split} pair: every prompt's {completions_per_prompt} completions scored the same by "
                               "the truth; raise pairs.completions_per_prompt or pairs.temperature")
        write_atomic(out_dir / f"{split}.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
        meta[split] = stats
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training stages that follow start their own processes on this GPU
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
