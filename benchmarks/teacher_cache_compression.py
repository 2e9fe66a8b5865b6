"""How many bytes per predicted token each way of storing a teacher cache takes, and how far its loss is from the one on
the teacher's exact distribution.

    python benchmarks/teacher_cache_compression.py --size cpu --out runs/cache_compression.json   # 2 cores: minutes
    python benchmarks/teacher_cache_compression.py --size gpu --out runs/cache_compression_gpu.json
    python benchmarks/teacher_cache_compression.py --source model --teacher DIR --data FILE.jsonl   # your teacher

Each storage option (`OPTIONS`: a `kd.cache` setting) encodes the teacher's log-probabilities at N predicted positions
into records (distill/teacher_cache/codec.py), decodes them, and takes the forward KL to a student with the sparse loss
(distill/losses/sparse_kd.py), for each tail rule that applies. Against the same loss on the exact distribution:

* `loss_err`: |KL_cache - KL| / KL over the N positions (the mean over seeds for sampled options);
* `grad_bias`: ||E[g_cache] - g|| / ||g||, g the gradient of the KL with respect to the student's logits [N, V] (for
  the forward KL g = q - p, so this is the systematic error of the stored distribution): the error that stays
  however many positions a parameter's gradient sums. E[g_cache] is exact, not estimated: a sampled cache's expected
  distribution is its head plus the exact rest of the distribution, scaled to the stored tail mass;
* `grad_noise`: sqrt(E||g_cache - E[g_cache]||^2) / ||g|| over seeds: the sampled options' per-position error, zero
  mean, fixed once the cache is written, averaged out where many positions share a parameter as label noise is.

Sampled options are run with several seeds and their errors averaged. The sources of teacher distributions:

* `model`: a teacher checkpoint over text (default: the shipped teacher on the synthetic language, 53 tokens);
* `zipf`: heavy-tailed distributions over a large vocabulary, the kind a language model trained on real text gives
  (the synthetic language's teachers are near-exact with a few tokens): per position the probabilities fall as
  rank^-a (a uniform in --zipf-exponents) with Gumbel noise on the log-probabilities, over a random order of the ids.
  The JSON and table give their statistics (top-1 mass, the mass outside the top 32 and 128, entropy).

The student's logits are the teacher's log-probabilities times 0.8 plus Gaussian noise (std 1): a student near the end
of distillation, where errors in the target matter most; its KL is in the JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIONS = {  # name: (format, k, samples, values, ids)
    "top128_fp32_int32": ("topk", 128, 0, "fp32", "int32"),  # "k=128 stored plainly"
    "top128_bf16": ("topk", 128, 0, "bf16", "packed"),
    "top64_bf16": ("topk", 64, 0, "bf16", "packed"),
    "top64_sqrt8": ("topk", 64, 0, "sqrt8", "packed"),
    "top48_sqrt8": ("topk", 48, 0, "sqrt8", "packed"),
    "top32_sqrt8": ("topk", 32, 0, "sqrt8", "packed"),
    "top32_log8": ("topk", 32, 0, "log8", "packed"),
    "top32_sqrt12": ("topk", 32, 0, "sqrt12", "packed"),
    "sampled32": ("sampled", 0, 32, "bf16", "packed"),
    "sampled64": ("sampled", 0, 64, "bf16", "packed"),
    "top16_sqrt8+sampled32": ("sampled", 16, 32, "sqrt8", "packed"),
    "top24_sqrt8+sampled32": ("sampled", 24, 32, "sqrt8", "packed"),
    "top32_sqrt8+sampled24": ("sampled", 32, 24, "sqrt8", "packed"),
    "top24_sqrt12+sampled32": ("sampled", 24, 32, "sqrt12", "packed"),
}
REFERENCE = "top128_fp32_int32"
BUDGET = 150  # bytes per token
SIZES = {
    "cpu": dict(sources=["model", "zipf"], positions=512, vocab=32000, teacher="distill:assets/teacher", seeds=3),
    "gpu": dict(sources=["model", "zipf"], positions=4096, vocab=128000, teacher="runs/gpu_teacher_pretrain/final/model",
                seeds=5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--source", nargs="+", choices=["model", "zipf"], help="default: the size's")
    p.add_argument("--teacher", help="HF directory of the `model` source (default: the size's)")
    p.add_argument("--data", help="a .jsonl file with a `text` field for the `model` source (default: synthetic language)")
    p.add_argument("--positions", type=int, help="predicted positions measured (default: the size's)")
    p.add_argument("--vocab", type=int, help="vocabulary of the `zipf` source (default: the size's)")
    p.add_argument("--zipf-exponents", type=float, nargs=2, default=[1.2, 2.5])
    p.add_argument("--seeds", type=int, help="seeds of the sampled options (default: the size's)")
    p.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/cache_compression.json")
    return p.parse_args(argv)


# -- sources of teacher distributions ---------------------------------------------------------------------------------
def zipf_logp(n: int, vocab: int, exponents, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(n, 1).uniform_(*exponents, generator=g)
    rank = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = -a * rank.log() + 0.5 * -torch.log(-torch.log(torch.rand(n, vocab, generator=g).clamp(1e-12, 1 - 1e-7)))
    order = torch.argsort(torch.rand(n, vocab, generator=g), -1)  # each position's ranks on other ids
    return torch.empty_like(logits).scatter_(-1, order, logits).log_softmax(-1)


@torch.no_grad()
def model_logp(teacher: str, data: str | None, n: int, device: str) -> torch.Tensor:
    """The teacher's log-probabilities at the first n predicted positions of the texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config.presets import resolve_shipped

    path = resolve_shipped(teacher)
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    if data is None:
        import random

        from distill.data.synthetic import SyntheticLanguage, build_tokenizer

        lang = SyntheticLanguage(0)
        tok = build_tokenizer(lang)
        rng = random.Random(1)
        texts = [lang.sample_document(rng, rng.randint(1, 4)) for _ in range(4 * n)]
    else:
        tok = AutoTokenizer.from_pretrained(path)
        texts = [json.loads(line)["text"] for line in Path(data).read_text().splitlines() if line.strip()]
    out, have = [], 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"][:, :1024].to(device)
        if ids.shape[1] < 2:
            continue
        out.append(model(input_ids=ids).logits[0, :-1].float().log_softmax(-1).cpu())
        have += ids.shape[1] - 1
        if have >= n:
            break
    return torch.cat(out)[:n]


