"""The shipped trainers, registered by name, and `load_recipe`: a recipe file to a validated recipe and its trainer."""
from __future__ import annotations

import os

from distill.presets import shipped_recipes
from distill.recipe import read_recipe, validate_recipe
from distill.trainers.distill import DistillTrainer
from distill.trainers.dpo import DPOTrainer
from distill.trainers.grpo import GRPOTrainer
from distill.trainers.lm import LMTrainer
from distill.trainers.reward import RewardTrainer
from distill.trainer import TRAINERS, get_trainer, register_trainer

__all__ = ["DPOTrainer", "DistillTrainer", "GRPOTrainer", "LMTrainer", "RewardTrainer", "TRAINERS", "get_trainer", "load_recipe", "register_trainer"]


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None):
    """Read a recipe file (or a shipped recipe by name, e.g. `quickstart`), apply dotted overrides, resolve its
    trainer, validate. Loads no model. Returns (recipe, trainer class)."""
    shipped = shipped_recipes()
    if not os.path.exists(path) and str(path) in shipped:
        path = shipped[str(path)]
    raw = read_recipe(path, overrides)
    trainer_cls = get_trainer(raw["trainer"])
    return validate_recipe(raw, trainer_cls), trainer_cls

