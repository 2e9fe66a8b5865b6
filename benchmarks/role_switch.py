"""Microseconds per role switch: distill's `RoleManager.use` against accelerate's `select_deepspeed_plugin`.

    python benchmarks/role_switch.py [--reps 20000]

Builds the plugins only (no model is needed to switch), then times entering and leaving a role,
i.e. two plugin changes, with each method.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=20000)
    args = p.parse_args()
    from transformers import LlamaConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    from distill.config.deepspeed import role_ds_config
    from distill.config.schema import Role
    from distill.plan.planner import RolePlan
    from distill.runtime.roles import RoleManager

    def plan(name, trainable, stage):
        spec = Role(trainable=trainable, config={"model_type": "llama"}, deepspeed=stage)
        ds = role_ds_config(name, spec, micro_batch_size=1, grad_accum=1, world_size=1, grad_clip=1.0, hidden_size=4096)
        return RolePlan(name, spec, ds, LlamaConfig(), 0)

    m = RoleManager({"student": plan("student", True, 2), "teacher": plan("teacher", False, 3)})
    state = m.state

    t0 = time.perf_counter()
    for _ in range(args.reps):
        with m.use("teacher"):
            assert is_deepspeed_zero3_enabled()
    ours = (time.perf_counter() - t0) / (2 * args.reps) * 1e6

    reps = max(1, args.reps // 20)
    t0 = time.perf_counter()
    for _ in range(reps):
        state.select_deepspeed_plugin("teacher")
        state.select_deepspeed_plugin("student")
    theirs = (time.perf_counter() - t0) / (2 * reps) * 1e6
    print(json.dumps({"distill_use_us_per_switch": round(ours, 2), "accelerate_select_us_per_switch": round(theirs, 2),
                      "speedup": round(theirs / ours, 1)}))


if __name__ == "__main__":
    main()
