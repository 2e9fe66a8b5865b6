"""Experiment trackers (TensorBoard, Weights & Biases) through accelerate's own tracker API.

distill writes no logging code of its own here: `train.report_to` chooses accelerate trackers, the
primary Accelerator is built with them (`RoleManager(log_with=...)`), and the trainer hands every
numeric metric line it writes to metrics.jsonl to `Accelerator.log` with the same step.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from distill.config.errors import RecipeError

PROJECT = "distill"
"""The accelerate project name: the wandb project, and the TensorBoard subdirectory of the logging dir."""
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def resolve(report_to: str | list[str]) -> list[str]:
    """The trackers a run starts: `auto` is TensorBoard when its package is importable, else none."""
    if report_to == "auto":
        return ["tensorboard"] if installed("tensorboard") else []
    if report_to == "none":
        return []
    return list(dict.fromkeys([report_to] if isinstance(report_to, str) else report_to))


def check_installed(report_to: str | list[str]) -> None:
    """Preflight: every tracker asked for by name can be imported (raise RecipeError naming the fix)."""
    for name in resolve(report_to):
        if not installed(_PACKAGE[name]):
            raise RecipeError(f"`train.report_to`: {name} is requested but the `{_PACKAGE[name]}` package is not "
                              f"installed; `pip install {_PACKAGE[name]}`, or set `train.report_to: none`")


def installed(package: str) -> bool:
    """Whether `package` can be imported here (`report_to: auto` follows tensorboard's)."""
    return importlib.util.find_spec(package) is not None


def logging_dir(output_dir: str | Path) -> Path:
    """Where local trackers write: TensorBoard events land in <output_dir>/tensorboard/distill/."""
    return Path(output_dir) / "tensorboard"


def flat_config(values: dict, prefix: str = "") -> dict[str, Any]:
    """A nested recipe dump as one level of dotted keys with scalar values (what TensorBoard's
    hparams accept); lists become their JSON text."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def numeric(metrics: dict) -> dict[str, float]:
    """The entries of a metric line a tracker can plot: finite numbers other than `step` (no text,
    no booleans, no None)."""
    return {k: v for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def start(accelerator, recipe, resumed_at: int | None = None) -> None:
    """Open the trackers of the primary Accelerator with the flattened recipe as their config.

    A resumed run opens them again on the same directories: TensorBoard adds an event file next to
    the earlier ones, and hides their events after `resumed_at` (logged again now); wandb starts a
    new run of the same name."""
    if not accelerator.log_with:
        return
    out = Path(recipe.output_dir)
    board = {"purge_step": resumed_at + 1} if resumed_at is not None else {}
    accelerator.init_trackers(PROJECT, config=flat_config(recipe.model_dump(mode="json")),
                              init_kwargs={"wandb": {"dir": str(out), "name": out.name}, "tensorboard": board})


def finish(accelerator) -> None:
    """Close the trackers. `Accelerator.end_training` would do this too but also destroys the process
    group, which belongs to the caller of `train()` (a script may evaluate or save afterwards)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
