"""Run on 2 processes: a NaN loss on one rank skips that step on every rank; K in a row stop the run.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.nan_check ROOT OUT_JSON BAD_STEPS [key=value ...]

BAD_STEPS: comma-separated steps at which rank 1's loss becomes NaN.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole copies of the parameters, gathered from their ZeRO-3 shards where they are sharded (collective)."""
    import deepspeed

    params = list(module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def main(argv: list[str] | None = None) -> None:
    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.loop.monitor import NonFiniteLoss
    from distill.trainers.distill import DistillTrainer
    from tests.helpers import end_of_script, tiny_assets, tiny_recipe

    args = argv or sys.argv[1:]
    root, out_json, bad = Path(args[0]), Path(args[1]), {int(s) for s in args[2].split(",")}
    assets = tiny_assets(root)
    raw = deep_merge(tiny_recipe(assets, root / "run_nan", overwrite=True), parse_overrides(args[3:]))
    raw["data"]["eval"] = None
    recipe = validate_recipe(raw, DistillTrainer)
    weights: list[dict] = []

    class Probe(DistillTrainer):
        step = 0

        def train_step(self, step, micro_batches, **kw):
            self.step = step
            out = super().train_step(step, micro_batches, **kw)
            weights.append(snapshot(self.student.module))
            return out

        def loss_step(self, batch, num_tokens):
            losses = super().loss_step(batch, num_tokens)
            if self.step in bad and self.rank == 1:
                losses["loss"] = losses["loss"] * float("nan")
            return losses

    t = Probe(recipe)
    before = snapshot(t.student.module)
    stopped = None
    try:
        t.train()
    except NonFiniteLoss as e:
        stopped = str(e)
    states = [before] + weights  # states[k]: the weights after step k
    same = [all(torch.equal(states[k][n], states[k - 1][n]) for n in before) for k in range(1, len(states))]
    finite = all(torch.isfinite(v).all() for v in states[-1].values())
    if t.accelerator.is_main_process:
        out_json.write_text(json.dumps({"unchanged_at_step": same, "finite": bool(finite), "stopped": stopped,
                                        "steps_run": len(weights)}))
    end_of_script()


if __name__ == "__main__":
    main()
