"""`python -m distill.train RECIPE.yaml [key.sub=value ...]`: parse, build, train, clean up."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch.distributed as dist

from distill.cli.recipes import recipes_table
from distill.config.errors import RecipeError
from distill.config.schema import LaunchSpec
from distill.loop.monitor import NonFiniteLoss
from distill.loop.preflight import preflight
from distill.loop.rundir import release_run_dir
from distill.plan.planner import format_memory, format_plan
from distill.rl.rewards import RewardError
from distill.runtime import ranks
from distill.runtime.launch import launched, leave, place_processes, relaunch, use_compile_cache, world_info
from distill.trainers import load_recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill train", description=__doc__, epilog=recipes_table() + "\nevery recipe key, with its type, default and meaning: docs/recipe-reference.md",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe YAML file, e.g. recipes/quickstart.yaml, or a shipped recipe's name (quickstart)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10 student.optimizer.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, print the role plan and memory estimate, load nothing")
    # The `deepspeed` launcher passes --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_intermixed_args(argv)  # flags may stand between the recipe and its overrides


def dry_run(recipe, trainer_cls, recipe_path: str) -> str:
    """The plan a run would follow, from configs only: roles, ZeRO stages, sizes, memory, launch line."""
    world = world_info()[1] if launched() else recipe.launch.num_processes
    _, plans = preflight(recipe, trainer_cls, world_size=world, dry_run=True)
    t = recipe.train
    launch = (f"under the current launcher ({world} processes)" if launched() else
              f"accelerate launch --num_processes {world} --use_deepspeed -m distill.train {recipe_path}" if world > 1 else
              f"one process: python -m distill.train {recipe_path}")
    try:
        device = place_processes(recipe.launch.device, local_processes(recipe), apply=False)
    except RecipeError as e:  # the plan still helps on another machine than the run's
        device = f"refused on this machine: {e}"
    return "\n".join([format_plan(plans, world, device),
                      format_memory(plans, world_size=world, micro_batch_size=t.micro_batch_size, seq_len=recipe.data.max_length),
                      *trainer_cls.plan_notes(recipe, plans, world),
                      f"launch: {launch}", "dry run: no weights loaded, no run directory written (with data.synthetic_seed, synthetic data is "
                      "written into its directory when that directory does not exist yet, as a run would)"])


def local_processes(recipe) -> int:
    """Processes of this run on this machine: the recipe's, or what the outside launcher started here."""
    if not launched():
        return recipe.launch.num_processes
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_info()[1]))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # DeepSpeed calls a torch.distributed function that torch marks deprecated, once per step.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather_into_tensor.*")
    args = parse_args(argv)
    plain = not launched()  # a single process sets the launcher's variables itself once it starts DeepSpeed
    recipe = trainer_cls = early = watch = None
    try:
        recipe, trainer_cls = load_recipe(args.recipe, args.overrides + (["resume=true"] if args.resume else []))
        # Before anything starts CUDA: a run placed on the CPU hides the GPUs from this process and its ranks.
        if not args.dry_run:
            place_processes(recipe.launch.device, local_processes(recipe))
            use_compile_cache(recipe.launch.compile_cache)
    except RecipeError as e:
        early = e  # said below, once this rank can tell the others
    if not plain and world_info()[1] > 1 and not args.dry_run:
        # Every rank joins first, a failing one too: from here on a failure on any rank of any machine stops
        # every other rank within seconds (distill/runtime/ranks.py), instead of leaving them waiting for it.
        watch = ranks.join(recipe.launch.timeout_s if recipe is not None else LaunchSpec().timeout_s)
    try:
        if early is not None:
            raise early
        if args.dry_run:
            print(dry_run(recipe, trainer_cls, args.recipe))
            return 0
        if recipe.launch.num_processes > 1 and plain:
            preflight(recipe, trainer_cls, world_size=recipe.launch.num_processes)  # fail here, once, not per rank
            return relaunch(recipe.launch.num_processes, "distill.train", argv)
        trainer = trainer_cls(recipe)
        trainer.train()
    except RecipeError as e:
        ranks.report_failure(watch, 2, str(e))
        return 2  # the process group is left be: the other ranks may wait in a collective this one never joins
    except (NonFiniteLoss, RewardError) as e:  # raised on every rank at the same step
        code = 3 if isinstance(e, NonFiniteLoss) else 4
        if watch is not None:
            watch.stop()  # every rank stops here by itself; rank 0 says why
            watch.publish(code, str(e))
        if world_info()[0] == 0:
            print(f"distill: stopped: {e}", file=sys.stderr)
        return code
    except Exception as e:
        if watch is not None:
            watch.stop()
            if (why := watch.cause()) is not None:
                watch.end(*why)  # a collective broke because a peer left: say why it left, not this traceback
        # An error of this rank alone: say it now, and leave the process group be. Destroying it waits for
        # the other ranks, which may sit in a collective this rank will never join; the run would hang with
        # its error unsaid. The other ranks stop when they learn of it (or when the launcher ends them).
        print(f"{ranks.where()} failed:", file=sys.stderr)
        traceback.print_exc()
        if hint := compile_hint(e):  # each rank compiles its own graphs: say it where it failed
            print(f"distill: {hint}", file=sys.stderr)
        ranks.report_failure(watch, 1, f"{e.__class__.__name__}: {e}")
        return 1
    finally:
        if recipe is not None and plain:
            release_run_dir(Path(recipe.output_dir))
    if watch is not None:
        watch.stop()
        dist.barrier()  # no rank ends (and takes a store it may hold with it) while another still watches it
    _close_process_group()
    return 0


def compile_hint(error: BaseException) -> str | None:
    """What to do when torch.compile, on by default on GPUs, failed (a missing compiler toolchain, say)."""
    seen = error
    while seen is not None:
        if type(seen).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return ("compiling the decoder layers failed (above); train with plain layers: `compile: false` "
                    "on each role, e.g. student.compile=false teacher.compile=false on the command line")
        seen = seen.__cause__ or seen.__context__
    return None


def _close_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    leave(main())
