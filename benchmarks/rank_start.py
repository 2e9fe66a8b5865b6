"""How the ranks of a plain `python -m distill.train` start: forked from the launching process or fresh interpreters.

    python benchmarks/rank_start.py OUT.json [RECIPE] [key=value ...] [--repeats N]
    python benchmarks/rank_start.py runs/rank_start.json recipes/quickstart.yaml train.max_steps=4 --repeats 3

Each launch is `python -m distill.train RECIPE ...` as a user runs it, alternately with `DISTILL_RANK_START=spawn`
(each rank imports the stack itself) and the default (on a machine whose ranks see no GPU, they are forked from the
launching process). Per launch: the wall time, the CPU time of the launcher and its ranks together, and the first
metrics line's `startup_s`, and whether the ranks were forked (the launcher says so). Both ways must train the same
run: the losses of every step are compared, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("spawn", "fork")


def launch(mode: str, recipe: str, overrides: list[str], out_dir: Path) -> dict:
    env = {**os.environ, "DISTILL_RANK_START": mode}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "distill.train", recipe, f"output_dir={out_dir}", "overwrite=true",
                           "train.progress=false", *overrides], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"{mode} launch failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    startup = next((m["startup_s"] for m in lines if "startup_s" in m), None)
    losses = [m["loss"] for m in lines if "loss" in m]
    return {"mode": mode, "forked": "ranks forked from this process" in proc.stderr, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "startup_s": startup, "losses": losses}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("recipe", nargs="?", default="recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="distill-rank-start-"))
    runs = [launch(mode, a.recipe, a.overrides, work / mode) for _ in range(a.repeats) for mode in MODES]
    reference = runs[0]["losses"]
    differ = [r["mode"] for r in runs if r["losses"] != reference]
    if differ or not reference:
        raise SystemExit(f"the ways of starting trained different runs ({differ}): {[r['losses'] for r in runs]}")
    summary = {mode: {k: statistics.median(r[k] for r in runs if r["mode"] == mode) for k in ("wall_s", "cpu_s")}
               for mode in MODES}
    result = {"recipe": a.recipe, "overrides": a.overrides, "repeats": a.repeats, "runs": runs, "median": summary,
              "cpu_ratio": summary["spawn"]["cpu_s"] / summary["fork"]["cpu_s"], "same_losses": True}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    for mode in MODES:
        print(f"{mode:5}  wall {summary[mode]['wall_s']:6.2f} s  cpu {summary[mode]['cpu_s']:6.2f} s")
    print(f"same losses at every step; the forked start costs {result['cpu_ratio']:.2f}x less CPU")
    return result


if __name__ == "__main__":
    main()
