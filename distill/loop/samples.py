"""Generation samples at each evaluation: the (first) trainable causal LM continues a few eval prompts greedily.

What a loss curve does not show: whether the model writes sensible text and stops. At every evaluation
(before the first step, every `train.eval_every` steps, after the last) the trainable role continues the
first `train.eval_samples` eval prompts greedily, at most `train.eval_sample_tokens` tokens each; the
main process prints them, appends them to `<output_dir>/samples.jsonl` and hands them to the trackers
as text, and `distill.report` lists them by step.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.data.loading import pad_id

SAMPLES_FILE = "samples.jsonl"


def sample_prompts(dataset, n: int, *, max_prompt: int = 16) -> list[list[int]]:
    """Token ids of the prompts of the first `n` examples of a tokenized dataset: `prompt_ids` of prompt and
    preference records; for text, the start of the (first) document: half of it, at most `max_prompt` tokens."""
    out = []
    for i in range(min(n, len(dataset))):
        ex = dataset[i]
        if "prompt_ids" in ex:
            out.append(list(ex["prompt_ids"]))
            continue
        ids = list(ex["input_ids"])
        if "position_ids" in ex:  # a packed row: its first document
            pos = list(ex["position_ids"])
            ids = ids[:next((j for j in range(1, len(pos)) if pos[j] == 0), len(pos))]
        out.append(ids[:max(1, min(max_prompt, len(ids) // 2))])
    return [p for p in out if p]


@torch.no_grad()
def generate_samples(role, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                     device: torch.device) -> list[dict]:
    """Greedy continuations of `prompts` by `role` (a RoleModel): `{"prompt", "completion", "eos"}` per prompt,
    the completion cut before its first eos. Collective under ZeRO-3: every rank calls it with the same prompts."""
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, P], left-padded
    mask = torch.zeros_like(ids)  # [B, P]
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    out = role.generate(ids.to(device), mask.to(device), gather=False, max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=pad, eos_token_id=eos, use_cache=True)  # [B, N]
    rows = []
    for prompt, completion in zip(prompts, out.tolist()):
        ended = eos in completion
        completion = completion[:completion.index(eos)] if ended else completion
        rows.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                     "completion": tokenizer.decode(completion, skip_special_tokens=False), "eos": ended})
    return rows


def log_samples(trainer, step: int) -> None:
    """`RoleTrainer.log_samples`: the samples of one evaluation, from every rank (collective), written by the main one."""
    t = trainer.recipe.train
    prompts = sample_prompts(trainer.data.eval, t.eval_samples) if t.eval_samples and trainer.data.eval is not None else []
    if not prompts:
        return
    limits = [trainer.recipe.data.max_length] + [getattr(p.model_config, "max_position_embeddings", None) or 1 << 30
                                                for p in trainer.plans.values()]
    new_tokens = min(t.eval_sample_tokens, min(limits) - max(len(p) for p in prompts))
    if new_tokens < 1:
        return
    writer = next((m for m in trainer.trainables.values() if m.plan.spec.model_class == "causal_lm"), None)
    if writer is None:  # e.g. a trainer that trains a reward model alone
        return
    rows = generate_samples(writer, trainer.tokenizer, prompts, max_new_tokens=new_tokens, device=trainer.device)
    if trainer.accelerator.is_main_process:
        write_samples(trainer.out, step, rows)
        trainer.log(format_samples(step, rows))
        if trainer.accelerator.trackers:
            trainer.accelerator.log({"samples": format_samples(step, rows)}, step=step)


def write_samples(run_dir: Path, step: int, rows: list[dict]) -> None:
    """Append one evaluation's samples to `run_dir/samples.jsonl`, one line each."""
    with open(Path(run_dir) / SAMPLES_FILE, "a") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"step": step, "index": i, **row}) + "\n")


def format_samples(step: int, rows: list[dict]) -> str:
    """The samples as log lines: `samples at step N:` then `[i] prompt -> completion` (`<eos>` where it stopped)."""
    lines = [f"samples at step {step} (greedy):"]
    for i, row in enumerate(rows):
        lines.append(f"  [{i}] {row['prompt']!r} -> {row['completion']!r}{' <eos>' if row['eos'] else ''}")
    return "\n".join(lines)


def read_samples(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
