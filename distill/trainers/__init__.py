"""Trainers by name, as recipes select them with `trainer: NAME`."""
from __future__ import annotations

from distill.recipe import RecipeError
from distill.registry import Registry, UnknownNameError

TRAINERS: Registry = Registry("trainer")


def register_trainer(cls):
    """Class decorator: make a RoleTrainer subclass selectable as `trainer: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    return TRAINERS.register(cls.name, override=True)(cls)  # re-importing a trainer module re-registers it


def get_trainer(name: str):
    """A registered name (`distill`), or `module:Class` for a trainer in your own importable module."""
    _load_builtin()
    if isinstance(name, str) and ":" in name:
        return _import_trainer(name)
    try:
        return TRAINERS.lookup(name)
    except UnknownNameError as e:
        raise RecipeError(f"`trainer: {name}`: {e}; or give `module:Class` of your own RoleTrainer") from None


def _load_builtin() -> None:
    from distill.trainers import distill, dpo, grpo, lm  # noqa: F401  (registration side effect)


def _import_trainer(path: str):
    import importlib

    from distill.trainer import RoleTrainer

    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"`trainer: {path}`: cannot import it ({e}); the module must be importable from the "
                          "working directory or PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, RoleTrainer)):
        raise RecipeError(f"`trainer: {path}` is not a RoleTrainer subclass")
    return cls
