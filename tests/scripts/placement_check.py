"""Run on 2 processes: the tiny teacher with a given placement; its logits, eval numbers and leaf modules.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.placement_check ASSETS_DIR OUT_PT PLACEMENT [key=value ...]

The test runs it once per placement and compares: a replicated teacher must give what the sharded one gives.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as init_cls
    from deepspeed.utils import get_z3_leaf_modules

    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.trainers.distill import DistillTrainer
    from tests.helpers import end_of_script, tiny_assets, tiny_recipe

    args = argv or sys.argv[1:]
    (root, out, placement), overrides = args[:3], args[3:]
    root, out = Path(root), Path(out)
    assets = tiny_assets(root)
    raw = tiny_recipe(assets, out.parent / f"run_{out.stem}", teacher={"placement": placement},
                      train={"max_steps": 2, "eval_batches": 3})
    t = DistillTrainer(validate_recipe(deep_merge(raw, parse_overrides(overrides)), DistillTrainer))
    teacher = t.teacher.module
    layers = [m for m in teacher.modules() if type(m).__name__ in teacher._no_split_modules]
    torch.manual_seed(0)
    ids = torch.randint(0, len(t.tokenizer), (3, 17))
    with torch.no_grad():
        logits = t.teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # [3, 17, V]
    threads: set[str] = set()  # where the teacher's forwards ran in training (train.overlap_frozen)
    teacher.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    history = t.train()  # two steps with this teacher, evaluated before and after
    if t.accelerator.is_main_process:
        torch.save({"stage": t.teacher.plan.zero_stage, "placement": t.teacher.plan.placement,
                    "leaves": len(get_z3_leaf_modules(teacher)), "layers": len(layers), "logits": logits,
                    "before": history["before"], "after": history["after"], "threads": sorted(threads),
                    # zero.Init swaps torch.nn.functional.linear process-wide; RoleManager puts torch's back
                    "linear_swapped": hasattr(init_cls, "linear_bk"),
                    "torch_linear": torch.nn.functional.linear is getattr(init_cls, "linear_bk", torch.nn.functional.linear)}, out)
    end_of_script()


if __name__ == "__main__":
    main()
