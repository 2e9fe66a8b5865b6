"""What the package ships for runs to use: DeepSpeed presets, recipes and the tiny teacher.

Read through `importlib.resources`, so they are found the same way from a wheel, an editable install
or a checkout. A recipe names a shipped file with the `distill:` prefix (`from_pretrained:
distill:assets/teacher`), so a recipe copied out of the package (`distill recipes copy NAME`) runs
from any directory.
"""
from __future__ import annotations

import copy
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

from distill.config.errors import RecipeError

PREFIX = "distill:"
"""Marks a path inside the installed package in a recipe value."""


def package_path(relative: str) -> Path:
    """A file or directory the package ships, as a filesystem path."""
    return Path(str(files("distill").joinpath(relative)))


def resolve_shipped(value: str) -> str:
    """`distill:assets/teacher` -> the absolute path of that directory in the installed package; other values as given."""
    if not value.startswith(PREFIX):
        return value
    path = package_path(value[len(PREFIX):])
    if not path.exists():
        raise RecipeError(f"`{value}`: the package ships no such file; shipped: distill:assets/teacher, "
                          "distill:recipes/<name>.yaml, distill:configs/deepspeed/<name>.json")
    return str(path)


def deepspeed_presets() -> dict[str, Path]:
    """Shipped DeepSpeed configs by name (`zero2`, `zero3`, `zero3_offload`)."""
    return {p.stem: p for p in sorted(package_path("configs/deepspeed").glob("*.json"))}


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipes by name (`quickstart`, ...)."""
    return {p.stem: p for p in sorted(package_path("recipes").glob("*.yaml"))}


def resolve_deepspeed(value: int | str | dict) -> dict[str, Any]:
    """A role's `deepspeed` value -> a DeepSpeed config dict (a fresh copy)."""
    if isinstance(value, bool):
        raise RecipeError(f"`deepspeed: {value}` is not a ZeRO stage; use 0, 1, 2 or 3, a config name or a path")
    if isinstance(value, int):
        if value not in (0, 1, 2, 3):
            raise RecipeError(f"ZeRO stage {value} does not exist; use 0, 1, 2 or 3")
        return {"zero_optimization": {"stage": value}}
    if isinstance(value, dict):
        cfg = copy.deepcopy(value)
    else:
        presets = deepspeed_presets()
        path = presets[value] if value in presets else Path(resolve_shipped(value))
        if not path.is_file():
            raise RecipeError(f"DeepSpeed config `{value}` not found: use a stage (0-3), one of {sorted(presets)}, "
                              "or a JSON file path")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecipeError(f"DeepSpeed config `{value}` is not valid JSON: {e}") from None
    stage = cfg.setdefault("zero_optimization", {}).setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RecipeError(f"ZeRO stage {stage} in `{value}` does not exist; use 0, 1, 2 or 3")
    return cfg
