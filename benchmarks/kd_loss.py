"""Peak memory and time of forward+backward: naive full-vocab KD vs ``chunked_kd_loss``.

GPU:   python benchmarks/kd_loss.py --device cuda --vocab 32000 128256 152064 \
           --tokens 1024 8192 16384 --hidden 2048 4096 --dtype bf16 --chunk-size 1024 --out results.json
Smoke: python benchmarks/kd_loss.py --device cpu --vocab 1000 --tokens 256 --hidden 64

"naive" materialises [N, V] fp32 logits for both models (what a plain
``model(...).logits.float()`` pipeline does) and calls the registered KD loss; "chunked"
goes from hidden states straight to the loss. Peak memory is
``max_memory_allocated`` during one forward+backward minus what the inputs already held
(so it counts logits, loss temporaries and the gradients of the student's hidden states
and lm_head weight). Time is the median of ``--reps`` timed runs after ``--warmup``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import statistics
import time

import torch

from distill.losses import chunked_kd_loss, get_kd_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 152064])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 16384])
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--methods", nargs="+", choices=["naive", "chunked"], default=["naive", "chunked"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file; results are appended to the list it holds")
    return p.parse_args(argv)


def make_inputs(n, v, h, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Scaled so logits have O(1) spread, like a trained lm_head.
    mk = lambda *shape: (torch.randn(*shape, generator=g) / h**0.5).to(device=device, dtype=dtype)  # noqa: E731
    h_s = (mk(n, h) * h**0.5).requires_grad_()
    w_s = mk(v, h).requires_grad_()
    h_t = mk(n, h) * h**0.5
    w_t = mk(v, h)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -100  # some prompt/padding positions
    return h_s, w_s, h_t, w_t, labels.to(device)


def naive_step(h_s, w_s, h_t, w_t, labels, *, loss, chunk_size):
    s_logits = (h_s @ w_s.t()).float()
    with torch.no_grad():
        t_logits = (h_t @ w_t.t()).float()
    value = get_kd_loss(loss)(s_logits, t_logits, labels)
    value.backward()
    return value.detach()


def chunked_step(h_s, w_s, h_t, w_t, labels, *, loss, chunk_size):
    value, _ = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, loss=loss, chunk_size=chunk_size)
    value.backward()
    return value.detach()


METHODS = {"naive": naive_step, "chunked": chunked_step}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_one(method, n, v, h, args, device):
    dtype = DTYPES[args.dtype]
    record = dict(method=method, vocab=v, tokens=n, hidden=h, dtype=args.dtype, chunk_size=args.chunk_size,
                  loss=args.loss, device=str(device), peak_mib=None, ms=None, value=None, status="ok")
    inputs = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        inputs = make_inputs(n, v, h, dtype, device)
        step = METHODS[method]
        kw = dict(loss=args.loss, chunk_size=args.chunk_size)

        def once():
            for t in inputs[:2]:
                t.grad = None
            return step(*inputs, **kw)

        # Memory: a single untimed run from a clean peak counter.
        if device.type == "cuda":
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            once()
            _sync(device)
            record["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        for _ in range(args.warmup):
            once()
        times = []
        for _ in range(args.reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                value = once()
                end.record()
                _sync(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                value = once()
                times.append((time.perf_counter() - t0) * 1e3)
        record["ms"] = statistics.median(times)
        record["value"] = float(value)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err) and not isinstance(err, MemoryError):
            raise
        record["status"] = "OOM"
    finally:
        # Free before the next config so one OOM doesn't cascade.
        inputs = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def markdown(records):
    lines = ["| vocab | tokens | hidden | method | peak MiB | time ms | loss |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    for r in records:
        if r["status"] == "OOM":
            mem = ms = val = "OOM"
        else:
            mem = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            ms, val = f"{r['ms']:.1f}", f"{r['value']:.5f}"
        lines.append(f"| {r['vocab']} | {r['tokens']} | {r['hidden']} | {r['method']} | {mem} | {ms} | {val} |")
    return "\n".join(lines)


def append_json(path, records):
    existing = []
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if not isinstance(existing, list):
            existing = [existing]
    with open(path, "w") as f:
        json.dump(existing + records, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    meta = dict(torch=torch.__version__, time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    records = []
    for v, n, h in itertools.product(args.vocab, args.tokens, args.hidden):
        for method in args.methods:
            rec = dict(run_one(method, n, v, h, args, device), **meta)
            records.append(rec)
            print(f"# {method:8s} V={v} N={n} H={h}: {rec['status']} peak={rec['peak_mib']} ms={rec['ms']}", flush=True)
    print()
    print(markdown(records))
    if args.out:
        append_json(args.out, records)
    return records


if __name__ == "__main__":
    main()
