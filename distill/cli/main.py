"""`distill train RECIPE.yaml [key=value ...]` (the console script) and `python -m distill ...`."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "distill.train", "export": "distill.export", "report": "distill.report", "recipes": "distill.cli.recipes",
            "teacher_cache": "distill.teacher_cache.__main__"}
"""Each command's module as `python -m` names it (the shims over distill/cli/), whose `main(argv)` runs it."""
USAGE = """usage: distill {train,export,report,recipes,teacher_cache} ...

  distill train RECIPE.yaml [key.sub=value ...] [--resume] [--dry-run]   train (a file, or a shipped recipe's name)
  distill recipes [copy NAME [DEST]]                                     the shipped recipes; copy one out to edit
  distill export RUN_DIR OUT_DIR [--step N]                              a checkpoint's roles as plain HF models
  distill report RUN_DIR                                                 plots and a summary of a run's metrics
  distill teacher_cache RECIPE.yaml [key.sub=value ...] [--verify DIR]   write a recipe's teacher cache (offline KD)"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        asked = argv[:1] in (["-h"], ["--help"])
        print(USAGE, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
