"""Speed of RLOO: distill's GRPOTrainer with TRL's RLOO keys against TRL's RLOOTrainer (transformers generation, no
vLLM), each side in its own `accelerate launch` (prints a markdown table, writes JSON):

    python benchmarks/rloo.py --out rloo_vs_trl.json                  # one GPU: random-init Llama ~0.3B, bf16
    python benchmarks/rloo.py --num-processes 2 --out rloo_vs_trl.json
    python benchmarks/rloo.py --tiny --device cpu                     # CPU smoke test

Same for both sides: the policy and the reference loaded from one random-init Llama, and the prompts of the pairs,
both written by benchmarks/dpo.py (`prepare`: a word-level tokenizer, every prompt bos + --prompt-len words);
--num-generations completions of each prompt, up to --completion-len tokens, temperature 1; --prompts prompts per
rank and step, all of a step's completions in one micro-batch and one optimizer step per generation; one reward
function (`reward_length`, the completion's characters / 1000: cheap, so the step is the models' work); beta 0.05
with the KL in the reward; AdamW with a constant lr, clipping 1.0, ZeRO-2 for the policy, bf16. distill's keys are
TRL's RLOO (docs/grpo-trainer.md): `advantage: rloo`, `importance_sampling_level: sequence_sum`, `loss_type: grpo`,
`kl_penalty: reward`, `scale_rewards: none` (TRL's `normalize_advantages: false`). What differs is each framework's
own code: distill decodes with its engine (`grpo.decode: auto`: compiled and CUDA graphs on a GPU), places the
reference by its planner, and runs its loop; TRL calls `model.generate`.

Timing: the wall clock between the end of step --warmup and the end of the last step (distill: its per-step metrics;
TRL: a callback that syncs the device). Both sides log the mean completion length; a random-init model seldom samples
eos, so both generate about --completion-len tokens a completion. tokens/s here is generated tokens: completions per
step (all ranks) x the side's mean completion length / step time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo  # noqa: E402  (benchmarks/dpo.py: inputs, launch, timing helpers)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["both", "distill", "trl"], default="both")
    p.add_argument("--num-processes", type=int, default=1, help="processes per side (driver only)")
    p.add_argument("--sides", nargs="+", choices=["distill", "trl"], default=["distill", "trl"])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short sequences (smoke test)")
    p.add_argument("--prompt-len", type=int, default=63, help="words of each prompt (after bos)")
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts per rank and step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for distill's side")
    p.add_argument("--workdir", default=str(dpo.REPO / "runs" / "bench_rloo"))
    p.add_argument("--out", default=None)
    p.add_argument("--result", default=None)
    a = p.parse_args(argv)
    # dpo.prepare's model and pairs: the prompt is seq_len // 2 - 1 words; one pair per prompt of a step
    model = dpo.parse_args(["--tiny"] if a.tiny else [])  # dpo.py's model sizes
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
        setattr(a, key, getattr(model, key))
    if a.tiny:
        a.prompt_len, a.completion_len, a.num_generations, a.prompts = 7, 16, 4, 2
        a.warmup, a.steps = 1, 2
    a.seq_len, a.micro_batch, a.grad_accum = 2 * (a.prompt_len + 1), a.prompts, 1
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.policy_zero, a.title = 2, "RLOO"
    return a


def reward_length(prompts, completions, **kwargs) -> list[float]:
    return [len(str(c)) / 1000 for c in completions]


def run_distill(a, d: Path, world: int) -> tuple[list[float], list[float]]:
    """(per-step wall clock at step end, per-step mean completion length) of distill's GRPOTrainer as RLOO."""
    from distill.trainers.grpo import GRPOTrainer

    return dpo.train_distill(GRPOTrainer, a, d / "run_distill_rloo", world, {
        "policy": {**dpo.trained_role(a, d), "deepspeed": "zero2"},
        "reference": {"from_pretrained": str(d / "model"), "precision": a.dtype},
        "grpo": {"num_generations": a.num_generations, "max_completion_length": a.completion_len, "temperature": 1.0,
                 "beta": 0.05, "kl_penalty": "reward", "advantage": "rloo", "scale_rewards": "none",
                 "importance_sampling_level": "sequence_sum", "loss_type": "grpo", "reward_funcs": [reward_length]},
        "data": {"train": str(d / "pairs.jsonl"), "eval": None, "tokenizer": str(d / "tokenizer"),
                 "max_length": a.prompt_len + 1 + a.completion_len},
        "train": {"micro_batch_size": a.prompts * a.num_generations, "grad_accum": 1},
    }, key="completions/mean_length")