def statistics_of(logp: torch.Tensor) -> dict:
    p = logp.exp()
    top = p.sort(-1, descending=True).values
    return {"positions": logp.shape[0], "vocab": logp.shape[1], "top1_mass": float(top[:, 0].mean()),
            "outside_top32": float(1 - top[:, :32].sum(-1).mean()) if logp.shape[1] > 32 else 0.0,
            "outside_top128": float(1 - top[:, :128].sum(-1).mean()) if logp.shape[1] > 128 else 0.0,
            "entropy": float(-(p * logp.clamp(min=-1e30)).sum(-1).mean())}


# -- measuring ----------------------------------------------------------------------------------------------------
def errors(logp, student, codec, tail: str, seeds: int) -> dict:
    from distill.losses import SparseTeacher, get_kd_loss, get_sparse_kd_loss

    labels = torch.zeros(logp.shape[0], dtype=torch.long, device=logp.device)

    def loss_and_grad(teacher):
        s = student.clone().requires_grad_()
        loss = (get_kd_loss("forward_kl")(s, logp, labels) if teacher is None else
                get_sparse_kd_loss("forward_kl")(s, teacher, labels, tail=tail))
        return float(loss.detach()), torch.autograd.grad(loss, s)[0]

    exact, g = loss_and_grad(None)
    draws = []
    for seed in range(seeds):
        gen = torch.Generator(device=logp.device).manual_seed(seed)
        records = torch.cat([codec.encode(logp[a:a + 256], generator=gen) for a in range(0, logp.shape[0], 256)])
        draws.append(codec.decode(records)[0])
    mean = draws[0]
    if codec.format == "sampled":  # the expected distribution: the head as stored, the exact rest scaled to the tail
        head = draws[0]
        p = logp.exp()
        rest = p.scatter(-1, head.ids[:, :codec.k], 0.0)
        mass = head.logp[:, codec.k:].exp().sum(-1, keepdim=True)  # the samples carry the stored tail mass
        expected = (rest / rest.sum(-1, keepdim=True) * mass).scatter(-1, head.ids[:, :codec.k], head.logp[:, :codec.k].exp())
        ids = torch.arange(p.shape[1], device=p.device).expand_as(p)
        mean = SparseTeacher(ids, expected.log(), torch.full_like(p[:, 0], float("-inf")))
    _, g_mean = loss_and_grad(mean)
    runs = [loss_and_grad(t) for t in draws]
    return {"kl": exact, "loss_err": statistics.fmean(abs(v - exact) / exact for v, _ in runs),
            "grad_bias": float((g_mean - g).norm() / g.norm()),
            "grad_noise": math.sqrt(statistics.fmean(float((gr - g_mean).norm() ** 2) for _, gr in runs)) / float(g.norm())}


