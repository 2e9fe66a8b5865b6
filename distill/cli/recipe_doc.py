"""`python -m distill.recipe_doc > docs/recipe-reference.md`: the recipe reference, from the typed config.

Every key of a recipe is a field of a pydantic `Section` in `distill/config/schema.py` or of a section that a
registered trainer declares; each field's docstring is its documentation (`use_attribute_docstrings`).
This module walks those models, so the reference lists exactly what validation accepts.
`tests/cli/test_recipe_doc.py` fails when the committed file differs from a fresh one.
"""
from __future__ import annotations

import inspect
import json
import sys
import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from distill.config.schema import RecipeBase, Role
from distill.trainers import TRAINERS

COMMAND = "python -m distill.recipe_doc > docs/recipe-reference.md"


def builtin_trainers() -> dict[str, type]:
    """The trainers shipped with distill (not ones a test or user registered in this process), by name."""
    return {n: cls for n, cls in sorted(TRAINERS.items()) if cls.__module__.startswith("distill.")}


def sections_of(model: type[BaseModel], path: str) -> list[tuple[str, type[BaseModel]]]:
    """`model` at `path` and every section nested in its fields, depth first: (dotted path, model)."""
    out = [(path, model)]
    for name, field in model.model_fields.items():
        sub = _section_type(field.annotation)
        if sub is not None:
            out += sections_of(sub, f"{path}.{name}" if path else name)
    return out


def _section_type(annotation) -> type[BaseModel] | None:
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _is_union(t) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def type_name(t) -> str:
    """A recipe-facing name of a type: YAML words (`null`, `mapping`), literals quoted, unions with `|`."""
    if t is type(None):
        return "null"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "section"
    origin, args = typing.get_origin(t), typing.get_args(t)
    if _is_union(t):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is list:
        return f"list of ({type_name(args[0])})" if _is_union(args[0]) or typing.get_origin(args[0]) is Literal else f"list of {type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict or t is dict:
        return "mapping"
    if t is Any:
        return "any"
    return getattr(t, "__name__", str(t))


_BOUNDS = {annotated_types.Gt: ">", annotated_types.Ge: ">=", annotated_types.Lt: "<", annotated_types.Le: "<="}


def field_type(field) -> str:
    bounds = [f"{op} {getattr(m, cls.__name__.lower())}" for m in field.metadata for cls, op in _BOUNDS.items()
              if isinstance(m, cls)]
    return type_name(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")


def default_text(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    return yaml_scalar(value)


def yaml_scalar(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def _cell(text: str | None) -> str:
    """One table cell: one line, pipes escaped, `<...>` outside code spans kept visible as text."""
    parts = " ".join((text or "").split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def section_table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        rows.append(f"| `{name}` | {_cell(field_type(field))} | {_cell(default_text(field))} | {_cell(field.description)} |")
    return rows


def _doc(obj) -> str:
    """An object's own docstring, first paragraph; a class without one speaks through its module's."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    if not doc and isinstance(obj, type):
        doc = sys.modules[obj.__module__].__doc__
    return _cell(inspect.cleandoc(doc or "").split("\n\n")[0])


def sections_block(model: type[BaseModel], path: str, level: str) -> list[str]:
    """A heading, the section's own docstring and its table, for `model` and each section nested in it."""
    out: list[str] = []
    for sub_path, sub in sections_of(model, path):
        doc = _doc(sub) if sub.__dict__.get("__doc__") else ""
        out += [f"{level} `{sub_path}`" if sub_path else f"{level} Top level", ""] + ([doc, ""] if doc else [])
        out += section_table(sub) + [""]
    return out


def render() -> str:
    trainers = builtin_trainers()
    out = ["# Recipe reference", "",
           f"<!-- Generated by `{COMMAND}`; edit the field docstrings, not this file. -->", "",
           "Every key of a recipe, generated from the typed config: each key is a field of a pydantic section",
           "(`distill/config/schema.py`, or a section a trainer declares) and its text is the field's docstring.",
           "Unknown keys are refused with the nearest valid name. Any key can also be set on the command line",
           "as a dotted override (`train.max_steps=10`). `default` is what an omitted key becomes; a `section`",
           "key holds the keys listed under its own heading.", ""]
    out += sections_block(RecipeBase, "", "##")
    out += ["## Role blocks", "",
            "Each role of the chosen trainer is a top-level block (`student:`, `teacher:`, `policy:`, ...) with",
            "these keys; the trainer's role defaults (below) come first and the recipe's block is merged over them.", ""]
    out += sections_block(Role, "<role>", "###")
    out += ["## Trainers", "", "`trainer:` names one of these, or `module:Class` for your own `RoleTrainer` subclass.", ""]
    for name, cls in trainers.items():
        out += [f"### `trainer: {name}`", "", _doc(cls), "", "| role | defaults |", "|---|---|"]
        for role, declared in cls.roles.items():
            # Fields the declaration set, less the optimizer/scheduler a trainable Role fills in by default.
            set_keys = {k: v for k, v in declared.model_dump(exclude_unset=True, mode="json").items()
                        if not (isinstance(getattr(declared, k), BaseModel) and getattr(declared, k) == type(getattr(declared, k))())}
            out.append(f"| `{role}` | {', '.join(f'`{k}: {json.dumps(v)}`' for k, v in set_keys.items()) or 'the Role defaults'} |")
        out.append("")
        for section, model in cls.sections.items():
            out += sections_block(model, section, "####")
    return "\n".join(out).rstrip() + "\n"


def all_sections() -> list[tuple[str, type[BaseModel]]]:
    """Every section a recipe can hold, base and trainer-declared: what the docstring test walks."""
    out = sections_of(RecipeBase, "") + sections_of(Role, "<role>")
    for cls in builtin_trainers().values():
        for section, model in cls.sections.items():
            out += sections_of(model, section)
    return out


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
