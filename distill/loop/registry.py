"""Trainers by name, as recipes select them with `trainer: NAME` (or `module:Class` for a trainer of your own)."""
from __future__ import annotations

import importlib

from distill.config.errors import RecipeError
from distill.config.registry import Registry, UnknownNameError

# -- trainers by name, as recipes select them with `trainer: NAME` ---------------------------------
TRAINERS: Registry = Registry("trainer")


def register_trainer(cls):
    """Class decorator: make a RoleTrainer subclass selectable as `trainer: <cls.name>` in a recipe."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    return TRAINERS.register(cls.name, override=True)(cls)  # re-importing a trainer module re-registers it


def get_trainer(name: str) -> type:
    """A registered name (`distill`), or `module:Class` for a trainer in your own importable module."""
    if isinstance(name, str) and ":" in name:
        return _import_trainer(name)
    try:
        return TRAINERS.lookup(name)
    except UnknownNameError as e:
        raise RecipeError(f"`trainer: {name}`: {e}; or give `module:Class` of your own RoleTrainer") from None


def _import_trainer(path: str) -> type:
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"`trainer: {path}`: cannot import it ({e}); the module must be importable from the "
                          "working directory or PYTHONPATH") from None
    if not isinstance(cls, type):  # load_recipe checks that it is a RoleTrainer
        raise RecipeError(f"`trainer: {path}` is not a RoleTrainer subclass")
    return cls


def trainer_name(cls: type) -> str:
    """How a recipe names a trainer class: its registered name, else `module:Class`."""
    return cls.name if cls.name and TRAINERS.get(cls.name) is cls else f"{cls.__module__}:{cls.__qualname__}"