def measure(logp, args, seeds: int) -> list[dict]:
    from distill.teacher_cache.codec import Codec

    g = torch.Generator().manual_seed(1)
    student = (0.8 * logp.clamp(min=-60) + torch.randn(logp.shape, generator=g)).to(args.device)
    logp = logp.to(args.device)
    rows = []
    for name in args.options:
        fmt, k, samples, values, ids = OPTIONS[name]
        if k > logp.shape[1]:
            continue
        codec = Codec(fmt, k, samples, values, ids, logp.shape[1])
        for tail in (("renormalize", "bucket") if fmt == "topk" else ("renormalize",)):
            row = {"option": name, "tail": tail, "format": fmt, "k": k, "samples": samples, "values": values, "ids": ids,
                   "bytes_per_token": codec.record_bytes, "seeds": seeds if fmt == "sampled" else 1,
                   **errors(logp, student, codec, tail, seeds if fmt == "sampled" else 1)}
            rows.append(row)
            print(f"  {name:24s} {tail:11s} {row['bytes_per_token']:5d} B  loss {row['loss_err']:.2e}  bias "
                  f"{row['grad_bias']:.2e}  noise {row['grad_noise']:.2e}", flush=True)
    return rows


def verdict(rows: list[dict]) -> dict:
    """The options within BUDGET bytes whose gradient bias is at most the reference's, with its tail rule either way."""
    ref = {r["tail"]: r["grad_bias"] for r in rows if r["option"] == REFERENCE}
    if not ref:
        return {}
    return {f"reference_{tail}": bar for tail, bar in ref.items()} | {
        f"no_more_bias_than_reference_{tail}": [f"{r['option']} ({r['tail']})" for r in rows
                                                 if r["bytes_per_token"] <= BUDGET and r["grad_bias"] <= bar]
        for tail, bar in ref.items()}


def table(result: dict) -> str:
    lines = []
    for source, part in result["sources"].items():
        st = part["statistics"]
        lines += [f"\n{source}: {st['positions']} positions, vocab {st['vocab']}, top-1 mass {st['top1_mass']:.3f}, mass "
                  f"outside the top 32 {st['outside_top32']:.4f} / top 128 {st['outside_top128']:.4f}, entropy "
                  f"{st['entropy']:.2f} nats, student KL {part['rows'][0]['kl']:.3f}",
                  "| option | tail | bytes/token | loss error | gradient bias | gradient noise |",
                  "|---|---|---|---|---|---|"]
        for r in part["rows"]:
            lines.append(f"| {r['option']} | {r['tail']} | {r['bytes_per_token']} | {r['loss_err']:.2e} | "
                         f"{r['grad_bias']:.2e} | {r['grad_noise']:.2e} |")
        for tail in ("renormalize", "bucket"):
            if f"reference_{tail}" in part["verdict"]:
                ok = part["verdict"][f"no_more_bias_than_reference_{tail}"]
                lines.append(f"within {BUDGET} bytes, gradient bias at most {REFERENCE} with {tail} "
                             f"({part['verdict'][f'reference_{tail}']:.2e}): {', '.join(ok) or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse_args(argv)
    size = SIZES[a.size]
    sources = a.source or size["sources"]
    n, seeds = a.positions or size["positions"], a.seeds or size["seeds"]
    if a.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"command": "python benchmarks/teacher_cache_compression.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "budget_bytes": BUDGET,
              "reference": REFERENCE, "sources": {}}
    for source in sources:
        t0 = time.perf_counter()
        if source == "zipf":
            logp = zipf_logp(n, a.vocab or size["vocab"], a.zipf_exponents)
        else:
            logp = model_logp(a.teacher or size["teacher"], a.data, n, a.device).cpu()
        stats = statistics_of(logp)
        print(f"{source}: {json.dumps(stats)}", flush=True)
        rows = measure(logp, a, seeds)
        result["sources"][source] = {"statistics": stats, "rows": rows, "verdict": verdict(rows),
                                     "seconds": time.perf_counter() - t0}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


if __name__ == "__main__":
    main()