def run_trl(a, d: Path, world: int) -> tuple[list[float], list[float]]:
    """(per-step wall clock at step end, per-step mean completion length) of TRL's RLOOTrainer."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    cuda = a.device == "cuda"
    args = RLOOConfig(**dpo.trl_arguments(a, d / "run_trl_rloo", a.prompts * a.num_generations, 1),
                      num_generations=a.num_generations, max_completion_length=a.completion_len, temperature=1.0, beta=0.05,
                      normalize_advantages=False, use_vllm=False,
                      model_init_kwargs={"dtype": torch.bfloat16 if a.dtype == "bf16" else torch.float32})
    ds = load_dataset("json", data_files=str(d / "pairs.jsonl"), split="train").select_columns(["prompt"])
    clock: list[float] = []
    trainer = RLOOTrainer(model=str(d / "model"), reward_funcs=reward_length, args=args, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(d / "tokenizer", padding_side="left"),
                          callbacks=[dpo.step_clock(clock, cuda)])
    assert trainer.is_deepspeed_enabled, "TRL's trainer is not running under DeepSpeed"
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return clock, lengths


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    d = dpo.prepare(a, world)
    cuda = a.device == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    clock, lengths = (run_distill if a.impl == "distill" else run_trl)(a, d, world)
    peak = dpo.peak_memory_gib() if cuda else None
    if rank == 0:
        seconds = clock[-1] - clock[a.warmup - 1]
        completions = a.prompts * a.num_generations * world
        length = sum(lengths[a.warmup:]) / len(lengths[a.warmup:])
        result = {"impl": a.impl, "world_size": world, "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "dtype": a.dtype, "params_m": dpo._params_m(d), "prompt_len": a.prompt_len + 1,
                  "completion_len": a.completion_len, "completions_per_step": completions, "warmup_steps": a.warmup,
                  "timed_steps": a.steps, "timed_s": seconds, "step_s": seconds / a.steps, "mean_completion_len": length,
                  "generated_tokens_per_s": completions * length * a.steps / seconds, "peak_mem_gib": peak,
                  "versions": dpo._versions()}
        Path(a.result or d / f"result_rloo_{a.impl}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def table(results: list[dict], title: str) -> str:
    r0 = results[0]
    head = (f"{title}, {r0['params_m']}M-param Llama (policy and reference), {r0['dtype']}, prompts of {r0['prompt_len']} "
            f"tokens, {r0['completions_per_step']} completions of up to {r0['completion_len']} tokens a step, "
            f"{r0['world_size']} x {r0['device']}, {r0['timed_steps']} steps timed after {r0['warmup_steps']}\n\n")
    rows = ["| impl | step (s) | generated tokens/s | mean completion length | peak alloc (GiB) |", "|---|---:|---:|---:|---:|"]
    for r in results:
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        rows.append(f"| {r['impl']} | {r['step_s']:.3f} | {r['generated_tokens_per_s']:.0f} | {r['mean_completion_len']:.1f} | {peak} |")
    by = {r["impl"]: r for r in results}
    if {"distill", "trl"} <= set(by):
        rows.append(f"\ntrl / distill step time: {by['trl']['step_s'] / by['distill']['step_s']:.2f}x")
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    sys.path.insert(0, str(dpo.REPO))
    if a.impl == "both":
        dpo.driver(a, argv, Path(__file__).resolve(), table)
    else:
        worker(a)


if __name__ == "__main__":
    main()
