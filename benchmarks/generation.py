"""Generation throughput: distill.generation's decode modes against transformers' generate(), and the
on-policy recipe's step split, in one process on one GPU.

    python benchmarks/generation.py --out generation.json                      # GPU, the 0.3B student, ~8 min
    python benchmarks/generation.py --model tiny --batch 4 8 --new-tokens 16 --prompt-len 8 \\
        --recipe recipes/onpolicy_quickstart.yaml --out t.json                 # CPU smoke run of every part

Parts, in the order of --parts (each result is written to --out as soon as it exists, and a measurement that
would start after --budget-s seconds is recorded as skipped):
* `check`: greedy completions (fp32, a 2-layer model, rows ending at different lengths) of each decode mode
  against transformers' eager `generate()`: equal token for token, or the first position where they differ.
* `throughput`: the --model's random-init weights in bf16, --batch prompts of --prompt-len tokens (left-padded
  to random lengths between half and all of it), --new-tokens sampled at temperature 1 (no eos: every row runs to
  the end). Candidates: ours (`compiled`, `graphs`, `static`: distill.generation.decode) and `generate` (eager, dynamic cache);
  the parts `generate_static` (`cache_implementation="static"`: transformers compiles the forward itself) and
  `generate_batch` (transformers' continuous batching, paged attention) measure those two on the same model. Per candidate and batch: the first call
  (compile and graph capture included) and the mean of --repeats timed calls; tokens/s counts generated tokens.
  `compiled_top_p`: ours at top_p 0.95 (a sort of the vocabulary per step).
* `ends`: rows that end: eos is --eos-fraction of the vocabulary, so lengths are geometric; ours with and without
  moving ended rows out of the batch, and eager generate(); tokens/s counts tokens up to each row's eos.
* `split`: the on-policy recipe (--recipe, 1 process) as DistillTrainer runs it: per optimizer step, the time in
  generation (prepare_step), in the teacher's scoring forward, and the rest (the student's forward, backward and
  step), for 1 and for 4 micro-batches per step (one generation phase each); then the teacher generating (seq_kd),
  gathered from ZeRO-3 (--split-set overrides, e.g. teacher.placement=sharded).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.generation.generate import SamplingSpec, decode_cache, generate_completions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OURS = ("compiled", "graphs", "static")
CANDIDATES = (*OURS, "generate", "generate_static", "generate_batch", "compiled_top_p")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["0.3b", "1.4b", "tiny"], default="0.3b", help="the on-policy recipe's student / teacher")
    p.add_argument("--batch", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    p.add_argument("--slow-batches", nargs="+", type=int, default=[64],
                   help="batches for generate_static and generate_batch (each compiles or sizes itself per batch)")
    p.add_argument("--eager-batches", nargs="+", type=int, default=None, help="batches for generate (default: --batch)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--eos-fraction", type=float, default=0.01)
    p.add_argument("--ends-batch", nargs="+", type=int, default=[256])
    p.add_argument("--recipe", default=str(ROOT / "recipes/gpu_onpolicy_0.3b_1.4b.yaml"))
    p.add_argument("--split-set", nargs="*", default=["teacher.placement=sharded"])
    p.add_argument("--split-steps", type=int, default=2)
    p.add_argument("--parts", nargs="+", default=["check", "throughput", "split", "generate_static", "ends", "generate_batch"],
                   choices=["check", "throughput", "split", "generate_static", "ends", "generate_batch"])
    p.add_argument("--budget-s", type=float, default=1e9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="generation.json")
    p.add_argument("--work-dir", default="/tmp/distill_generation_bench", help="the split's prompts and run directory")
    return p.parse_args(argv)


def model_config(name: str) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes/gpu_onpolicy_0.3b_1.4b.yaml").read_text())
    if name == "tiny":
        return dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return recipe["student" if name == "0.3b" else "teacher"]["config"]


def build(config: dict, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=dtype)
    return model.eval()


def prompts(batch: int, width: int, vocab: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        pad = int(torch.randint(0, width // 2 + 1, (1,), generator=g))
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids.to(device), mask.to(device)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


# -- candidates: each returns (tokens [R, N], number of generated tokens) --------------------------------------
def run_candidate(name: str, model, ids, mask, spec: SamplingSpec, seed: int, *, compact: bool = True):
    if name in OURS or name == "compiled_top_p":
        mode = "compiled" if name == "compiled_top_p" else name
        if not compact:
            from distill.generation.decode import DecodeEngine

            held = decode_cache(model)
            e = held.get("engine")
            if e is None or e.rows != len(ids) or len(e.batches) != 1 or e.mode != mode:
                held.pop("engine", None)
                e = DecodeEngine(model, rows=len(ids), length=ids.shape[1] + spec.max_new_tokens,
                                 max_new_tokens=spec.max_new_tokens, mode=mode, compact=False)
                held.update(engine=e, wanted=len(ids))
        out = generate_completions(model, ids, mask, spec, seed=seed, decode=mode)
        return out.tokens, int(out.lengths.sum())
    from transformers import GenerationConfig

    from distill.generation.generate import completion_lengths

    kw = spec.generate_kwargs()
    kw["eos_token_id"] = list(spec.eos_token_ids) or None
    torch.manual_seed(seed)
    if name == "generate_batch":
        config = GenerationConfig(**{k: v for k, v in kw.items() if k not in ("use_cache", "min_new_tokens")})
        rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
        with torch.no_grad():
            outs = model.generate_batch(inputs=rows, generation_config=config, progress_bar=False)
        gen = [o.generated_tokens for o in sorted(outs.values(), key=lambda o: int(str(o.request_id).split("_")[-1]))]
        width = max(len(g) for g in gen)
        tokens = torch.tensor([g + [spec.pad_token_id] * (width - len(g)) for g in gen])
    else:
        extra = {"cache_implementation": "static"} if name == "generate_static" else {}
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**kw, **extra))[:, ids.shape[1]:]
    n = int(completion_lengths(tokens, spec.eos_token_ids).sum()) if spec.eos_token_ids else tokens.numel()
    return tokens, n


def measure(name, model, ids, mask, spec, a, **kw) -> dict:
    first, (_, n) = timed(lambda: run_candidate(name, model, ids, mask, spec, a.seed, **kw))
    times, counts = [], []
    for r in range(a.repeats):
        t, (_, n) = timed(lambda: run_candidate(name, model, ids, mask, spec, a.seed + 1 + r, **kw))
        times.append(t)
        counts.append(n)
    return {"candidate": name, "batch": len(ids), "first_call_s": first, "seconds": times, "tokens": counts,
            "tokens_per_s": sum(counts) / sum(times)}


# -- parts --------------------------------------------------------------------------------------------------------
def part_check(a, device, log) -> list[dict]:
    """Greedy, fp32 (TF32 off), a 2-layer model of the student's width: ours against eager generate(), rows ending
    at different lengths."""
    cfg = {**model_config("tiny" if a.model == "tiny" else "0.3b"), "num_hidden_layers": 2}
    model = build(cfg, torch.float32, device, seed=1)
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, mask = prompts(24, a.prompt_len, cfg["vocab_size"], device, a.seed)
    spec = SamplingSpec(max_new_tokens=48, temperature=0, pad_token_id=0)
    want = run_candidate("generate", model, ids, mask, spec, 0)[0]
    # eos: what row 0 says at step 5 and row 1 at step 20, so rows stop at different lengths
    spec = SamplingSpec(max_new_tokens=48, temperature=0, pad_token_id=0, eos_token_ids=(int(want[0, 5]), int(want[1, 20])))
    want = run_candidate("generate", model, ids, mask, spec, 0)[0]
    rows = []
    for mode in [m for m in OURS if m in a.candidates and (device == "cuda" or m == "static")]:
        try:
            got = run_candidate(mode, model, ids, mask, spec, 0)[0]
        except Exception as e:  # noqa: BLE001 - recorded; the other modes and parts still run
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            log(f"check {mode}: {rows[-1]['error']}")
            continue
        finally:
            model.__dict__.pop("_distill_decode", None)
        width = min(got.shape[1], want.shape[1])
        differ = (got[:, :width] != want[:, :width]).any(0).nonzero()
        rows.append({"mode": mode, "equal": torch.equal(got, want), "rows": len(ids),
                     "first_difference": int(differ[0]) if len(differ) else None, "width": [got.shape[1], want.shape[1]]})
        log(f"check {mode}: equal to generate() = {rows[-1]['equal']}")
    del model
    torch.backends.cuda.matmul.allow_tf32 = True
    return rows


def part_throughput(a, device, log, model, results, deadline, candidates) -> None:
    vocab = model.config.vocab_size
    spec = SamplingSpec(max_new_tokens=a.new_tokens, temperature=1.0, pad_token_id=0)
    order = [c for c in ("compiled", "graphs", "generate", "static", "compiled_top_p", "generate_static", "generate_batch")
             if c in candidates and (device == "cuda" or c not in ("compiled", "graphs", "compiled_top_p", "generate_static"))]
    for name in order:
        batches = a.slow_batches if name in ("generate_static", "generate_batch") else a.batch
        batches = (a.eager_batches or a.batch) if name == "generate" else batches
        batches = batches[:1] if name in ("static", "compiled_top_p") else batches
        for b in batches:
            if time.time() > deadline:
                results.append({"candidate": name, "batch": b, "skipped": "budget"})
                continue
            ids, mask = prompts(b, a.prompt_len, vocab, device, a.seed + b)
            s = SamplingSpec(**{**spec.__dict__, "top_p": 0.95}) if name == "compiled_top_p" else spec
            try:
                row = measure(name, model, ids, mask, s, a)
            except Exception as e:  # noqa: BLE001 - a candidate that fails is recorded, the others still run
                row = {"candidate": name, "batch": b, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            results.append(row)
            log(f"throughput {name} b{b}: " + (f"{row['tokens_per_s']:.0f} tokens/s (first call {row['first_call_s']:.1f} s)"
                                               if "tokens_per_s" in row else row.get("error", "")))
        if name in OURS or name == "compiled_top_p":
            model.__dict__.pop("_distill_decode", None)  # the next candidate sizes its own cache


def part_ends(a, device, log, model, results, deadline) -> None:
    vocab = model.config.vocab_size
    eos = tuple(range(3, 3 + max(1, int(a.eos_fraction * vocab))))
    spec = SamplingSpec(max_new_tokens=a.new_tokens, temperature=1.0, pad_token_id=0, eos_token_ids=eos)
    mode = "compiled" if device == "cuda" else "static"
    for b in a.ends_batch:
        ids, mask = prompts(b, a.prompt_len, vocab, device, a.seed + b)
        for name, compact in ((mode, True), (mode, False), ("generate", True)):
            if time.time() > deadline:
                results.append({"candidate": name, "batch": b, "compact": compact, "skipped": "budget"})
                continue
            row = {**measure(name, model, ids, mask, spec, a, compact=compact), "compact": compact, "eos_ids": len(eos)}
            model.__dict__.pop("_distill_decode", None)
            results.append(row)
            log(f"ends {name} compact={compact} b{b}: {row['tokens_per_s']:.0f} tokens/s, mean length {sum(row['tokens']) / len(row['tokens']) / b:.0f}")


class _TimedRole:
    """A RoleModel whose calls are timed (synchronised), for the step split."""

    def __init__(self, role):
        self.__dict__["role"], self.__dict__["seconds"] = role, 0.0

    def __getattr__(self, name):
        return getattr(self.__dict__["role"], name)

    def __call__(self, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = self.__dict__["role"](*args, **kwargs)
        sync()
        self.__dict__["seconds"] += time.perf_counter() - t0
        return out


def part_split(a, device, log, out, deadline) -> None:
    from distill.trainers import load_recipe

    data = Path(a.work_dir) / "split_prompts"
    overrides = [f"output_dir={data.parent / 'split_run'}", "launch.num_processes=1", "train.grad_accum=4",
                 "train.max_steps=1000", "train.log_every=100000", "train.progress=false", "train.overlap_frozen=false",
                 f"data.train={data / 'train.jsonl'}", "data.eval=null", f"data.tokenizer={data / 'tokenizer'}", *a.split_set]
    from distill.data.prompts import write_prompt_dataset

    write_prompt_dataset(data, seed=0, n_train=2000, n_eval=10)
    recipe, trainer_cls = load_recipe(a.recipe, overrides)
    t0 = time.perf_counter()
    trainer = trainer_cls(recipe, log=log)
    out["split_build_s"] = time.perf_counter() - t0
    out["split_recipe"] = {"recipe": a.recipe, "overrides": overrides,
                           "placement": {n: p.placement or f"ZeRO-{p.zero_stage}" for n, p in trainer.plans.items()},
                           "compiled": {n: p.compile for n, p in trainer.plans.items()}}
    trainer.start_run_dir()
    timed_teacher = _TimedRole(trainer.teacher)
    trainer.teacher = timed_teacher
    generation = [0.0]
    prepare = trainer.prepare_step

    def timed_prepare(step, micro):
        t, result = timed(lambda: prepare(step, micro))
        generation[0] += t
        return result

    trainer.prepare_step = timed_prepare
    batches = trainer.data.train_batches()

    step, rows = 0, []
    for per_step in (4, 1, 4, 1):  # warm-up pass (compile, graph capture), then the timed pass
        timed_pass = step >= 2 * a.split_steps
        for _ in range(a.split_steps):
            if time.time() > deadline:
                out.setdefault("split_skipped", []).append(per_step)
                break
            micro = next(batches)[:per_step]
            step += 1
            generation[0], timed_teacher.__dict__["seconds"] = 0.0, 0.0
            total, _ = timed(lambda: trainer.train_step(step, micro))
            row = {"micro_batches": per_step, "rows": per_step * recipe.train.micro_batch_size, "warmup": not timed_pass,
                   "step_s": total, "generation_s": generation[0], "teacher_scoring_s": timed_teacher.seconds,
                   "student_and_rest_s": total - generation[0] - timed_teacher.seconds}
            engine = trainer.student.module.__dict__.get("_distill_decode", {}).get("engine")
            row.update(generation_share=row["generation_s"] / total, gen_metrics=trainer.sampler.metrics(),
                       decode=None if engine is None else engine.mode + (" (no graphs)" if engine.graphless else ""))
            rows.append(row)
            log(f"split mb x{per_step}{' (warm-up)' if not timed_pass else ''}: step {total:.3f} s, generation "
                f"{generation[0]:.3f} s ({100 * generation[0] / total:.0f}%), teacher scoring {timed_teacher.seconds:.3f} s, "
                f"decode {row['decode']}")
        out["split"] = rows
        write(a, out)
    # The teacher writing (seq_kd): one phase of 4 micro-batches, gathered from ZeRO-3 when it is sharded.
    teacher_rows = []
    for i in range(3):
        if time.time() > deadline:
            teacher_rows.append({"skipped": "budget"})
            break
        micro = [trainer.to_device(b) for b in next(batches)]
        t, done = timed(lambda: trainer.sampler.sample_many(trainer.teacher.role, micro, seed=i))
        n = sum(int((b["labels"] != -100).sum()) for b in done)
        teacher_rows.append({"first": i == 0, "seconds": t, "tokens": n, "tokens_per_s": n / t})
        log(f"teacher writes {len(micro) * recipe.train.micro_batch_size} rows: {t:.2f} s, {n / t:.0f} tokens/s")
    out["teacher_generation"] = teacher_rows


def write(a, out) -> None:
    Path(a.out).write_text(json.dumps(out, indent=1))


def main(argv=None) -> None:
    a = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    deadline = start + a.budget_s
    import transformers

    out = {"args": vars(a), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "throughput": [], "ends": []}

    def log(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    held = {}

    def model():
        if "model" not in held:
            held["model"] = build(model_config(a.model), torch.bfloat16 if device == "cuda" else torch.float32, device)
            out["model"] = {"name": a.model, "params": sum(p.numel() for p in held["model"].parameters())}
        return held["model"]

    for part in a.parts:
        if part == "check":
            out["check"] = part_check(a, device, log)
        elif part == "throughput":  # transformers' compiled and continuous-batching paths are parts of their own
            part_throughput(a, device, log, model(), out["throughput"], deadline,
                            [c for c in a.candidates if c not in ("generate_static", "generate_batch")])
        elif part in ("generate_static", "generate_batch"):
            part_throughput(a, device, log, model(), out["throughput"], deadline, [part] if part in a.candidates else [])
        elif part == "ends":
            part_ends(a, device, log, model(), out["ends"], deadline)
        elif part == "split":
            held.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            part_split(a, device, log, out, deadline)
        write(a, out)
    for r in out["throughput"]:
        if "tokens_per_s" in r:
            print(f"{r['candidate']:>16} b{r['batch']:<4} {r['tokens_per_s']:>9.0f} tokens/s   first call {r['first_call_s']:.1f} s")
    for r in out.get("split", []):
        if not r["warmup"]:
            print(f"split x{r['micro_batches']}: step {r['step_s']:.3f} s, generation {100 * r['generation_share']:.0f}%")
    log(f"done; results in {a.out}")


if __name__ == "__main__":
    main()
