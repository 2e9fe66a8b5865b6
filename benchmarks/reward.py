"""Throughput and peak GPU memory of reward-model training: distill's RewardTrainer against TRL's RewardTrainer.

Both sides in turn, each in its own `accelerate launch` (prints a markdown table, writes JSON):

    python benchmarks/reward.py --num-processes 2 --out reward_bench.json       # random-init Llama ~0.3B + score head, bf16
    python benchmarks/reward.py --tiny --device cpu --num-processes 1            # CPU smoke test

The inputs, options, timing and table are benchmarks/dpo.py's (its docstring says how each is made and timed): the
same random-init Llama saved once, here loaded by each side as a sequence classifier with one output (the score head
initialised from --seed), the same pairs of exactly --seq-len tokens, micro-batch, accumulation, constant-lr AdamW,
gradient clipping 1.0, bf16 weights with fp32 master weights under DeepSpeed ZeRO-2, sdpa attention. Both sides use
the Bradley-Terry loss without margin or centering. tokens/s counts both sequences of every pair. What differs is
each framework's own code: the collator, the loop, the per-step metrics, ZeRO-2's buckets (dpo.py's docstring).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dpo  # noqa: E402  (benchmarks/dpo.py: inputs, driver, timing, table)


def run_distill(a, d: Path, world: int) -> tuple[list[float], list[float]]:
    """(per-step wall clock at step end, per-step loss) of distill's RewardTrainer."""
    from distill.trainers.reward import RewardTrainer

    return dpo.train_distill(RewardTrainer, a, d / "run_distill_reward", world, {
        "reward": {**dpo.trained_role(a, d), "model_class": "sequence_classification", "deepspeed": f"zero{a.policy_zero}",
                   "gradient_checkpointing": a.gradient_checkpointing, "compile": False},
        "rm": {"loss": "bradley_terry"},
        "data": {"train": str(d / "pairs.jsonl"), "tokenizer": str(d / "tokenizer"), "max_length": a.seq_len},
        "train": {"micro_batch_size": a.micro_batch, "grad_accum": a.grad_accum},
    })


def run_trl(a, d: Path, world: int) -> tuple[list[float], list[float]]:
    """(per-step wall clock at step end, per-step loss) of TRL's RewardTrainer."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    cuda = a.device == "cuda"
    args = RewardConfig(**dpo.trl_arguments(a, d / "run_trl_reward", a.micro_batch, a.grad_accum), max_length=a.seq_len,
                        center_rewards_coefficient=None, gradient_checkpointing=a.gradient_checkpointing,
                        dataloader_drop_last=True)
    torch.manual_seed(a.seed)  # the score head's init
    model = AutoModelForSequenceClassification.from_pretrained(
        d / "model", num_labels=1, dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    clock: list[float] = []
    trainer = RewardTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(d / "tokenizer"),
                            train_dataset=load_dataset("json", data_files=str(d / "pairs.jsonl"), split="train"),
                            callbacks=[dpo.step_clock(clock, cuda)])
    assert trainer.is_deepspeed_enabled, "TRL's trainer is not running under DeepSpeed"
    trainer.train()
    return clock, [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]


if __name__ == "__main__":
    dpo.main(title="Reward model", sides={"distill": run_distill, "trl": run_trl}, script=__file__)
