"""`distill.run`: train from a recipe in one Python call, as `python -m distill.train` does from the shell.

The recipe may be a file, a shipped recipe's name or a mapping, with Python objects where the recipe takes them
(a trainer class, a `datasets.Dataset`, reward functions). A plain process that asks for several processes
(`launch.num_processes`) starts them as the command line does, through accelerate's launcher, and waits; they
read the recipe from a file, so objects are passed by the name another process imports them by, and an object
that has none (a Dataset, a function of `__main__`) is refused with the key that holds it. Under a launcher
(`accelerate launch your_script.py`), every process calls `run` and trains its share: objects are fine there.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import datasets
import yaml

from distill.config.errors import RecipeError
from distill.loop.preflight import preflight
from distill.loop.rundir import release_run_dir
from distill.rl.rewards import importable
from distill.runtime.launch import place_processes, relaunch, started_plain
from distill.runtime.roles import forget_roles
from distill.trainers import load_recipe


def run(recipe: str | os.PathLike | Mapping[str, Any], *overrides: str, log: Callable[[str], None] = print,
        **keys) -> dict[str, Any]:
    """Train from a recipe; returns the run's history: `before` and `after`, the eval metrics before the first step
    and after the last (when the recipe has eval data). The run directory (`output_dir`) holds the rest: metrics,
    checkpoints, `final/<role>/` in HF format.

    `recipe`: a recipe file, a shipped recipe's name (`quickstart`) or the recipe's keys as a mapping; `keys`:
    top-level keys merged over it (`train={"max_steps": 10}`, `trainer=MyTrainer`); `overrides`: dotted strings as on
    the command line (`"train.max_steps=10"`). See `distill.load_recipe`. Raises RecipeError, before any
    model loads, for a recipe that cannot run."""
    recipe, trainer_cls = load_recipe(recipe, *overrides, **keys)
    if recipe.launch.num_processes > 1 and started_plain():
        # Too few GPUs for `launch.device: cuda` is refused here; the ranks hide the GPUs themselves when on the CPU.
        place_processes(recipe.launch.device, recipe.launch.num_processes, apply=False)
        return _launched(recipe, trainer_cls)
    if started_plain():
        place_processes(recipe.launch.device, 1)
    trainer = trainer_cls(recipe, log=log)
    try:
        return trainer.train()
    finally:
        forget_roles()  # the process group stays: another run may follow in this process


def _launched(recipe, trainer_cls) -> dict[str, Any]:
    """`recipe` in `launch.num_processes` processes started here; every check first, once, in this process."""
    if recipe.trainer.startswith("__main__:"):
        raise RecipeError(f"`trainer`: {recipe.trainer.partition(':')[2]} is defined in __main__, which the {_ranks} "
                          f"cannot import: move it into a module, or {_under_a_launcher}")
    text = yaml.safe_dump(portable(recipe.model_dump()), sort_keys=False)
    n, out = recipe.launch.num_processes, Path(recipe.output_dir)
    preflight(recipe, trainer_cls, world_size=n)  # and the run directory's lock, which the ranks inherit
    fd, path = tempfile.mkstemp(prefix="distill-recipe-", suffix=".yaml")
    saved = os.environ.get("PYTHONPATH")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # The ranks import what this process imports (a trainer or reward module beside a script, say).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, saved or ""] if p and os.path.isdir(p))
        code = relaunch(n, "distill.train", [path])
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        os.unlink(path)
        release_run_dir(out)
    if code != 0:
        raise RuntimeError(f"the run in {n} processes failed (exit status {code}); the ranks' messages are above")
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def portable(values: Any, key: str = "") -> Any:
    """A recipe's values (`model_dump()`) as another process reads them from YAML: callables by their import name;
    RecipeError naming the key of an object that has none."""
    if isinstance(values, dict):
        return {k: portable(v, f"{key}.{k}" if key else k) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return [portable(v, f"{key}[{i}]") for i, v in enumerate(values)]
    if isinstance(values, (datasets.Dataset, datasets.DatasetDict)):
        raise RecipeError(f"`{key}` is a {type(values).__name__}, which the {_ranks} cannot read: save it "
                          f"(`.save_to_disk(DIR)`) and give DIR, or {_under_a_launcher}")
    if callable(values):
        name = importable(values)
        if name is None:
            raise RecipeError(f"`{key}`: {values!r} cannot be imported by name (a lambda, a closure, or defined in "
                              f"__main__), so the {_ranks} cannot call it: move it into a module, or {_under_a_launcher}")
        return name
    return values


_ranks = "processes that `launch.num_processes` starts"
_under_a_launcher = ("start your script in that many processes yourself (`accelerate launch --num_processes N "
                     "your_script.py`: each calls `distill.run`), or set `launch.num_processes: 1`")
