"""How long building a random-init role takes, on one CPU thread (as torchrun sets it for each rank) and then
moved to the GPU, against building it on the GPU directly. The trainer builds config-only roles on the CPU
today; this measures what building them on the GPU would save at start-up (docs/performance.md).

    python benchmarks/build_time.py                       # the 0.3B/1.4B pair's teacher, one GPU
    python benchmarks/build_time.py --pair 1b-7b --device cpu   # CPU only: the CPU build alone
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from distill_setups import LLAMA, PAIRS


def built_in(where: str, config, target: str) -> float:
    from transformers import AutoModelForCausalLM

    sync = torch.cuda.synchronize if target == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.device(where):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to(target)
    sync()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    from transformers import LlamaConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="0.3b-1.4b", choices=sorted(PAIRS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torchrun gives each rank 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    teacher = {**LLAMA, **PAIRS[a.pair][1], "max_position_embeddings": 1024}  # LLAMA: vocab 32k, untied head
    config = LlamaConfig(**{k: v for k, v in teacher.items() if k != "model_type"})
    result = {"pair": a.pair, "threads": a.threads, "cpu_s": round(built_in("cpu", config, a.device), 2)}
    if a.device == "cuda":
        result["gpu_s"] = round(built_in("cuda", config, "cuda"), 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
