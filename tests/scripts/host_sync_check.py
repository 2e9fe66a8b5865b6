"""Run on 2 processes: one training step of distill's code brings tensors to the host once.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.host_sync_check ROOT OUT_PREFIX

Counts every way a tensor reaches Python (item, tolist, float, int, bool) called from distill's own files during
one step (after a first step that builds DeepSpeed's buffers); writes OUT_PREFIX.rank<N>.json on each rank.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import distill
from distill.config.recipe import validate_recipe
from distill.trainers.distill import DistillTrainer
from tests.helpers import end_of_script, tiny_assets, tiny_recipe

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__")


def main(argv: list[str] | None = None) -> None:
    args = argv or sys.argv[1:]
    root, prefix = Path(args[0]), args[1]
    raw = tiny_recipe(tiny_assets(root), root / "run_sync", train={"grad_accum": 2, "progress": False, "log_every": 1})
    trainer = DistillTrainer(validate_recipe(raw, DistillTrainer), log=lambda s: None)
    batches = trainer.data.train_batches()
    trainer.train_step(1, next(batches))
    syncs: list[str] = []
    ours = str(Path(distill.__file__).parent)
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counted(name):
        def wrapper(self, *a, **k):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(ours):
                syncs.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return originals[name](self, *a, **k)
        return wrapper

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counted(name))
    try:
        out = trainer.train_step(2, next(batches))
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    trainer.close()
    Path(f"{prefix}.rank{trainer.rank}.json").write_text(json.dumps({"syncs": syncs, "step": {
        k: v for k, v in out.items() if k != "losses"}, "losses": out["losses"], "world_size": trainer.world_size}))
    end_of_script()


if __name__ == "__main__":
    main()
