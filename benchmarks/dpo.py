"""Throughput and peak GPU memory of DPO training: distill's DPOTrainer against TRL's DPOTrainer.

Both sides in turn, each in its own `accelerate launch` (prints a markdown table, writes JSON):

    python benchmarks/dpo.py --num-processes 2 --out dpo_bench.json              # random-init Llama ~0.3B, bf16
    python benchmarks/dpo.py --tiny --device cpu --num-processes 1                # CPU smoke test

What is alive at each side's memory peak, and where it was allocated (benchmarks/memory_peak.py):

    python benchmarks/dpo.py --num-processes 2 --warmup 2 --steps 2 --memory-snapshot snap/   # snap/<impl>_rank<r>.txt

One side, launched by hand (what the driver above runs for each side):

    accelerate launch --num_processes N --use_deepspeed benchmarks/dpo.py --impl distill|trl [options]

Same for both sides: the model (one random-init Llama saved once, loaded as policy and as
reference), the pairs (random words of a word-level tokenizer, every sequence exactly --seq-len
tokens: bos + prompt, then response + eos, so neither side pads), micro-batch, accumulation, AdamW
with a constant lr, gradient clipping 1.0, no gradient checkpointing (unless --gradient-checkpointing),
bf16 weights with fp32 master weights under DeepSpeed ZeRO-2 for the policy, sdpa attention.
What differs is each framework's own design, and is what this measures:

* the reference: distill places it by its planner (--ref-zero auto: replicated when it fits beside
  the policy, else ZeRO-3), or as forced by --ref-zero 0|3; TRL holds it replicated (DeepSpeed
  stage 0) unless its policy is ZeRO-3 (--policy-zero 3), then both are ZeRO-3;
* log-probs: distill takes them from the hidden states through the LM head, with fp32 math chunk
  by chunk (distill/losses/logps.py); TRL 1.x computes them with its chunked fused LM head;
* ZeRO-2 buckets: distill's defaults (5e7-element reduce bucket); TRL's "auto", which the HF
  Trainer fills with hidden_size**2. `--sides distill --set 'policy.deepspeed={...}'` measures
  distill alone with other buckets;
* the data pipeline, the loop and the per-step metrics of each.

Timing: the wall clock between the end of step --warmup and the end of the last step (each side
syncs the device at each step end: distill through its per-step metrics, TRL through a callback).
tokens/s counts every token of both sequences of a pair, all ranks, i.e.
2 * pairs per step * seq_len * timed steps / seconds. Peak memory is `torch.cuda.max_memory_allocated`
over the whole run (model load included), the maximum over ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=["both", "distill", "trl"], default="both",
                   help="both: launch each side in turn and compare; distill|trl: run one side (inside accelerate launch)")
    p.add_argument("--num-processes", type=int, default=1, help="processes per side (driver only)")
    p.add_argument("--sides", nargs="+", choices=["distill", "trl"], default=["distill", "trl"],
                   help="which sides the driver launches, in this order")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short sequences (smoke test)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens of each sequence (prompt + response)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per rank per forward")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--policy-zero", type=int, choices=[2, 3], default=2)
    p.add_argument("--ref-zero", choices=["0", "3", "auto"], default="auto",
                   help="distill's reference: 0 replicated, 3 sharded, auto the planner's choice (see above)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="recipe overrides for distill's side, as on the distill.train command line (e.g. train.overlap_frozen=false)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(REPO / "runs" / "bench_dpo"), help="model, data and runs go here")
    p.add_argument("--out", default=None, help="JSON of the results (driver; default WORKDIR/results.json)")
    p.add_argument("--result", default=None, help="JSON of one side's result (--impl distill|trl)")
    p.add_argument("--memory-snapshot", default=None, metavar="DIR",
                   help="record every CUDA allocation; write DIR/<impl>_rank<r>.txt, what is alive at the peak "
                        "(benchmarks/memory_peak.py). Slows the host: use few steps, and take throughput from a run without it")
    a = p.parse_args(argv)
    if a.tiny:
        a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.vocab = 64, 2, 4, 2, 128, 512
        a.seq_len, a.micro_batch, a.warmup, a.steps = min(a.seq_len, 64), min(a.micro_batch, 2), min(a.warmup, 1), min(a.steps, 3)
    a.dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    if a.seq_len < 4 or a.warmup < 1 or a.steps < 1:
        p.error("need --seq-len >= 4, --warmup >= 1 and --steps >= 1")
    return a


# -- shared inputs: tokenizer, pairs, model (written once per configuration) ---------------------
def model_config(a) -> dict:
    return dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate, vocab_size=a.vocab,
                max_position_embeddings=max(2048, a.seq_len), tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)


def n_pairs(a, world: int) -> int:
    return a.micro_batch * a.grad_accum * world * (a.warmup + a.steps)  # one epoch, exactly


def prepare(a, world: int) -> Path:
    """The tokenizer, pairs and model under WORKDIR/<config>; idempotent, safe for concurrent ranks."""
    import fcntl
    import hashlib

    spec = json.dumps([model_config(a), a.seq_len, n_pairs(a, world), a.seed], sort_keys=True)
    d = Path(a.workdir) / f"inputs_{a.hidden}x{a.layers}_s{a.seq_len}_{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "done").exists():
            _write_inputs(a, world, d)
            (d / "done").write_text("")
    return d


def _write_inputs(a, world: int, d: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(a.vocab - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # bos only, like Llama's tokenizers: TRL appends eos to the text itself, distill to the ids.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(d / "tokenizer")
    rng = random.Random(a.seed)
    prompt = a.seq_len // 2 - 1  # + bos
    response = a.seq_len - prompt - 2  # + eos
    with open(d / "pairs.jsonl", "w") as f:
        for _ in range(n_pairs(a, world)):
            text = lambda n: " ".join(rng.choices(words, k=n))  # noqa: E731
            # Responses start with a space: TRL joins prompt and response as strings.
            f.write(json.dumps({"prompt": text(prompt), "chosen": " " + text(response), "rejected": " " + text(response)}) + "\n")
    torch.manual_seed(a.seed)
    LlamaForCausalLM(LlamaConfig(**model_config(a))).save_pretrained(d / "model")


# -- one side --------------------------------------------------------------------------------
def run_distill(a, d: Path, world: int) -> tuple[list[float], list[float]]:
    """(per-step wall clock at step end, per-step loss) of distill's DPOTrainer."""
    from distill.trainers.dpo import DPOTrainer

    return train_distill(DPOTrainer, a, d / "run_distill", world, {
        "policy": {**trained_role(a, d), "deepspeed": f"zero{a.policy_zero}",
                   "gradient_checkpointing": a.gradient_checkpointing, "compile": False},  # plain unless --set asks
        "reference": {"from_pretrained": str(d / "model"), "precision": a.dtype, "compile": False, **(
            {} if a.ref_zero == "auto" else  # the planner places it
            {"deepspeed": int(a.ref_zero), "placement": "sharded" if a.ref_zero == "3" else "replicated"})},
        "dpo": {"loss": "sigmoid", "beta": a.beta},
        "data": {"train": str(d / "pairs.jsonl"), "tokenizer": str(d / "tokenizer"), "max_length": a.seq_len},
        "train": {"micro_batch_size": a.micro_batch, "grad_accum": a.grad_accum},
    })


