"""Trainers by name, as recipes select them with `trainer: NAME`."""
from __future__ import annotations

import difflib

from distill.recipe import RecipeError

TRAINERS: dict[str, type] = {}


def register_trainer(cls):
    """Class decorator: make a RoleTrainer subclass selectable as `trainer: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    TRAINERS[cls.name] = cls
    return cls


def get_trainer(name: str):
    _load_builtin()
    if name not in TRAINERS:
        near = difflib.get_close_matches(str(name), TRAINERS, n=1)
        hint = f"did you mean `{near[0]}`? " if near else ""
        raise RecipeError(f"`trainer: {name}` is not a trainer; {hint}registered: {sorted(TRAINERS)}")
    return TRAINERS[name]


def _load_builtin() -> None:
    from distill.trainers import distill, lm  # noqa: F401  (registration side effect)
