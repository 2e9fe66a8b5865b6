"""Offline distillation's speed: a student step from a teacher cache against one beside the live teacher and one on
hard labels, and writing the cache against the teacher's bare forward.

    python benchmarks/teacher_cache_throughput.py --pair 0.3b-1.4b --micro-batch 8 \\
        --set student.compile=true teacher.compile=true --out teacher_cache_throughput.json     # one GPU
    python benchmarks/teacher_cache_throughput.py --pair tiny --device cpu --out t.json          # CPU smoke run

Every mode runs in this process, one after the other, on the same random batches (token ids from --seed, no padding)
and models of the pair's configs (benchmarks/distill_setups.py), random init:

* `student` part, DistillTrainer's step (`RoleTrainer.train_step`: loss, backward, optimizer step):
  `live`: the teacher's forward beside the student's, the teacher placed as --teacher-placement;
  `cache:<option>`: no teacher; the batches carry records of a cache stored as the option of
  benchmarks/teacher_cache_compression.py says (`kd.cache`), encoded from random log-probabilities (their values do
  not change the work), decoded on the device in the step; `hard`: no teacher, `kd.alpha: 1` (cross-entropy alone).
  The loss is 0.5 CE + 0.5 forward KL (the cache's tail rule: --tail).
* `write` part, the teacher alone (placed as the cache writer plans it): `forward`: its forward with logits, as a
  live teacher runs in training; `records`: `distill.trainers.cache_writer.teacher_records` (final hidden states, the head
  chunk by chunk, log-softmax and encoding) for each option; `records+disk`: the same, copied to the host and written
  to shards in a temporary directory, as the writer does.

Tokens/s per GPU: micro_batch * seq_len * steps / the wall time of --steps steps after --warmup, slowest rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_setups import PAIRS, _NoData, load_fn, make_batches, recipe_for, reset_between_modes  # noqa: E402
from teacher_cache_compression import OPTIONS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=list(PAIRS), default="0.3b-1.4b")
    p.add_argument("--parts", nargs="+", choices=["student", "write"], default=["student", "write"])
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), default=["top32_sqrt8", "top24_sqrt12+sampled32"])
    p.add_argument("--tail", choices=["renormalize", "bucket"], default="bucket")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default 1024 (tiny: 32)")
    p.add_argument("--vocab", type=int, default=None, help="default 32000 (tiny: 256)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--teacher-placement", choices=["replicated", "sharded"], default="replicated")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (e.g. student.compile=true)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="teacher_cache_throughput.json")
    a = p.parse_args(argv)
    tiny = a.pair in ("tiny", "0.3b-1.4b-skeleton")
    a.seq_len = a.seq_len or (32 if tiny else 1024)
    a.vocab = a.vocab or (256 if tiny else 32000)
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    a.student_zero, a.teacher_zero = {}, {}
    return a


def codec_of(option: str, vocab: int):
    from distill.teacher_cache.codec import Codec

    fmt, k, samples, values, ids = OPTIONS[option]
    return Codec(fmt, k, samples, values, ids, vocab)


def cache_section(option: str, tail: str) -> dict:
    fmt, k, samples, values, ids = OPTIONS[option]
    return {"dir": "unused_cache", "format": fmt, "k": k, "samples": samples, "values": values, "ids": ids, "tail": tail}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches, a, device) -> float:
    """Seconds per step over --steps steps after --warmup, the slowest rank's."""
    for b in batches[:a.warmup]:
        step(b)
    sync(device)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(batches[i % len(batches)])
    sync(device)
    elapsed = torch.tensor([time.perf_counter() - t0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed) / a.steps


class Student:
    """DistillTrainer's step on roles built from a recipe made in code; the batches come from the benchmark."""

    def __init__(self, recipe, plans, device, codec=None):
        from distill.trainers.distill import DistillTrainer

        class Bench(DistillTrainer):
            def build_data(self):
                if codec is not None:  # what `kd.cache` reading sets up, without a cache on disk
                    self.cached_teacher = types.SimpleNamespace(codecs={"train": codec})
                return _NoData()

            def load_model(self, plan):
                return load_fn(device)(plan)

            @classmethod
            def plan_notes(cls, recipe, plans, world_size):
                return []

        self.t, self.n = Bench(recipe, plans=plans), 0

    def step(self, batch):
        self.n += 1
        self.t.train_step(self.n, [batch])

    def close(self):
        self.t.close()
        for m in self.t.models.values():
            m.engine.destroy()
        del self.t


def with_records(batches, codec, vocab, seed):
    """The batches with `teacher_records` of random teacher log-probabilities at every predicted position."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        valid = b["labels"] != -100
        logp = torch.randn(int(valid.sum()), vocab, generator=g).mul_(3).log_softmax(-1).to(b["labels"].device)
        records = torch.zeros(*valid.shape, codec.record_bytes, dtype=torch.uint8, device=b["labels"].device)
        records[valid] = codec.encode(logp, generator=torch.Generator(device=logp.device).manual_seed(seed))
        out.append({**b, "teacher_records": records})
    return out


def student_part(a, device, world) -> list[dict]:
    from distill.plan.planner import plan_roles
    from distill.trainers.distill import DistillTrainer

    batches = make_batches(a, a.micro_batch, max(a.steps, a.warmup), device)
    rows = []
    modes = [("live", None), *((f"cache:{o}", o) for o in a.options), ("hard", None)]
    for mode, option in modes:
        if mode == "live":
            extra = {}
        else:  # no teacher: the recipe reads a cache
            extra = {"kd": {"cache": cache_section(option or a.options[0], a.tail), **({"alpha": 1.0} if mode == "hard" else {})},
                     "data": {"tokenizer": "unused"}}
        recipe = recipe_for(a, a.teacher_placement, a.micro_batch, extra)
        plans = plan_roles(recipe, DistillTrainer, world_size=world, vocab_size=None)
        codec = codec_of(option, a.vocab) if option else None
        setup = Student(recipe, plans, device, codec or (codec_of(a.options[0], a.vocab) if mode == "hard" else None))
        mine = with_records(batches, codec, a.vocab, a.seed) if codec else batches
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s = timed(setup.step, mine, a, device)
        row = {"part": "student", "mode": mode, "built": sorted(setup.t.models), "step_s": step_s,
               "tokens_per_s_per_gpu": a.micro_batch * a.seq_len / step_s,
               "bytes_per_token": codec.record_bytes if codec else None,
               "teacher_placement": plans["teacher"].placement if "teacher" in plans else None}
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
        print(f"student {mode:32s} {row['tokens_per_s_per_gpu']:12.0f} tok/s/GPU  ({step_s * 1e3:.1f} ms a step)", flush=True)
        setup.close()
        reset_between_modes()
    return rows


def write_part(a, device, world) -> list[dict]:
    from distill.runtime.roles import RoleManager
    from distill.teacher_cache.store import write_shard
    from distill.trainers.cache_writer import plan_teacher, teacher_records

    recipe = recipe_for(a, "auto", a.micro_batch, {"kd": {"cache": cache_section(a.options[0], a.tail)},
                                                   "data": {"tokenizer": "unused"}, "teacher": {"placement": "auto"}})
    plan = plan_teacher(recipe, world_size=world, vocab_size=None)
    manager = RoleManager({"teacher": plan})
    torch.manual_seed(a.seed)
    teacher = manager.build("teacher", load_fn(device))
    batches = make_batches(a, a.micro_batch, max(a.steps, a.warmup), device)
    rows = []

    def forward(b):
        teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [B, T, V], as a live teacher

    runs = [("forward", None, forward)]
    with tempfile.TemporaryDirectory() as tmp:
        for option in a.options:
            codec = codec_of(option, a.vocab)
            runs.append((f"records:{option}", codec, lambda b, c=codec: teacher_records(teacher, b, c)))

            def to_disk(b, c=codec, counter=[0]):  # noqa: B006 -- a counter of shards written
                records = teacher_records(teacher, b, c).cpu()
                counter[0] += 1
                offsets = torch.arange(b["labels"].shape[0] + 1) * b["labels"].shape[1]
                write_shard(Path(tmp), "train", counter[0], records=records, row_offsets=offsets,
                            row_hash=torch.zeros(b["labels"].shape[0], dtype=torch.int64), identity="benchmark")

            runs.append((f"records+disk:{option}", codec, to_disk))
        for mode, codec, step in runs:
            step_s = timed(step, batches, a, device)
            rows.append({"part": "write", "mode": mode, "step_s": step_s, "tokens_per_s_per_gpu": a.micro_batch * a.seq_len / step_s,
                         "bytes_per_token": codec.record_bytes if codec else None, "teacher_placement": plan.placement})
            print(f"write   {mode:32s} {rows[-1]['tokens_per_s_per_gpu']:12.0f} tok/s/GPU  ({step_s * 1e3:.1f} ms a batch)", flush=True)
    teacher.engine.destroy()
    reset_between_modes()
    return rows


def main(argv=None) -> dict:
    a = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = []
    if "student" in a.parts:
        rows += student_part(a, device, world)
    if "write" in a.parts:
        rows += write_part(a, device, world)
    by = {r["mode"]: r["tokens_per_s_per_gpu"] for r in rows if r["part"] == "student"}
    summary = {f"{m}_over_live": v / by["live"] for m, v in by.items() if m != "live"} if "live" in by else {}
    w = {r["mode"]: r["tokens_per_s_per_gpu"] for r in rows if r["part"] == "write"}
    if "forward" in w:
        summary.update({f"{m}_over_forward": v / w["forward"] for m, v in w.items() if m != "forward"})
    result = {"command": "python benchmarks/teacher_cache_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world_size": world,
              "pair": a.pair, "seq_len": a.seq_len, "vocab": a.vocab, "micro_batch": a.micro_batch, "dtype": a.dtype,
              "tail": a.tail, "results": rows, "summary": summary}
    if int(os.environ.get("RANK", 0)) == 0:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