def trained_role(a, d: Path) -> dict:
    """The trained model's recipe keys every distill side here shares: the saved model, constant-lr AdamW without
    weight decay, the precision."""
    return {"from_pretrained": str(d / "model"), "precision": a.dtype, "optimizer": {"lr": a.lr, "weight_decay": 0.0},
            "scheduler": {"name": "constant"}}


def train_distill(trainer_cls, a, run: Path, world: int, sections: dict, key: str = "loss") -> tuple[list[float], list[float]]:
    """Train `trainer_cls` on `sections` (its roles, its algorithm, data, batch sizes) with what every distill side
    here shares (the timed steps, a metrics line per step, clipping 1.0, `world` processes), then --set; returns
    (elapsed_s, `key`) of each step, from its metrics.jsonl, on rank 0 (empty elsewhere)."""
    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe

    raw = deep_merge({"trainer": trainer_cls.name, "output_dir": str(run), "overwrite": True, "seed": a.seed,
                      "train": {"max_steps": a.warmup + a.steps, "log_every": 1, "grad_clip": 1.0, "progress": False},
                      "launch": {"num_processes": world}}, sections)
    trainer = trainer_cls(validate_recipe(deep_merge(raw, parse_overrides(a.set)), trainer_cls))
    trainer.train()
    if trainer.rank != 0:
        return [], []
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if key in m and "elapsed_s" in m]
    return [m["elapsed_s"] for m in steps], [m[key] for m in steps]


