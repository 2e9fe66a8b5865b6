"""Run on 2 processes: a teacher cache written by both ranks, and students trained from it against live teachers.

    accelerate launch --num_processes 2 --use_deepspeed -m tests.scripts.cache_check ASSETS_DIR OUT_JSON MODE [key=value ...]

MODE `whole`: the cache holds every token's fp32 log-probability (k = vocabulary); a student trained from it and one
trained against the live ZeRO-3 teacher log the same losses, gradient norms and evaluation. MODE `top_k`: packed rows,
the teacher's top 12 in fp32 read as `kd.top_k: 8`, the chunked loss, against the live loss with `kd.top_k: 8`; a run
from the cache stopped at step 3 and resumed ends with the weights of an uninterrupted one. Both modes then delete
shards (and leave a temporary file, as a killed writer would) and write again: only the missing shards are written,
byte for byte the same.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def run(raw: dict, log=lambda *a: None):
    """Train one recipe in these processes; (history, metrics lines, student weights on rank 0)."""
    from distill.config.recipe import validate_recipe
    from distill.runtime.roles import forget_roles
    from distill.trainers.distill import DistillTrainer

    t = DistillTrainer(validate_recipe(raw, DistillTrainer), log=log)
    history = t.train()
    weights = {k: v.detach().clone() for k, v in t.student.state_dict().items()}
    lines = [json.loads(x) for x in (Path(raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    built = sorted(t.models)
    forget_roles()
    return history, lines, weights, built


def write(raw: dict) -> dict:
    from distill.config.recipe import validate_recipe
    from distill.runtime.roles import forget_roles
    from distill.trainers.cache_writer import CacheWriterRoles, write_cache

    manifest = write_cache(validate_recipe(raw, CacheWriterRoles), log=lambda *a: None)
    forget_roles()
    return manifest


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from distill.config.recipe import deep_merge, parse_overrides
    from distill.teacher_cache.store import shard_path, sidecar_path
    from tests.helpers import end_of_script, tiny_assets, tiny_recipe

    args = argv or sys.argv[1:]
    root, out_json, mode, overrides = Path(args[0]), Path(args[1]), args[2], args[3:]
    assets = tiny_assets(root)
    here = out_json.parent
    vocab = len(AutoTokenizer.from_pretrained(assets["tokenizer"]))
    cache = {"dir": str(here / "cache"), "rows_per_shard": 40 if mode == "whole" else 12}
    if mode == "whole":
        cache.update(k=vocab, values="fp32", ids="packed")
        kd = {"loss": "forward_kl", "alpha": 0.5}
        extra = {}
    else:
        cache.update(k=12, values="fp32", ids="int32")  # kd.top_k: 8 reads the first 8 of them
        kd = {"loss": "generalized_jsd", "params": {"beta": 0.3}, "alpha": 0.2, "top_k": 8, "chunked": True, "chunk_size": 16}
        extra = {"data": {"packing": True}}
    base = deep_merge(tiny_recipe(assets, here / "run", overwrite=True, **extra), parse_overrides(overrides))
    base["student"]["scheduler"] = {"name": "constant"}  # the same schedule whether a run is 3 or 6 steps long
    writer = deep_merge(base, {"kd": {**kd, "cache": cache}})
    manifest = write(writer)
    shards = {s: [e["sha256"] for e in manifest["shards"][s]] for s in manifest["shards"]}

    rank = dist.get_rank()
    dist.barrier()
    if rank == 0:  # as a kill leaves it: shards gone, one without its sidecar, a temporary file, the manifest unfinished
        m = json.loads((here / "cache" / "manifest.json").read_text())
        m["complete"] = False
        (here / "cache" / "manifest.json").write_text(json.dumps(m))
        sidecar_path(here / "cache", "train", 1).unlink()
        shard_path(here / "cache", "train", 2).unlink()
        sidecar_path(here / "cache", "train", 2).unlink()
        (here / "cache" / "train" / ".shard_00003.safetensors.host-1.tmp").write_bytes(b"half")
    dist.barrier()
    kept = shard_path(here / "cache", "train", 0).stat().st_mtime_ns
    again = write(writer)
    rewritten = {s: [e["sha256"] for e in again["shards"][s]] for s in again["shards"]}

    cached = deep_merge(base, {"output_dir": str(here / "from_cache"), "kd": {**kd, "cache": {"dir": cache["dir"]}}})
    cached.pop("teacher")  # a recipe whose teacher is the cache needs no teacher block, and names its tokenizer
    cached["data"]["tokenizer"] = str(here / "cache" / "tokenizer")
    live = deep_merge(base, {"output_dir": str(here / "live"), "kd": kd})
    h_cache, m_cache, w_cache, built = run(cached)
    h_live, m_live, w_live, _ = run(live)
    result = {"vocab": vocab, "shards_same": rewritten == shards, "untouched_shard_kept": kept ==
              shard_path(here / "cache", "train", 0).stat().st_mtime_ns, "built": built,
              "bytes_per_token": manifest["splits"]["train"]["bytes_per_token"],
              "shards": {s: len(v) for s, v in shards.items()}, "history": {"cache": h_cache, "live": h_live},
              "steps": {"cache": [m for m in m_cache if "loss" in m], "live": [m for m in m_live if "loss" in m]},
              "max_weight_diff": max(float((w_cache[k] - w_live[k]).abs().max()) for k in w_live)}
    if mode == "top_k":
        stopped = deep_merge(cached, {"output_dir": str(here / "resumed"), "train": {"max_steps": 3, "save_every": 3}})
        run(stopped)
        _, m_resumed, w_resumed, _ = run(deep_merge(stopped, {"resume": True, "train": {"max_steps": 6},
                                                              "resume_allow": ["train.max_steps"]}))
        result["resumed_steps"] = [m["step"] for m in m_resumed if "loss" in m]
        result["resumed_equal"] = all(torch.equal(w_resumed[k], w_cache[k]) for k in w_cache)
    if rank == 0:
        out_json.write_text(json.dumps(result))
    end_of_script()


if __name__ == "__main__":
    main()
