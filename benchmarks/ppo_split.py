"""PPO's step split: where a rollout cycle's time goes, in one process, a recipe as PPOTrainer runs it.

    python -m distill.data.reward_task data/synthetic_reward        # the GPU recipe's prompts, first
    python benchmarks/ppo_split.py recipes/gpu_ppo_0.3b.yaml --out ppo_split.json                  # one GPU
    python benchmarks/ppo_split.py recipes/ppo_quickstart.yaml --device cpu --cycles 1 --out t.json   # CPU smoke run

A cycle is one rollout and the ppo.ppo_epochs x ppo.num_minibatches optimizer steps that train on it. Each part is
timed with the device synchronised at its edges (a plain run does not sync there, so its cycle is a little shorter):
* `generation`: the actor sampling the completions (`sample_rollout`);
* `scoring`: the rest of `make_experience`: reward functions or reward model, the actor's, reference's and
  critic's forwards over the rollout, GAE and whitening;
* `actor`, `critic`: each role's forwards in the loss steps, its backwards and its optimizer steps;
* `rest`: the loop around them (loss arithmetic outside the models, the step's one all-reduce).
The first --warmup cycles (compile, graph capture) are reported apart from the timed ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("generation", "scoring", "actor", "critic")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a `trainer: ppo` recipe (a path or a shipped name)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--warmup", type=int, default=1, help="untimed cycles first")
    p.add_argument("--cycles", type=int, default=3, help="timed cycles")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench_ppo_split"))
    p.add_argument("--out", default="ppo_split.json")
    return p.parse_args(argv)


def time_forwards(role, sync) -> None:
    """Make `role` (a RoleModel) add the synchronised seconds of its forwards to `role.forward_s`. Its class
    becomes a subclass with a timed `__call__`, so the code that checks what a role is sees the same role."""
    base = type(role)

    class TimedRole(base):
        def __call__(self, *args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = base.__call__(self, *args, **kwargs)
            sync()
            self.forward_s += time.perf_counter() - t0
            return out

    role.__class__ = TimedRole
    role.forward_s = 0.0


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts CUDA
    sys.path.insert(0, str(REPO))
    import torch

    from distill.trainers import load_recipe

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(fn, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        return time.perf_counter() - t0, out

    overrides = [f"output_dir={a.workdir}", "overwrite=true", "launch.num_processes=1", "train.max_steps=100000",
                 "train.log_every=100000", "train.progress=false", "data.eval=null", *a.set]
    if a.device == "cpu":
        overrides.append("launch.device=cpu")
    recipe, trainer_cls = load_recipe(a.recipe, overrides)
    if trainer_cls.name != "ppo":
        sys.exit(f"{a.recipe} is a `trainer: {trainer_cls.name}` recipe; this benchmark times PPO's parts")
    t0 = time.perf_counter()
    trainer = trainer_cls(recipe)
    build_s = time.perf_counter() - t0
    trainer.start_run_dir()

    spent = dict.fromkeys(PARTS, 0.0)
    forwards = {name: trainer.trainables[name] for name in ("actor", "critic")}
    for role in forwards.values():
        time_forwards(role, sync)
    for name, role in trainer.trainables.items():  # the loop's backward and optimizer step of each role
        for method in ("backward", "step"):
            def wrapped(*args, _fn=getattr(role, method), _name=name, **kwargs):
                t, out = timed(_fn, *args, **kwargs)
                spent[_name] += t
                return out
            setattr(role, method, wrapped)
    sample, experience = trainer.sample_rollout, trainer.make_experience

    def timed_sample(*args, **kwargs):
        t, out = timed(sample, *args, **kwargs)
        spent["generation"] += t
        return out

    def timed_experience(*args, **kwargs):
        before = {n: r.forward_s for n, r in forwards.items()}
        gen = spent["generation"]
        t, out = timed(experience, *args, **kwargs)
        spent["scoring"] += t - (spent["generation"] - gen)
        for n, r in forwards.items():  # the rollout's forwards are scoring, not the role's update
            r.forward_s = before[n]
        return out

    trainer.sample_rollout, trainer.make_experience = timed_sample, timed_experience
    p = recipe.ppo
    per_cycle = p.ppo_epochs * p.num_minibatches
    batches = trainer.data.train_batches()
    cycles, step = [], 0
    for c in range(a.warmup + a.cycles):
        for k in spent:
            spent[k] = 0.0
        for role in forwards.values():
            role.forward_s = 0.0
        total = 0.0
        for _ in range(per_cycle):
            step += 1
            t, _ = timed(trainer.train_step, step, next(batches))
            total += t
        parts = {**spent, "actor": spent["actor"] + forwards["actor"].forward_s,
                 "critic": spent["critic"] + forwards["critic"].forward_s}
        parts["rest"] = total - sum(parts.values())
        row = {"cycle": c + 1, "warmup": c < a.warmup, "steps": per_cycle, "cycle_s": total,
               "seconds": parts, "share": {k: v / total for k, v in parts.items()}}
        cycles.append(row)
        print(f"cycle {c + 1}{' (warm-up)' if row['warmup'] else ''}: {total:.3f} s = "
              + ", ".join(f"{k} {v:.3f} s ({100 * v / total:.0f}%)" for k, v in parts.items()), flush=True)
    timed_rows = [r for r in cycles if not r["warmup"]]
    mean = {k: sum(r["seconds"][k] for r in timed_rows) / len(timed_rows) for k in (*PARTS, "rest")}
    cycle_s = sum(r["cycle_s"] for r in timed_rows) / len(timed_rows)
    out = {"recipe": a.recipe, "overrides": overrides, "command": " ".join(sys.argv),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "build_s": build_s,
           "placement": {n: pl.placement or f"ZeRO-{pl.zero_stage}" for n, pl in trainer.plans.items()},
           "completions_per_rollout": trainer.rollout_layout()[0], "steps_per_cycle": per_cycle, "cycles": cycles,
           "mean": {"cycle_s": cycle_s, "seconds": mean, "share": {k: v / cycle_s for k, v in mean.items()}}}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["mean"]))


if __name__ == "__main__":
    main()
