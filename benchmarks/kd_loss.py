"""Peak memory and time of forward+backward: naive full-vocab KD vs ``chunked_kd_loss``.

GPU:   python benchmarks/kd_loss.py --device cuda --vocab 32000 128256 152064 \
           --tokens 1024 8192 16384 --hidden 2048 4096 --dtype bf16 --out results.json
Sweep: python benchmarks/kd_loss.py --device cuda --vocab 128256 --tokens 8192 --hidden 2048 4096 \
           --chunk-size 1024 2048 4096 8192
Smoke: python benchmarks/kd_loss.py --device cpu --vocab 1000 --tokens 256 --hidden 64 --check

Both methods do the same work: the student's logits matmul forward and backward (grads of
the hidden states and the lm_head weight), the teacher's logits matmul forward, and the KD
loss. "naive" materialises [N, V] fp32 logits for both models (what a plain
``model(...).logits.float()`` pipeline does) and calls the registered KD loss; "chunked"
goes from hidden states straight to the loss (it also returns the CE value, which naive
does not compute). Peak memory is ``max_memory_allocated`` during one forward+backward
minus what was allocated just before it (the inputs, with their ``.grad`` cleared), so it
counts logits, loss temporaries and the gradients of the student's hidden states and
lm_head weight, for both methods alike. One untimed warm-up run comes first, so one-off
allocations (cuBLAS workspace) are in the baseline of both. Time is the median of
``--reps`` timed runs after ``--warmup``.

Imports only torch and ``distill.losses`` (without running ``distill/__init__``, whose
trainer imports need packages a bare GPU machine may lack).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import itertools
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[1]


def _import_losses():
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    try:
        return importlib.import_module("distill.losses")
    except ImportError:
        # distill/__init__ pulled in something missing: load the torch-only subpackage alone.
        for name in [m for m in sys.modules if m == "distill" or m.startswith("distill.")]:
            del sys.modules[name]
        pkg = types.ModuleType("distill")
        pkg.__path__ = [str(_ROOT / "distill")]
        sys.modules["distill"] = pkg
        return importlib.import_module("distill.losses")


losses = _import_losses()
chunked_mod = importlib.import_module("distill.losses.chunked")
chunked_kd_loss, get_kd_loss = losses.chunked_kd_loss, losses.get_kd_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 152064])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 16384])
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--chunk-size", type=int, nargs="+", default=[chunked_mod.DEFAULT_CHUNK_SIZE],
                   help="one or more; naive is measured once per shape")
    p.add_argument("--sub-elems", type=int, default=None,
                   help="override chunked.SUB_ELEMS (elements of one fp32 temporary of the loss step)")
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--alpha-ce", type=float, default=0.0, help="chunked only; naive computes KD alone")
    p.add_argument("--methods", nargs="+", choices=["naive", "chunked"], default=["naive", "chunked"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--check", action="store_true",
                   help="also compare chunked loss and grads with naive at every shape (needs both in memory)")
    p.add_argument("--out", default=None, help="JSON file; results are appended to the list it holds")
    return p.parse_args(argv)


def make_inputs(n, v, h, dtype, device, seed=0):
    # Generated on the device: CPU randn of a [152k, 4k] weight takes seconds.
    g = torch.Generator(device=device).manual_seed(seed)

    def mk(*shape, scale):  # scaled so logits have O(1) spread, like a trained lm_head
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    h_s = mk(n, h, scale=1.0).requires_grad_()
    w_s = mk(v, h, scale=h**-0.5).requires_grad_()
    h_t = mk(n, h, scale=1.0)
    w_t = mk(v, h, scale=h**-0.5)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[torch.rand(n, generator=g, device=device) < 0.1] = -100  # some prompt/padding positions
    return h_s, w_s, h_t, w_t, labels


def naive_step(h_s, w_s, h_t, w_t, labels, *, loss, chunk_size, alpha_ce):
    s_logits = (h_s @ w_s.t()).float()
    with torch.no_grad():
        t_logits = (h_t @ w_t.t()).float()
    value = get_kd_loss(loss)(s_logits, t_logits, labels)
    value.backward()
    return value.detach()


def chunked_step(h_s, w_s, h_t, w_t, labels, *, loss, chunk_size, alpha_ce):
    value, _ = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, loss=loss, chunk_size=chunk_size, alpha_ce=alpha_ce)
    value.backward()
    return value.detach()


METHODS = {"naive": naive_step, "chunked": chunked_step}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_one(method, n, v, h, chunk_size, args, device):
    dtype = DTYPES[args.dtype]
    record = dict(method=method, vocab=v, tokens=n, hidden=h, dtype=args.dtype,
                  chunk_size=chunk_size if method == "chunked" else None, loss=args.loss,
                  alpha_ce=args.alpha_ce if method == "chunked" else 0.0,
                  sub_elems=chunked_mod.SUB_ELEMS if method == "chunked" else None,
                  device=str(device), peak_mib=None, ms=None, value=None, status="ok")
    inputs = None
    try:
        _free(device)
        inputs = make_inputs(n, v, h, dtype, device)
        step = METHODS[method]
        kw = dict(loss=args.loss, chunk_size=chunk_size, alpha_ce=args.alpha_ce)

        def once():
            for t in inputs[:2]:
                t.grad = None
            return step(*inputs, **kw)

        once()  # warm-up: one-off allocations land in the baseline of both methods
        # Memory: one untimed run from a clean peak counter, grads of the last run freed.
        for t in inputs[:2]:
            t.grad = None
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
        _free(device)
    return record


def check_one(n, v, h, chunk_size, args, device):
    """Chunked vs naive: loss difference and max |grad diff| / max |naive grad|, for h and W."""
    dtype = DTYPES[args.dtype]
    rec = dict(check=True, vocab=v, tokens=n, hidden=h, dtype=args.dtype, chunk_size=chunk_size, loss=args.loss)
    inputs = got = None
    try:
        _free(device)
        inputs = make_inputs(n, v, h, dtype, device)
        kw = dict(loss=args.loss, chunk_size=chunk_size, alpha_ce=0.0)
        got = []
        for step in (naive_step, chunked_step):
            for t in inputs[:2]:
                t.grad = None
            value = step(*inputs, **kw)
            got.append((float(value), inputs[0].grad.float(), inputs[1].grad.float()))
            for t in inputs[:2]:
                t.grad = None
        (v_n, gh_n, gw_n), (v_c, gh_c, gw_c) = got
        rec.update(loss_naive=v_n, loss_chunked=v_c,
                   rel_err_grad_hidden=float((gh_c - gh_n).abs().max() / gh_n.abs().max()),
                   rel_err_grad_weight=float((gw_c - gw_n).abs().max() / gw_n.abs().max()),
                   addmm_mode=dict(chunked_mod.ADDMM_MODE))
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err) and not isinstance(err, MemoryError):
            raise
        rec["status"] = "OOM"
    finally:
        inputs = got = None
        _free(device)
    return rec


def markdown(records):
    lines = ["| vocab | tokens | hidden | chunk | naive peak MiB | chunked peak MiB | chunked ÷ naive memory"
             " | naive ms | chunked ms | chunked ÷ naive time | loss naive | loss chunked |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    naive = {(r["vocab"], r["tokens"], r["hidden"]): r for r in records if r.get("method") == "naive"}
    fmt = lambda x, f: "n/a" if x is None else format(x, f)  # noqa: E731
    for r in records:
        if r.get("method") != "chunked":
            continue
        nv = naive.get((r["vocab"], r["tokens"], r["hidden"]), {})
        ok_n, ok_c = nv.get("status") == "ok", r["status"] == "ok"
        mem_n = fmt(nv.get("peak_mib"), ".0f") if ok_n else nv.get("status", "-")
        mem_c = fmt(r["peak_mib"], ".0f") if ok_c else r["status"]
        ms_n = fmt(nv.get("ms"), ".1f") if ok_n else nv.get("status", "-")
        ms_c = fmt(r["ms"], ".1f") if ok_c else r["status"]
        both = ok_n and ok_c
        mem_ratio = fmt(r["peak_mib"] / nv["peak_mib"], ".3f") if both and r["peak_mib"] is not None else "-"
        t_ratio = fmt(r["ms"] / nv["ms"], ".2f") if both else "-"
        lines.append(f"| {r['vocab']} | {r['tokens']} | {r['hidden']} | {r['chunk_size']} | {mem_n} | {mem_c} "
                     f"| {mem_ratio} | {ms_n} | {ms_c} | {t_ratio} | {fmt(nv.get('value'), '.5f')} "
                     f"| {fmt(r['value'], '.5f')} |")
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
    if args.sub_elems is not None:
        chunked_mod.SUB_ELEMS = args.sub_elems
    device = torch.device(args.device)
    meta = dict(torch=torch.__version__, time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    records = []
    for v, n, h in itertools.product(args.vocab, args.tokens, args.hidden):
        runs = [("naive", None)] if "naive" in args.methods else []
        runs += [("chunked", c) for c in args.chunk_size] if "chunked" in args.methods else []
        for method, c in runs:
            rec = dict(run_one(method, n, v, h, c, args, device), **meta)
            records.append(rec)
            print(f"# {method:8s} V={v} N={n} H={h} chunk={c}: {rec['status']} peak={rec['peak_mib']} "
                  f"ms={rec['ms']} value={rec['value']}", flush=True)
            if args.out:
                append_json(args.out, [rec])
        if args.check:
            rec = dict(check_one(n, v, h, args.chunk_size[0], args, device), **meta)
            records.append(rec)
            print(f"# check    V={v} N={n} H={h}: {rec}", flush=True)
            if args.out:
                append_json(args.out, [rec])
    print()
    print(markdown(records))
    return records


if __name__ == "__main__":
    main()
