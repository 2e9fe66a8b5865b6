"""Everything a run checks before it starts a process group or loads a weight.

Called once by the launching process (so a bad recipe fails once, not once per rank) and again by
each rank. Every failure is a RecipeError naming the recipe key and the fix.
"""
from __future__ import annotations

import json
from pathlib import Path

from typing import Any

from transformers import AutoTokenizer

from distill.checkpoint import latest_checkpoint
from distill.data.loading import ensure_synthetic
from distill.data.packing import PACKING_ATTENTION
from distill.data.text import looks_like_path
from distill.errors import RecipeError
from distill.models import check_model_source, load_model_config
from distill.plan import plan_roles
from distill.recipe import Role
from distill.tracking import check_installed


def preflight(recipe, trainer_cls, *, world_size: int, dry_run: bool = False):
    """Every check that needs no process and no weights: output dir, trackers, data paths, tokenizer, role plans."""
    if not dry_run:  # a dry run writes nothing, so an existing run is no obstacle to it
        _check_output_dir(Path(recipe.output_dir), recipe.overwrite or bool(recipe.resume))
    if recipe.resume is True:
        ckpt = latest_checkpoint(Path(recipe.output_dir))
        if ckpt is None:
            raise RecipeError(f"`resume: true`: {recipe.output_dir} has no complete checkpoint; start without --resume "
                              "(or set `resume: auto` to resume only when there is one)")
        written = json.loads((ckpt / "trainer_state.json").read_text())["world_size"]
        if written != world_size:
            raise RecipeError(f"`resume`: {ckpt} was written by {written} processes, this run has {world_size}: "
                              f"set launch.num_processes={written} (or export it and start a new run from the export)")
    check_installed(recipe.train.report_to)
    ensure_synthetic(recipe, trainer_cls.write_synthetic)
    d = recipe.data
    for key, path in (("data.train", d.train), ("data.eval", d.eval)):
        if path and d.synthetic_seed is None and looks_like_path(path) and not Path(path).exists():
            raise RecipeError(f"`{key}`: `{path}` does not exist; write the synthetic language there with "
                              f"`python -m distill.data.synthetic {Path(path).parent}` or set `data.synthetic_seed: 0`")
    for name in trainer_cls.roles:  # before the tokenizer, which defaults to a role's directory
        check_model_source(name, getattr(recipe, name))
    tokenizer = _load_tokenizer(recipe, trainer_cls.roles)
    if recipe.data.packing:
        check_packing_attention({n: getattr(recipe, n) for n in trainer_cls.built_roles(recipe)}, len(tokenizer))
    plans = plan_roles(recipe, trainer_cls, world_size=world_size, vocab_size=len(tokenizer))
    trainer_cls.check_plans(recipe, plans)
    return tokenizer, plans


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if (out / "recipe.yaml").exists() and not overwrite:
        raise RecipeError(f"`output_dir`: {out} already holds a run; continue it with --resume, choose another "
                          "output_dir, or set overwrite=true")


def _load_tokenizer(recipe, roles: dict[str, Role]):
    """The data tokenizer; every pretrained causal LM role that ships a tokenizer must agree with it. A sequence
    classifier (a reward model) may bring its own: its trainer gives it text to tokenize (GRPO's reward role)."""
    sources = [getattr(recipe, n).from_pretrained for n in roles
               if getattr(recipe, n).from_pretrained and getattr(recipe, n).model_class == "causal_lm"]
    path = recipe.data.tokenizer or (sources[0] if sources else None)
    if path is None:
        raise RecipeError("`data.tokenizer`: no role is loaded from_pretrained, so name a tokenizer directory")
    key = "data.tokenizer" if recipe.data.tokenizer else next(f"{n}.from_pretrained" for n in roles
                                                            if getattr(recipe, n).from_pretrained == path)
    if looks_like_path(path) and not Path(path).exists():
        raise RecipeError(f"`{key}`: `{path}` does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"`{key}`: no tokenizer could be loaded from `{path}` ({e.__class__.__name__}); "
                          "set `data.tokenizer` to a tokenizer directory") from None
    for src in sources:
        if src != path and any((Path(src) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            other = AutoTokenizer.from_pretrained(src)
            if other.get_vocab() != tok.get_vocab():
                raise RecipeError(f"tokenizer of `{src}` differs from `{path}`: roles must share one tokenizer "
                                  "(token ids are compared position by position)")
    return tok


def check_packing_attention(roles: dict[str, Any], vocab_size: int | None) -> None:
    """Refuse roles (name -> `Role`) whose attention implementation would let packed documents see each other.

    Read from the model configs alone, before any model is built (a flash-attention model cannot even be
    sized where the kernels are not installed)."""
    for name, spec in roles.items():
        impl = getattr(load_model_config(name, spec, vocab_size), "_attn_implementation", None)
        if impl is not None and impl not in PACKING_ATTENTION:
            where = (f"`{name}.config.attn_implementation: sdpa`" if spec.config is not None else
                     f"`attn_implementation: sdpa` in {spec.from_pretrained}/config.json")
            raise RecipeError(f"`data.packing: true` needs attention that keeps packed documents apart "
                              f"({', '.join(PACKING_ATTENTION)}); `{name}` uses {impl}: set {where}, or `data.packing: false`")
