"""Start a test script on N CPU processes the way a plain `python -m distill.train` starts its ranks
(`distill.runtime.launch.relaunch`: accelerate's launcher, `--use_deepspeed`, the ranks forked from this process
once it has imported what they import).

    python -m tests.scripts.launch N MODULE [ARGS ...]
"""
from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    n, module, *args = argv if argv is not None else sys.argv[1:]
    from distill.runtime.launch import relaunch
    from tests.forkserver import import_stack

    import_stack()  # what every rank imports, once here

    if module == "tests.scripts.many":  # the script it runs (the module itself each rank runs as __main__)
        importlib.import_module(args[0])
    return relaunch(int(n), module, args)


if __name__ == "__main__":
    sys.exit(main())
