"""The shipped trainers, registered by name, and `load_recipe`: a recipe file to a validated recipe and its trainer."""
from __future__ import annotations

import os
from typing import Any, Mapping

from distill.errors import RecipeError
from distill.presets import shipped_recipes
from distill.recipe import RecipeBase, deep_merge, parse_overrides, read_recipe, validate_recipe
from distill.trainers.distill import DistillTrainer
from distill.trainers.dpo import DPOTrainer
from distill.trainers.grpo import GRPOTrainer
from distill.trainers.lm import LMTrainer
from distill.trainer import TRAINERS, RoleTrainer, get_trainer, register_trainer

__all__ = ["DPOTrainer", "DistillTrainer", "GRPOTrainer", "LMTrainer", "TRAINERS", "get_trainer", "load_recipe", "register_trainer", "trainer_name"]


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any] | RecipeBase, *overrides: str | list[str], **keys):
    """A validated recipe and its trainer class; loads no model. Returns (recipe, trainer class).

    `recipe`: a recipe file, a shipped recipe's name (`quickstart`), or the recipe's keys as a mapping (what the
    YAML file would hold; from Python, values may also be objects where the recipe takes them: `trainer` a
    RoleTrainer subclass, `data.train` / `data.eval` a `datasets.Dataset`, reward functions callables) or a
    validated recipe. `keys`: top-level recipe keys merged over it, mappings key by key (`train={"max_steps": 10}`);
    `overrides`: dotted `key.sub=value` strings (or lists of them), as on the command line, applied last."""
    dotted = [o for item in overrides for o in ([item] if isinstance(item, str) else item)]
    if isinstance(recipe, RecipeBase):
        recipe = recipe.model_dump(exclude_unset=True)
    if isinstance(recipe, Mapping):
        raw, where = dict(recipe), "the recipe"
    else:
        shipped = shipped_recipes()
        path = shipped[str(recipe)] if not os.path.exists(recipe) and str(recipe) in shipped else recipe
        raw, where = read_recipe(path), f"recipe `{path}`"
    raw = deep_merge(deep_merge(raw, keys), parse_overrides(dotted))
    if "trainer" not in raw:
        raise RecipeError(f"{where} has no `trainer:` key; add e.g. `trainer: distill`")
    trainer_cls = raw["trainer"] if isinstance(raw["trainer"], type) else get_trainer(raw["trainer"])
    if not issubclass(trainer_cls, RoleTrainer):
        raise RecipeError(f"`trainer: {trainer_cls!r}` is not a RoleTrainer subclass")
    raw["trainer"] = trainer_name(trainer_cls)
    return validate_recipe(raw, trainer_cls), trainer_cls


def trainer_name(cls: type[RoleTrainer]) -> str:
    """How a recipe names a trainer class: its registered name, else `module:Class`."""
    return cls.name if cls.name and TRAINERS.get(cls.name) is cls else f"{cls.__module__}:{cls.__qualname__}"