def run_trl(a, d: Path, world: int) -> tuple[list[float], list[float]]:
    """(per-step wall clock at step end, per-step loss) of TRL's DPOTrainer."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    args = DPOConfig(**trl_arguments(a, d / "run_trl", a.micro_batch, a.grad_accum), beta=a.beta, loss_type=["sigmoid"],
                     max_length=a.seq_len, precompute_ref_log_probs=False, gradient_checkpointing=a.gradient_checkpointing,
                     dataloader_drop_last=True)
    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(d / "model", dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(d / "model", dtype=dtype)
    clock: list[float] = []
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok,
                         train_dataset=load_dataset("json", data_files=str(d / "pairs.jsonl"), split="train"),
                         callbacks=[step_clock(clock, cuda)])
    assert trainer.is_deepspeed_enabled, "TRL's trainer is not running under DeepSpeed"
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    return clock, losses


def peak_memory_gib() -> float:
    """`torch.cuda.max_memory_allocated` in GiB, the most over ranks."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def trl_arguments(a, out: Path, per_device: int, grad_accum: int) -> dict:
    """The HF Trainer arguments every TRL side here shares: the timed steps, constant-lr AdamW without weight decay,
    clipping 1.0, DeepSpeed (`trl_deepspeed_config`), a log line per step, nothing saved."""
    return dict(output_dir=str(out), report_to="none", use_cpu=a.device != "cuda", bf16=a.dtype == "bf16", seed=a.seed,
                deepspeed=trl_deepspeed_config(a), per_device_train_batch_size=per_device,
                gradient_accumulation_steps=grad_accum, max_steps=a.warmup + a.steps, logging_steps=1, learning_rate=a.lr,
                lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
                save_strategy="no", disable_tqdm=True)


