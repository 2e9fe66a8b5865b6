"""Everything a run checks before it loads a weight.

Called once by the launching process (so a bad recipe fails once, not once per rank) and again by
each rank. Every failure is a RecipeError naming the recipe key and the fix. The file-level checks
(output directory, model files, data lines, vocabulary sizes) are in distill/checks.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from typing import Any

from transformers import AutoTokenizer

from distill.checkpoint import latest_checkpoint
from distill.checks import check_checkpoint_shapes, check_jsonl, check_model_files, check_output_dir, check_vocab_sizes
from distill.data.loading import ensure_synthetic
from distill.data.packing import PACKING_ATTENTION
from distill.data.text import looks_like_path
from distill.errors import RecipeError
from distill.launch import launched, world_info
from distill.models import check_model_source, load_model_config
from distill.plan import plan_roles
from distill.recipe import Role
from distill.rundir import check_resume_identity, clear_run, holds_run, lock_run_dir
from distill.tracking import check_installed


def preflight(recipe, trainer_cls, *, world_size: int, dry_run: bool = False):
    """Every check that needs no process and no weights: output dir, trackers, data paths, tokenizer, role plans.

    Outside a dry run, the process that owns the run directory (the launching one, or rank 0 under an outside
    launcher) then takes its lock and deletes an earlier run there (`overwrite`)."""
    out = Path(recipe.output_dir)
    check_output_dir(out)
    ckpt = latest_checkpoint(out) if recipe.resume else None
    if recipe.resume is True and ckpt is None:
        raise RecipeError(f"`resume: true`: {recipe.output_dir} has no complete checkpoint; start without --resume "
                          "(or set `resume: auto` to resume only when there is one)")
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        written = state["world_size"]
        if written != world_size:
            raise RecipeError(f"`resume`: {ckpt} was written by {written} processes, this run has {world_size}: "
                              f"set launch.num_processes={written} (or export it and start a new run from the export)")
        check_resume_identity(ckpt, recipe)
        last = recipe.train.max_steps
        if last is not None and state["step"] > last:  # with `epochs`, the trainer checks once the data is counted
            raise RecipeError(f"`resume`: {ckpt} is at step {state['step']}, past this run's last step "
                              f"(train.max_steps={last}): export it (`python -m distill.export`), or resume with more steps")
    check_installed(recipe.train.report_to)
    ensure_synthetic(recipe, trainer_cls.write_synthetic)
    d = recipe.data
    for key, path in (("data.train", d.train), ("data.eval", d.eval)):
        if path and d.synthetic_seed is None and looks_like_path(path) and not Path(path).exists():
            raise RecipeError(f"`{key}`: `{path}` does not exist; write the synthetic language there with "
                              f"`python -m distill.data.synthetic {Path(path).parent}` or set `data.synthetic_seed: 0`")
        if dry_run or not launched():  # once per run: the ranks read the data through `datasets`, which says it too
            check_jsonl(key, path)
    for name in trainer_cls.roles:  # before the tokenizer, which defaults to a role's directory
        check_model_source(name, getattr(recipe, name))
    for name in trainer_cls.built_roles(recipe):
        check_model_files(name, getattr(recipe, name))
    tokenizer = _load_tokenizer(recipe, trainer_cls.roles)
    if recipe.data.packing:
        check_packing_attention({n: getattr(recipe, n) for n in trainer_cls.built_roles(recipe)}, len(tokenizer))
    plans = plan_roles(recipe, trainer_cls, world_size=world_size, vocab_size=len(tokenizer))
    check_vocab_sizes(plans, tokenizer, recipe)
    if ckpt is not None:
        check_checkpoint_shapes(ckpt, plans)
    trainer_cls.check_plans(recipe, plans)
    if not dry_run and world_info()[0] == 0:  # the owner of the run directory: the launching process, or rank 0
        lock_run_dir(out)  # only now: a run refused above leaves no trace
        if ckpt is None and holds_run(out):
            if not (recipe.overwrite or recipe.resume == "auto"):
                raise RecipeError(f"`output_dir`: {out} already holds a run; continue it with --resume, choose another "
                                  "output_dir, or set overwrite=true (which deletes it)")
            gone = clear_run(out)  # every check passed: only now is the earlier run deleted
            print(f"distill: overwrite: deleted the earlier run in {out} ({', '.join(gone)})")
    return tokenizer, plans


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
