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

from distill.config.errors import RecipeError
from distill.config.schema import LoRASpec

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


def base_model_path(from_pretrained: str | None) -> str | None:
    """What an adapter's `base_model_name_or_path` names: a local directory as an absolute path (the adapter must
    load from any working directory), a hub name as it is, None for a role built from a config."""
    if from_pretrained is None:
        return None
    local = Path(from_pretrained).expanduser()
    return str(local.resolve()) if local.is_dir() else from_pretrained


def save_lora(out_dir: Path, spec: LoRASpec, model_config, state: dict[str, torch.Tensor], base: str | None) -> None:
    """Write the merged model to out_dir and the adapter to out_dir/adapter/, from a full state dict of the
    wrapped model (as `Accelerator.get_state_dict` or `zero_to_fp32` give it).

    The adapter's `base_model_name_or_path` is `base`, so `AutoPeftModelForCausalLM.from_pretrained(out_dir/adapter)`
    loads base + adapter; a role built from a config (`base` None) has its base weights nowhere else, so they are
    written to out_dir/base/ and named there."""
    out_dir = Path(out_dir)
    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(model_config), spec, "lora")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.base_model.model.tie_weights()
    untied = [k for k in missing if model.get_parameter(k).is_meta]
    if untied or unexpected:
        raise ValueError(f"{out_dir}: weights do not fit the LoRA model: missing {untied}, unexpected {unexpected}")
    base_state = None
    if base is None:
        # Merging writes into the adapted layers' base weights: those are copied first, the rest shared.
        base_state = {k.replace(".base_layer.", "."): v.clone() if ".base_layer." in k else v
                      for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
        base = str((out_dir / "base").resolve())
        model.get_base_model().save_pretrained(base, state_dict=base_state, safe_serialization=True)
    model.peft_config["default"].base_model_name_or_path = base
    # The adapter one level down: a top-level adapter_config.json would make transformers load it as a peft model.
    model.save_pretrained(out_dir / "adapter", safe_serialization=True)
    model.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)


def write_spec(out_dir: Path, spec: LoRASpec, base: str | None = None) -> None:
    """The adapter's settings, and where its base weights come from (`base_model_path(base)`), for export."""
    (Path(out_dir) / LORA_FILE).write_text(json.dumps({**spec.model_dump(mode="json"), "base_model": base_model_path(base)}))


def read_spec(out_dir: Path) -> LoRASpec | None:
    path = Path(out_dir) / LORA_FILE
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    values.pop("base_model", None)
    return LoRASpec.model_validate(values)


def read_base(out_dir: Path) -> str | None:
    """The base model a checkpoint's adapter was trained on, as `write_spec` recorded it (None: built from a config)."""
    path = Path(out_dir) / LORA_FILE
    return json.loads(path.read_text()).get("base_model") if path.is_file() else None
