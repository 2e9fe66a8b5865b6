"""A role's model: its transformers config and class, read and built as its recipe block says.

The one place that names a transformers Auto class: a role's `model_class` picks it (a causal LM by
default; a sequence classifier for a reward model; a token classifier for a critic's per-token values), so a
new kind of role is a new entry in `MODEL_CLASSES`, not another branch in the loaders.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from distill.config.errors import RecipeError
from distill.config.schema import Role
from distill.data.text import looks_like_path

MODEL_CLASSES = {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification,
                 "token_classification": AutoModelForTokenClassification}
"""`Role.model_class` -> the transformers Auto class that builds it."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`Role.precision` -> the dtype of the role's weights."""


def auto_class(spec: Role):
    return MODEL_CLASSES[spec.model_class]


def class_of_saved(config):
    """The Auto class of a saved model, from the architecture its config names (a causal LM when it names none)."""
    names = getattr(config, "architectures", None) or []
    kinds = {"ForSequenceClassification": "sequence_classification", "ForTokenClassification": "token_classification"}
    kind = next((k for suffix, k in kinds.items() if any(n.endswith(suffix) for n in names)), "causal_lm")
    return MODEL_CLASSES[kind]


def check_model_source(name: str, spec: Role) -> None:
    """A `from_pretrained` that names a local path must be a model directory."""
    if spec.from_pretrained is None:
        return
    src = Path(spec.from_pretrained).expanduser()
    if (looks_like_path(spec.from_pretrained) or src.exists()) and not (src / "config.json").is_file():
        raise RecipeError(f"`{name}.from_pretrained`: `{spec.from_pretrained}` is not a model directory (no config.json). "
                          f"Train the shipped teacher with `python -m distill.train recipes/teacher_pretrain.yaml`, or fix the path")


def load_model_config(name: str, spec: Role, vocab_size: int | None):
    """The transformers config of a role, read without loading weights."""
    if spec.from_pretrained is not None:
        check_model_source(name, spec)
        try:
            return AutoConfig.from_pretrained(spec.from_pretrained, trust_remote_code=spec.trust_remote_code)
        except OSError as e:
            raise RecipeError(f"`{name}.from_pretrained`: cannot load `{spec.from_pretrained}` ({e.__class__.__name__}); give a local directory") from None
    cfg = dict(spec.config)
    model_type = cfg.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise RecipeError(f"`{name}.config.model_type` must name a transformers architecture (e.g. llama), got {model_type!r}")
    if "vocab_size" not in cfg and vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    try:
        return CONFIG_MAPPING[model_type](**cfg)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"`{name}.config`: {e}") from None


def count_params(model_config, model_class: str = "causal_lm") -> int:
    """Parameters of a model built on the meta device: exact, instant, no memory."""
    with torch.device("meta"):
        model = MODEL_CLASSES[model_class].from_config(model_config)
    return sum(p.numel() for p in model.parameters())


def build_model(spec: Role, model_config) -> torch.nn.Module:
    """The role's model in its precision: `from_pretrained` weights, or a random init from `model_config`.

    Under a ZeRO-3 plugin made active by the caller (RoleManager.build), transformers builds it sharded.
    `model_config` is the plan's, also for `from_pretrained`: a trainer may have set keys of it (a reward model's
    `num_labels: 1` on a causal LM's checkpoint)."""
    cls, dtype = auto_class(spec), DTYPES[spec.precision]
    if spec.from_pretrained:
        return cls.from_pretrained(spec.from_pretrained, config=copy.deepcopy(model_config), dtype=dtype,
                                   trust_remote_code=spec.trust_remote_code)
    return cls.from_config(model_config, dtype=dtype)


def leaf_module_classes(model: torch.nn.Module) -> list[str]:
    """The decoder-layer classes of a transformers model (`_no_split_modules`) present in it."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in names})
