"""LoRA adapters on trainable roles, through `peft`.

A role with `lora:` is loaded as usual, then wrapped by `peft.get_peft_model` before its optimizer is
made: the base weights are frozen and only the adapter's A/B matrices train. What a run writes:

    final/<role>/            the merged model (W + alpha/r * B @ A): loads with plain `from_pretrained`
    final/<role>/adapter/    the adapter alone, peft format (`PeftModel.from_pretrained(base, dir)`)

Checkpoints hold the whole wrapped model (base + adapter) and `lora.json`, so resume and
`distill.export` need nothing else.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from distill.errors import RecipeError
from distill.recipe import LoRASpec

LORA_FILE = "lora.json"


def _peft():
    try:
        import peft
    except ImportError:
        raise RecipeError("`lora` needs the peft library: pip install 'distill[lora]' (or pip install peft)") from None
    return peft


def lora_config(spec: LoRASpec):
    peft = _peft()
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                           bias="none", task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, spec: LoRASpec, name: str) -> torch.nn.Module:
    """The model wrapped with a fresh adapter: only the adapter's parameters require grad."""
    peft = _peft()
    if isinstance(spec.target_modules, list):
        # peft refuses only a list that matches nothing at all; a misspelled name next to a right one would be ignored.
        modules = [n for n, _ in model.named_modules()]
        missing = [t for t in spec.target_modules if not any(n == t or n.endswith("." + t) for n in modules)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise RecipeError(f"`{name}.lora.target_modules`: {missing} match no module of this model; its Linear "
                              f"layers are {', '.join(linear)} (or use `all-linear`)")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; not the user's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, lora_config(spec))


def lora_param_counts(model_config, spec: LoRASpec, name: str) -> tuple[int, int]:
    """(all, trainable) parameters of the wrapped model, built on the meta device; checks the targets."""
    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(model_config), spec, name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in model.parameters()), trainable


def save_lora(out_dir: Path, spec: LoRASpec, model_config, state: dict[str, torch.Tensor], base: str | None) -> None:
    """Write the merged model to out_dir and the adapter to out_dir/adapter/, from a full state dict of the
    wrapped model (as `Accelerator.get_state_dict` or `zero_to_fp32` give it)."""
    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(model_config), spec, "lora")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.base_model.model.tie_weights()
    untied = [k for k in missing if model.get_parameter(k).is_meta]
    if untied or unexpected:
        raise ValueError(f"{out_dir}: weights do not fit the LoRA model: missing {untied}, unexpected {unexpected}")
    model.peft_config["default"].base_model_name_or_path = base
    # The adapter one level down: a top-level adapter_config.json would make transformers load it as a peft model.
    model.save_pretrained(Path(out_dir) / "adapter", safe_serialization=True)
    model.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)


def write_spec(out_dir: Path, spec: LoRASpec) -> None:
    (Path(out_dir) / LORA_FILE).write_text(json.dumps(spec.model_dump(mode="json")))


def read_spec(out_dir: Path) -> LoRASpec | None:
    path = Path(out_dir) / LORA_FILE
    return LoRASpec.model_validate_json(path.read_text()) if path.is_file() else None
