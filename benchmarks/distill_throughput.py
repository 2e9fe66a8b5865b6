"""Distillation throughput: the naive two-plugin loop against DistillTrainer, per teacher placement.

    accelerate launch --num_processes 2 benchmarks/distill_throughput.py --pair 0.3b-1.4b \\
        --micro-batch 4 8 --modes naive sharded replicated --out distill_throughput.json
    torchrun --nproc_per_node 2 benchmarks/distill_throughput.py ...        # the same
    python benchmarks/distill_throughput.py --pair tiny --device cpu --out t.json  # CPU smoke run, 1 process
    torchrun --standalone --nproc_per_node 2 benchmarks/distill_throughput.py --pair tiny --device cpu  # 2 on CPU
    (on CPU, `accelerate launch --num_processes 2` without --use_deepspeed starts one process)

Options worth knowing: --student-zero/--teacher-zero JSON merged into our modes' zero_optimization
(to try a knob), --set KEY=VALUE recipe overrides for our modes (e.g. train.overlap_frozen=false,
student.compile=true), --profile PREFIX (per mode and micro-batch, two steps under torch.profiler: how
much of the step the GPU was busy, then the top kernels and ops), --cprofile PREFIX (the Python
functions the host spends the step in). `--pair 0.3b-1.4b-skeleton --device cpu` runs the 0.3B/1.4B
pair's layers at width 64: almost no arithmetic, so on CPU its step time is the host-side cost that
bounds the small pair on GPUs (docs/performance.md).

Every mode runs in the same processes, one after the other, on the same random batches (token ids
drawn once from --seed, no padding) and models of the same configs, random init:

* `naive`: what accelerate documents for several models: ONE Accelerator holding two
  DeepSpeedPlugins, student ZeRO-2 (configs/deepspeed/zero2.json, reduce bucket H x H as
  accelerate fills `auto`) and teacher ZeRO-3
  (configs/deepspeed/zero3.json with the bucket sizes accelerate/HF derive from the hidden size,
  DeepSpeed's default live-parameter limits), `state.select_deepspeed_plugin` by hand around the
  teacher forward, `accelerator.backward` + `optimizer.step` in a plain loop.
* `sharded`, `replicated`, `offload`, `auto`, and two ablations of `sharded`: `sharded_noleaf`
  (the tuned ZeRO-3 settings, each module gathered on its own) and `sharded_untuned` (naive's
  teacher config, no leaf modules: our loop and role switch alone): DistillTrainer's step (`RoleTrainer.train_step`:
  `loss_step` + the student's backward and step, the token all-reduces) on roles built by
  RoleManager from a recipe made in code, with `teacher.placement` set to the mode (`auto`: what
  the planner picks; the JSON says which).

Both compute the same loss: 0.5 * CE + 0.5 * forward KL on the full [B, T, V] logits in fp32.

Measured per mode and micro-batch (after --warmup untimed steps):
* tokens/s/GPU: micro_batch * seq_len * steps / wall time of --steps steps (slowest rank), one GPU's share;
* MFU = tokens/s/GPU * F / peak, with F, FLOPs per token,
      F = 6 * N_s + 12 * L_s * S * d_s  +  2 * N_t + 4 * L_t * S * d_t
  N = the parameters that take part in matmuls (all but the input embedding; a tied head counts once),
  L layers, d = heads * head_dim, S = seq_len: 2N per token forward, 4N backward (student only),
  and attention scores + weighted values 4 * S * d per layer forward, x3 with backward (full S x S,
  the causal mask not subtracted: the PaLM convention). Peak: 989 TFLOP/s dense bf16 for H100 SXM
  and H200 (same tensor cores), 756 for H100 PCIe; --peak-tflops otherwise (None on CPU unless given);
* peak memory per rank: torch.cuda.max_memory_allocated from just before the mode's models are built;
* time split: a separate pass of --timing-steps steps running the same calls phase by phase, with
  torch.cuda.synchronize + perf_counter around each: role switches (plugin changes around the teacher
  forward), teacher forward, student forward, loss, backward, optimizer step. The sum is a little
  above the throughput step (the synchronisations stop overlap), so fractions are of that sum.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_setups import PAIRS, Naive, Ours, make_batches, model_configs, recipe_for, reset_between_modes  # noqa: E402

PHASES = ("role_switch", "teacher_forward", "student_forward", "loss", "backward", "optimizer")
OURS = ("auto", "sharded", "replicated", "offload", "sharded_untuned", "sharded_noleaf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=list(PAIRS), default="0.3b-1.4b")
    p.add_argument("--modes", nargs="+", choices=["naive", *OURS], default=["naive", "sharded", "replicated"])
    p.add_argument("--micro-batch", nargs="+", type=int, default=[4, 8])
    p.add_argument("--seq-len", type=int, default=None, help="default 1024 (tiny: 32)")
    p.add_argument("--vocab", type=int, default=None, help="default 32000 (tiny: 256)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timing-steps", type=int, default=3)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="per device; default from the device name")
    p.add_argument("--student-zero", type=json.loads, default={}, help="JSON merged into the student's zero_optimization (our modes)")
    p.add_argument("--teacher-zero", type=json.loads, default={}, help="JSON merged into the teacher's zero_optimization (our modes)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for our modes, as on the distill.train command line (e.g. train.overlap_frozen=false)")
    p.add_argument("--label", default=None, help="a name for this launch's variant, kept in the JSON")
    p.add_argument("--profile", default=None, help="write torch.profiler's top kernels/ops of 2 steps (rank 0) to PROFILE.<mode>.<mb>.txt")
    p.add_argument("--cprofile", default=None, help="write cProfile's top Python functions of --steps steps (rank 0) to CPROFILE.<mode>.<mb>.txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="distill_throughput.json")
    a = p.parse_args(argv)
    tiny = a.pair in ("tiny", "0.3b-1.4b-skeleton")
    a.seq_len = a.seq_len or (32 if tiny else 1024)
    a.vocab = a.vocab or (256 if tiny else 32000)
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    return a


def flops_per_token(cfg: dict, n_params: int, seq_len: int, trainable: bool) -> float:
    """See the module docstring: 6N (2N frozen) plus attention 12 L S d (4 L S d frozen)."""
    matmul = n_params - (0 if cfg.get("tie_word_embeddings") else cfg["vocab_size"] * cfg["hidden_size"])
    d = cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    attn = 4 * cfg["num_hidden_layers"] * seq_len * d
    return (6 * matmul + 3 * attn) if trainable else (2 * matmul + attn)


def peak_flops(a) -> tuple[float | None, str]:
    if a.peak_tflops:
        return a.peak_tflops * 1e12, "given"
    if a.device != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return 756e12, name
    if "H100" in name or "H200" in name:
        return 989e12, name
    return None, name


# -- process-wide helpers ---------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def all_gather_float(x: float, device) -> list[float]:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [x]
    out = [torch.zeros_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t)
    return [float(o) for o in out]


def measure(a, setup, mb: int, device) -> dict:
    batches = make_batches(a, mb, max(a.steps, a.warmup, a.timing_steps), device)
    for b in batches[:a.warmup]:
        setup.step(b)
    sync(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for i in range(a.steps):
        setup.step(batches[i % len(batches)])
    sync(device)
    elapsed = max(all_gather_float(time.perf_counter() - t0, device))
    split = dict.fromkeys(PHASES, 0.0)
    last = [0.0]

    def tick(phase):
        sync(device)
        now = time.perf_counter()
        if phase is not None:
            split[phase] += now - last[0]
        last[0] = now

    for i in range(a.timing_steps):
        setup.phases(batches[i % len(batches)], tick)
    split = {k: v / max(1, a.timing_steps) for k, v in split.items()}
    if a.profile:
        profile(a, setup, batches[:2], f"{a.profile}.{a.current_mode}.{mb}.txt")
    if a.cprofile:
        python_profile(a, setup, batches, device, f"{a.cprofile}.{a.current_mode}.{mb}.txt")
    step_s = elapsed / a.steps
    return {"micro_batch": mb, "step_s": step_s, "tokens_per_s_per_gpu": mb * a.seq_len / step_s,
            "split_s": split, "split_frac": {k: v / max(sum(split.values()), 1e-12) for k, v in split.items()},
            "role_switch_frac_of_step": split["role_switch"] / step_s}


def profile(a, setup, batches, path) -> None:
    """Every rank runs the steps (they hold collectives); rank 0 writes the table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=acts) as prof:
        for b in batches:
            setup.step(b)
        sync(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if int(os.environ.get("RANK", 0)) == 0:
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70)
        Path(path).write_text(gpu_busy(prof, len(batches)) + "\n\n" + table)


