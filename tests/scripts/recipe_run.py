"""Run on 2 processes: a recipe file trained by `distill.run` in every rank, as a user's script under a launcher does.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.recipe_run ROOT OUT_JSON RECIPE.yaml [key=value ...]

Rank 0 writes the run's history (`before`/`after`) to OUT_JSON. Through tests/scripts/many.py several recipes train
in one launch, one after another (tests.helpers.launch_scenarios): for tests that compare whole runs with each
other, where only the runs' results are checked and one launch's start serves them all.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import distill
    from distill.runtime.launch import world_info
    from tests.helpers import end_of_script

    args = argv or sys.argv[1:]
    out_json, recipe, overrides = Path(args[1]), args[2], args[3:]
    history = distill.run(recipe, *overrides, log=lambda *a: None)
    if world_info()[0] == 0:
        out_json.write_text(json.dumps(history, default=str))
    end_of_script()


if __name__ == "__main__":
    main()
