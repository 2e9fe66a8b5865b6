"""`python -m distill.teacher_cache RECIPE.yaml [key.sub=value ...]`: write the recipe's teacher cache.

    python -m distill.teacher_cache recipes/teacher_cache_quickstart.yaml     # launch.num_processes processes
    accelerate launch --num_processes 8 --use_deepspeed -m distill.teacher_cache RECIPE.yaml   # the same, by hand
    python -m distill.teacher_cache --verify DIR                               # every shard's sha256 against the manifest

Run again after a kill, it writes the shards that are missing. What a recipe sets: docs/distill-trainer.md.
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch.distributed as dist

from distill.config.errors import RecipeError
from distill.plan.planner import format_plan
from distill.runtime import ranks
from distill.runtime.launch import launched, leave, relaunch, world_info
from distill.teacher_cache.store import CacheReader
from distill.trainers.cache_writer import load_writer_recipe, write_cache, writer_preflight


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distill.teacher_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="a distillation recipe with `teacher`, `data` and `kd.cache`")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kd.cache.k=32 launch.num_processes=1")
    p.add_argument("--verify", metavar="DIR", help="check every shard of the cache in DIR against its sha256")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the teacher's plan; load nothing")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)
    if not args.recipe and not args.verify:
        p.error("give a recipe, or --verify DIR")
    return args


def main(argv: list[str] | None = None) -> int:

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    watch = None
    try:
        if args.verify:
            bad = CacheReader(args.verify).verify()
            print("\n".join(f"sha256 differs: {b}" for b in bad) or f"{args.verify}: every shard matches its sha256")
            return 1 if bad else 0
        recipe = load_writer_recipe(args.recipe, args.overrides)
        n = world_info()[1] if launched() else recipe.launch.num_processes
        if args.dry_run:

            print(format_plan({"teacher": writer_preflight(recipe, world_size=n, dry_run=True)[1]}, n))
            return 0
        if not launched() and n > 1:
            writer_preflight(recipe, world_size=n)  # fail here, once, not in every rank
            return relaunch(n, "distill.teacher_cache", argv)
        if launched() and n > 1:
            watch = ranks.join(recipe.launch.timeout_s)  # a rank that fails stops the others
        write_cache(recipe)
    except RecipeError as e:
        ranks.report_failure(watch, 2, str(e))
        return 2
    except Exception as e:
        print(f"{ranks.where()} failed:", file=sys.stderr)
        traceback.print_exc()
        ranks.report_failure(watch, 1, f"{e.__class__.__name__}: {e}")
        return 1
    if watch is not None:
        watch.stop()
        dist.barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    leave(main())