def python_profile(a, setup, batches, device, path) -> None:
    """Where the host's time goes: cProfile over --steps steps on rank 0 (every rank runs them)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0:
        prof.enable()
    for i in range(a.steps):
        setup.step(batches[i % len(batches)])
    sync(device)
    if rank0:
        prof.disable()
        out = io.StringIO()
        for key in ("tottime", "cumulative"):
            out.write(f"== {a.steps} steps, by {key} ==\n")
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(45)
        Path(path).write_text(out.getvalue())


def gpu_busy(prof, steps: int) -> str:
    """Per step: the wall span of the GPU's work and the time some kernel or copy was running in it
    (the union over streams); the gap between the two is the GPU waiting on the host."""
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                   if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0)
    if not spans:
        return "no GPU events"
    busy, (cur_s, cur_e) = 0, spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    wall = spans[-1][1] - spans[0][0]
    return (f"GPU busy {busy / steps / 1e6:.1f} ms of a {wall / steps / 1e6:.1f} ms span per step "
            f"({100 * busy / wall:.0f}%), {len(spans) / steps:.0f} kernels and copies per step")


def main(argv=None) -> dict:
    a = parse_args(argv)
    from distill.plan.planner import plan_roles
    from distill.trainers.distill import DistillTrainer

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    peak, device_name = peak_flops(a)
    s_cfg, t_cfg = model_configs(a)
    rows, info = [], {}
    for mode in a.modes:
        a.current_mode = mode
        recipe = recipe_for(a, mode, a.micro_batch[0])
        plans = plan_roles(recipe, DistillTrainer, world_size=world, vocab_size=None)
        if mode == "naive":
            plans["teacher"].placement, plans["teacher"].placement_reason = "zero3-default", "accelerate's derived settings"
        info.setdefault("params", {n: p.num_params for n, p in plans.items()})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        setup = Naive(a, plans, device) if mode == "naive" else Ours(a, plans, recipe, device, mode)
        weights = torch.cuda.memory_allocated(device) - base if device.type == "cuda" else 0
        tp = plans["teacher"]
        for mb in a.micro_batch:
            r = measure(a, setup, mb, device)
            peak_mem = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
            r.update(mode=mode, teacher_placement=tp.placement, teacher_zero_stage=tp.zero_stage,
                     placement_reason=tp.placement_reason, peak_mem_gib_per_rank=[m / 2**30 for m in all_gather_float(peak_mem, device)],
                     models_mem_gib_per_rank=[m / 2**30 for m in all_gather_float(weights, device)],
                     student_zero=plans["student"].ds_config["zero_optimization"], teacher_zero=tp.ds_config["zero_optimization"])
            rows.append(r)
            if rank == 0:
                print(json.dumps(r), flush=True)
        setup.close()
        del setup
        reset_between_modes()
        result = report(a, rows, info, s_cfg, t_cfg, peak, device_name, world)
        if rank == 0:  # after every mode, so a run cut short keeps what it measured
            Path(a.out).write_text(json.dumps(result, indent=2))
    if rank == 0:
        print(table(result))
    return result


def report(a, rows, info, s_cfg, t_cfg, peak, device_name, world) -> dict:
    n_s, n_t = info["params"]["student"], info["params"]["teacher"]
    fpt = flops_per_token(s_cfg, n_s, a.seq_len, True) + flops_per_token(t_cfg, n_t, a.seq_len, False)
    for r in rows:
        r["mfu"] = r["tokens_per_s_per_gpu"] * fpt / peak if peak else None
    return {"device": device_name, "world_size": world, "pair": a.pair, "label": a.label, "overrides": a.set, "student_params": n_s, "teacher_params": n_t,
              "seq_len": a.seq_len, "vocab": a.vocab, "dtype": a.dtype, "steps": a.steps, "warmup": a.warmup,
              "timing_steps": a.timing_steps, "flops_per_token": fpt, "peak_flops_per_gpu": peak,
            "versions": _versions(), "results": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Per micro-batch: each mode's tokens/s over naive's, and the sharded teacher forward over the replicated one."""
    out = {}
    for mb in sorted({r["micro_batch"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["micro_batch"] == mb}
        s = {}
        if "naive" in by:
            s.update({f"{m}_over_naive_tokens": r["tokens_per_s_per_gpu"] / by["naive"]["tokens_per_s_per_gpu"]
                      for m, r in by.items() if m != "naive"})
        if "replicated" in by:
            rep = by["replicated"]["split_s"]["teacher_forward"]
            s.update({f"{m}_teacher_forward_over_replicated": r["split_s"]["teacher_forward"] / rep for m, r in by.items() if m != "replicated"})
        out[str(mb)] = s
    return out


def table(res: dict) -> str:
    head = ("mode", "teacher", "mb", "tok/s/GPU", "MFU", "step s", "peak GiB", *PHASES)
    lines = [f"{res['pair']}: student {res['student_params'] / 1e6:.0f}M, teacher {res['teacher_params'] / 1e6:.0f}M, "
             f"{res['world_size']} x {res['device']}, seq {res['seq_len']}, {res['dtype']}",
             " | ".join(head)]
    for r in res["results"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(" | ".join([r["mode"], f"{r['teacher_placement']} (Z{r['teacher_zero_stage']})", str(r["micro_batch"]),
                                 f"{r['tokens_per_s_per_gpu']:.0f}", mfu, f"{r['step_s']:.3f}", f"{max(r['peak_mem_gib_per_rank']):.2f}",
                                 *(f"{1000 * r['split_s'][p]:.1f}ms" for p in PHASES)]))
    lines.append(json.dumps(res["summary"], indent=1))
    return "\n".join(lines)


def _versions() -> dict:
    import accelerate
    import deepspeed
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "accelerate": accelerate.__version__,
            "transformers": transformers.__version__}


if __name__ == "__main__":
    main()