def trl_deepspeed_config(a) -> dict:
    """TRL's side under DeepSpeed as the HF Trainer fills an "auto" config: ZeRO-2 (or 3) for the trained model."""
    ds = {"zero_optimization": {"stage": a.policy_zero, "overlap_comm": True, "contiguous_gradients": True,
                                "reduce_scatter": True, "allgather_bucket_size": 200_000_000, "reduce_bucket_size": "auto"},
          "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 10**12}
    if a.policy_zero == 3:
        ds["zero_optimization"].update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"})
    return ds


def step_clock(clock: list[float], cuda: bool):
    """A Trainer callback appending the wall clock at each optimizer step's end (the device synced first)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            clock.append(time.perf_counter())

    return StepClock()


def worker(a, sides: dict | None = None) -> None:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    d = prepare(a, world)
    cuda = a.device == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if cuda and a.memory_snapshot:  # before the first allocation, so that the replay sees them all
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=SNAPSHOT_ENTRIES)
    clock, losses = (sides or SIDES)[a.impl](a, d, world)
    if cuda and a.memory_snapshot:
        write_memory_summary(a, rank)
    peak = peak_memory_gib() if cuda else None
    if rank == 0:
        pairs_per_step = a.micro_batch * a.grad_accum * world
        seconds = clock[-1] - clock[a.warmup - 1] if a.warmup else None
        tokens = 2 * pairs_per_step * a.seq_len * a.steps
        result = {
            "impl": a.impl, "world_size": world, "device": torch.cuda.get_device_name() if peak is not None else "cpu",
            "dtype": a.dtype, "params_m": _params_m(d), "seq_len": a.seq_len, "pairs_per_step": pairs_per_step,
            "warmup_steps": a.warmup, "timed_steps": a.steps, "timed_s": seconds,
            "tokens_per_s": tokens / seconds if seconds else None,
            "tokens_per_s_per_device": tokens / seconds / world if seconds else None,
            "step_s": seconds / a.steps if seconds else None, "peak_mem_gib": peak,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None, "losses": losses,
            "policy_zero": a.policy_zero,
            "reference": _reference(a),
            "versions": _versions(),
        }
        Path(a.result or d / f"result_{a.impl}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


SNAPSHOT_ENTRIES = 3_000_000


def _reference(a) -> str:
    if a.title != "DPO":
        return "none"
    if a.impl == "distill":
        return f"ZeRO-{a.ref_zero}" if a.ref_zero != "auto" else "planner (auto)"
    return "ZeRO-3" if a.policy_zero == 3 else "replicated (stage 0)"


def write_memory_summary(a, rank: int) -> None:
    import torch
    from memory_peak import summarise

    snap, device = torch.cuda.memory._snapshot(), torch.cuda.current_device()
    torch.cuda.memory._record_memory_history(enabled=None)
    text = summarise(snap, device)
    if len(snap["device_traces"][device]) >= SNAPSHOT_ENTRIES:
        text = "WARNING: the trace filled its ring buffer; early allocations are missing. Run fewer steps.\n" + text
    out = Path(a.memory_snapshot)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.impl}_rank{rank}.txt").write_text(
        f"torch.cuda.max_memory_allocated: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB\n" + text)


def _params_m(d: Path) -> float:
    from safetensors import safe_open

    n = 0
    for f in d.joinpath("model").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return round(n / 1e6, 2)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "accelerate", "deepspeed", "trl"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


# -- the driver: both sides, then the table ---------------------------------------------------
def driver(a, argv: list[str], script: Path, table_fn=None) -> None:
    from distill.runtime.launch import free_port

    prepare(a, a.num_processes)  # once, before either launch
    out = Path(a.out or Path(a.workdir) / "results.json")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    passthrough = _drop_values(argv, {"--impl", "--num-processes", "--out", "--sides"})
    results = []
    for impl in a.sides:
        result = Path(a.workdir) / f"result_{impl}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(a.num_processes),
               "--num_machines", "1", "--use_deepspeed", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script),
               "--impl", impl, "--result", str(result), *passthrough]
        print(f"== {impl}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO)
        if proc.returncode != 0 or not result.exists():
            sys.exit(f"{impl} failed (exit {proc.returncode}) after {time.perf_counter() - t0:.0f} s")
        results.append(json.loads(result.read_text()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    print((table_fn or table)(results, a.title))
    print(f"\nJSON: {out}")


def _drop_values(argv: list[str], flags: set[str]) -> list[str]:
    """argv without the driver-only flags and their values (`--flag v [v ...]` and `--flag=v`)."""
    out, dropping = [], False
    for x in argv:
        if x.startswith("--"):
            dropping = x in flags
            if not dropping and x.split("=", 1)[0] not in flags:
                out.append(x)
        elif not dropping:
            out.append(x)
    return out


def table(results: list[dict], title: str = "DPO") -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    r0 = results[0]
    models = "policy and reference" if title == "DPO" else "one model, a score head"
    head = (f"{title}, {r0['params_m']}M-param Llama ({models}), {r0['dtype']}, seq {r0['seq_len']}, "
            f"{r0['pairs_per_step']} pairs/step, {r0['world_size']} x {r0['device']}, "
            f"{r0['timed_steps']} steps timed after {r0['warmup_steps']}\n\n")
    rows = [f"| impl | {'policy' if title == 'DPO' else 'model'} | reference | tokens/s | tokens/s/device | step (s) | peak alloc (GiB) | loss first → last |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r['impl']} | ZeRO-{r['policy_zero']} | {r['reference']} | {f(r['tokens_per_s'], '.0f')} | "
                    f"{f(r['tokens_per_s_per_device'], '.0f')} | {f(r['step_s'], '.3f')} | {f(r['peak_mem_gib'], '.2f')} | "
                    f"{f(r['loss_first'], '.4f')} → {f(r['loss_last'], '.4f')} |")
    by = {r["impl"]: r for r in results}
    if {"distill", "trl"} <= set(by) and by["trl"]["tokens_per_s"] and by["distill"]["tokens_per_s"]:
        rows.append(f"\ndistill / trl throughput: {by['distill']['tokens_per_s'] / by['trl']['tokens_per_s']:.2f}x")
    return head + "\n".join(rows)


SIDES = {"distill": run_distill, "trl": run_trl}


def main(argv: list[str] | None = None, *, title: str = "DPO", sides: dict | None = None, script: str = __file__) -> None:
    """Both sides (the driver) or one (inside `accelerate launch`). benchmarks/reward.py passes its own sides, the
    script the driver launches, and the title; the inputs, timing and table are this file's."""
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    a.title = title
    sys.path.insert(0, str(REPO))  # `distill` importable when run as a file from anywhere
    sys.path.insert(0, str(REPO / "benchmarks"))  # and memory_peak
    if a.impl == "both":
        driver(a, argv, Path(script).resolve())
    else:
        worker(a, sides)


if __name__ == "__main__":
    main()
