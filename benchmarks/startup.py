"""Start-up paid once: a recipe launched twice with the same compile cache (`launch.compile_cache`), first empty.

    python benchmarks/startup.py OUT.json RECIPE [key=value ...]
    python benchmarks/startup.py OUT.json gpu_onpolicy_0.3b_1.4b launch.num_processes=1 train.max_steps=2

Each launch is `python -m distill.train RECIPE ...` as a user runs it; its first metrics line carries `startup_s`
(process start to the end of the first step: loading, compiling, graph capture) and `first_step_s`. The second
launch finds what the first compiled. Writes both launches' figures, the ratio of their first steps, and the
wall time of each launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def launch(recipe: str, overrides: list[str], out_dir: Path, cache: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distill.train", recipe, f"output_dir={out_dir}", "overwrite=true",
                    "train.progress=false", *overrides], check=True, env=env)
    wall = time.perf_counter() - began
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in lines if "startup_s" in m)
    summary = json.loads((out_dir / "summary.json").read_text()).get("throughput", {})
    return {"wall_s": wall, "startup_s": first["startup_s"], "first_step_s": first["first_step_s"],
            "steady_tokens_per_s": summary.get("steady_tokens_per_s")}


def main(argv: list[str] | None = None) -> None:
    out, recipe, *overrides = argv or sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="distill-startup-"))
    cache = work / "compile_cache"
    runs = [launch(recipe, overrides, work / "run", cache) for _ in range(2)]
    result = {"recipe": recipe, "overrides": overrides, "first_launch": runs[0], "second_launch": runs[1],
              "first_step_ratio": runs[1]["first_step_s"] / runs[0]["first_step_s"],
              "startup_ratio": runs[1]["startup_s"] / runs[0]["startup_s"]}
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
