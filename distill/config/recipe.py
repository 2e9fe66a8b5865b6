"""Typed recipes: YAML + dotted overrides -> a validated recipe (`config/schema.py`), or one `RecipeError` saying
how to fix it.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, create_model

from distill.config.deepspeed import role_ds_config
from distill.config.errors import RecipeError
from distill.config.presets import shipped_recipes
from distill.config.schema import RecipeBase, Role, role_grad_clip


class Replace(dict):
    """A mapping given whole on the command line (`kd.params={beta: 0.3}`): it replaces the recipe's mapping
    at that key instead of being merged into it."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`a.b=1 c=x` -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars/lists/mappings.

    A mapping value (`a.b={x: 1}`, `a.b={}`) replaces the mapping at `a.b`; dotted keys (`a.b.x=1`) set inside it."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"override `{pair}` has no `=`; write it as key.sub=value, e.g. train.max_steps=10")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override `{pair}` sets inside `{p}`, which another override set to a value")
        value = yaml.safe_load(raw) if raw != "" else None
        node[parts[-1]] = Replace(value) if isinstance(value, dict) else value
    return out


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, mappings merged key by key, except a `Replace` mapping, which replaces."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Replace):
            out[k] = deep_merge({}, v)  # plain dicts from here on; nested overrides still merge inside it
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def recipe_model(trainer_cls) -> type[RecipeBase]:
    """The recipe class of one trainer: its declared `recipe_class` (RecipeBase + a field per role and per section,
    each with a docstring), with a field added for every role or section it does not declare (a trainer without a
    declared class, or a subclass that adds its own)."""
    taken = set(RecipeBase.model_fields) | set(dir(trainer_cls))
    clash = sorted((set(trainer_cls.roles) | set(trainer_cls.sections)) & taken)
    if clash or set(trainer_cls.roles) & set(trainer_cls.sections):
        raise TypeError(f"{trainer_cls.__name__}: role/section names {clash or sorted(set(trainer_cls.roles) & set(trainer_cls.sections))} "
                        "clash with recipe keys or trainer attributes; rename them")
    declared = getattr(trainer_cls, "recipe_class", None) or RecipeBase
    unread = sorted(set(declared.model_fields) - set(RecipeBase.model_fields) - set(trainer_cls.roles) - set(trainer_cls.sections))
    if unread:  # a subclass with other roles that inherits its parent's class would require keys it never reads
        raise TypeError(f"{declared.__name__} declares {unread}, which {trainer_cls.__name__} has no role or section for: "
                        f"give {trainer_cls.__name__} a `recipe_class` of its own (or None)")
    fields: dict[str, Any] = {}
    for name, kind in [*((n, Role) for n in trainer_cls.roles), *trainer_cls.sections.items()]:
        field = declared.model_fields.get(name)
        if field is None:
            fields[name] = (Role, ...) if kind is Role else (kind, kind())
        elif field.annotation is not kind:
            raise TypeError(f"{declared.__name__}.{name} is declared {field.annotation}, but {trainer_cls.__name__} "
                            f"reads it as {kind.__name__}: make the two agree")
    return create_model(f"{trainer_cls.__name__}Recipe", __base__=declared, **fields) if fields else declared


def describe_error(err: dict, model: type[BaseModel], raw: dict) -> str:
    """One line for one pydantic error of `model` read from `raw`: the dotted key, what is wrong, and the fix."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent_model = model
        for p in loc[:-1]:
            field = parent_model.model_fields.get(p) if hasattr(parent_model, "model_fields") else None
            ann = getattr(field, "annotation", None)
            parent_model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if parent_model is None:
                break
        valid = sorted(parent_model.model_fields) if parent_model else []
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean `{'.'.join(loc[:-1] + near)}`?" if near else f"valid keys here: {', '.join(valid)}"
        return f"unknown key `{key}`: {hint}"
    if err["type"] == "missing":
        return f"missing key `{key}`: add it to the recipe (or pass {key}=... on the command line)"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"`{key or '<recipe>'}`: {err['msg']}{got_s}"


def read_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """A recipe file as a mapping, dotted overrides merged in; not validated (that needs its trainer, which
    `distill.loop.trainer.load_recipe` resolves)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file `{path}` does not exist; shipped recipes, to run by name or copy out with "
                          f"`distill recipes copy NAME`: {', '.join(shipped_recipes())}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe `{path}` is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe `{path}` must be a mapping of keys, got {type(raw).__name__}")
    return deep_merge(raw, parse_overrides(overrides or []))


def validate_recipe(raw: dict, trainer_cls) -> RecipeBase:
    """Merge the trainer's role defaults under the recipe's role blocks and validate everything."""
    raw = dict(raw)
    for name, declared in trainer_cls.roles.items():
        block = raw.get(name)
        if block is not None and not isinstance(block, dict):
            raise RecipeError(f"`{name}` must be a mapping of role settings (from_pretrained, deepspeed, ...), got {block!r}")
        raw[name] = deep_merge(declared.model_dump(exclude_unset=True), block or {})
    model = recipe_model(trainer_cls)
    try:
        recipe = model.model_validate(raw)
    except ValidationError as e:
        lines = [describe_error(err, model, raw) for err in e.errors()]
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(lines)) from None
    for name in trainer_cls.roles:
        role = getattr(recipe, name)
        src = role.weights_from
        if role.from_pretrained is None and role.config is None and src is not None:
            if src not in trainer_cls.roles or src == name:
                raise RecipeError(f"`{name}.weights_from: {src}` must name another role of this trainer: {list(trainer_cls.roles)}")
            other = getattr(recipe, src)
            role.from_pretrained, role.config = other.from_pretrained, other.config
            role.trust_remote_code = other.trust_remote_code
        if role.from_pretrained is None and role.config is None and name in trainer_cls.built_roles(recipe):
            raise RecipeError(f"`{name}`: say where the model comes from: `{name}.from_pretrained: DIR` or `{name}.config: {{model_type: llama, ...}}`")
        # A dry build of the DeepSpeed config catches impossible setups now.
        t = recipe.train
        role_ds_config(name, role, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, world_size=1,
                       grad_clip=role_grad_clip(role, t), hidden_size=1)
    checkpointed = [n for n in trainer_cls.roles if getattr(recipe, n).trainable and getattr(recipe, n).gradient_checkpointing]
    if recipe.train.overlap_frozen and checkpointed:
        # The recomputed attention of a checkpointed layer can differ from its forward when a frozen role's
        # forward ran beside it on another stream (torch's CheckpointError, seen on GPUs).
        raise RecipeError(f"`train.overlap_frozen: true` cannot be combined with `{checkpointed[0]}.gradient_checkpointing: true`: "
                          "set one of them to false (null, the default, turns the overlap off for checkpointed runs)")
    if recipe.data.packing and not getattr(trainer_cls, "supports_packing", False):
        raise RecipeError(f"`data.packing: true`: the `{recipe.trainer}` trainer does not train on packed text rows "
                          "(it needs its own batches, e.g. prompts or preference pairs): set `data.packing: false`")
    trainer_cls.check_recipe(recipe)
    return recipe
