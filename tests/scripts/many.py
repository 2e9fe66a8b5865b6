"""Run one test script's `main()` for several scenarios in the same processes: a launch's imports and process
group start once, not once per scenario.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.many tests.scripts.lora_check \
        :: ARGS OF SCENARIO 1 :: ARGS OF SCENARIO 2 ...

Between scenarios every rank waits for the others and the last trainer's Accelerator state is dropped
(`distill.runtime.roles.forget_roles`), as when benchmarks compare modes in one launch.
"""
from __future__ import annotations

import importlib
import sys

import torch.distributed as dist

import tests.helpers as helpers
from distill.runtime.roles import forget_roles

SEPARATOR = "::"


def scenarios(argv: list[str]) -> list[list[str]]:
    """`:: a b :: c` -> [[a, b], [c]]."""
    if not argv or argv[0] != SEPARATOR:
        raise SystemExit(f"usage: many MODULE {SEPARATOR} ARGS [{SEPARATOR} ARGS ...]")
    groups: list[list[str]] = []
    for arg in argv:
        if arg == SEPARATOR:
            groups.append([])
        else:
            groups[-1].append(arg)
    return groups


def _between() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    forget_roles()


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    script = importlib.import_module(argv[0])
    end = helpers.end_of_script
    helpers.end_of_script = _between  # the scripts import it when main() runs
    try:
        for args in scenarios(argv[1:]):
            script.main(args)
    finally:
        helpers.end_of_script = end
    end()


if __name__ == "__main__":
    main()
