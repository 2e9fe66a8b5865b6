"""Everything a run checks before it loads a weight.

Called once by the launching process (so a bad recipe fails once, not once per rank) and again by
each rank. Every failure is a RecipeError naming the recipe key and the fix. The file-level checks
(output directory, model files, data lines) are in distill/plan/checks.py, the tokenizer and size checks in
distill/plan/tokens.py; this module adds what needs the run directory and the processes.
"""
from __future__ import annotations

import json
from pathlib import Path

from distill.config.errors import RecipeError
from distill.data.loading import ensure_synthetic
from distill.data.text import looks_like_path
from distill.loop.checkpoint import latest_checkpoint
from distill.loop.rundir import check_resume_identity, clear_run, holds_run, lock_run_dir
from distill.loop.tracking import check_installed
from distill.models.build import check_model_source
from distill.plan.checks import check_checkpoint_shapes, check_jsonl, check_model_files, check_output_dir
from distill.plan.planner import plan_roles
from distill.plan.tokens import check_packing_attention, check_sizes, load_tokenizer
from distill.runtime.launch import launched, world_info


def preflight(recipe, trainer_cls, *, world_size: int, dry_run: bool = False, owner: bool | None = None):
    """Every check that needs no process and no weights: output dir, trackers, data paths, tokenizer, role plans.

    Outside a dry run, the process that owns the run directory (`owner`; by default the launching one, or rank 0
    under an outside launcher; one per machine where machines do not share it) then takes its lock and deletes an
    earlier run there (`overwrite`)."""
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
    check_data(recipe, trainer_cls, dry_run=dry_run)
    for name in trainer_cls.roles:  # before the tokenizer, which defaults to a role's directory
        check_model_source(name, getattr(recipe, name))
    for name in trainer_cls.built_roles(recipe):
        check_model_files(name, getattr(recipe, name))
    tokenizer = load_tokenizer(recipe, trainer_cls.roles)
    if recipe.data.packing:
        check_packing_attention({n: getattr(recipe, n) for n in trainer_cls.built_roles(recipe)}, len(tokenizer))
    plans = plan_roles(recipe, trainer_cls, world_size=world_size, vocab_size=len(tokenizer))
    check_sizes(recipe, plans, tokenizer)
    trainer_cls.check_plans(recipe, plans)  # first: it may set keys of a plan's config (a new head's outputs)
    if ckpt is not None:
        check_checkpoint_shapes(ckpt, plans)
    if not dry_run and (owner if owner is not None else world_info()[0] == 0):
        lock_run_dir(out)  # only now: a run refused above leaves no trace
        if ckpt is None and holds_run(out):
            if not (recipe.overwrite or recipe.resume == "auto"):
                raise RecipeError(f"`output_dir`: {out} already holds a run; continue it with --resume, choose another "
                                  "output_dir, or set overwrite=true (which deletes it)")
            gone = clear_run(out)  # every check passed: only now is the earlier run deleted
            print(f"distill: overwrite: deleted the earlier run in {out} ({', '.join(gone)})")
    return tokenizer, plans



def check_data(recipe, trainer_cls, *, dry_run: bool = False) -> None:
    """The synthetic data written if the recipe asks for it (`data.synthetic_seed`), and `data.train` / `data.eval`
    there; their lines parse (once per run)."""
    ensure_synthetic(recipe, trainer_cls.write_synthetic)
    d = recipe.data
    for key, path in (("data.train", d.train), ("data.eval", d.eval)):
        if path and looks_like_path(path) and not Path(path).expanduser().exists():
            raise RecipeError(f"`{key}`: `{path}` does not exist: point it at your data, or set `data.synthetic_seed: 0` "
                              f"to have the `{recipe.trainer}` trainer write its synthetic data to {Path(path).parent} "
                              "(only when that directory does not exist)")
        if dry_run or not launched():  # once per run: the ranks read the data through `datasets`, which says it too
            check_jsonl(key, path)


