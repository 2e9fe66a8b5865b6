"""Helpers for the test suite: tiny models and data, and launching a script on 2 CPU processes."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
"""The checkout: launched test scripts import `tests.scripts.*` from it."""
TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def tiny_assets(root: Path, *, n_train: int = 192, n_eval: int = 37, seed: int = 0) -> dict[str, str]:
    """Synthetic data + tokenizer + a random tiny teacher saved in HF format, under `root`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from distill.data.synthetic import write_dataset

    data = root / "data"
    write_dataset(data, seed=seed, n_train=n_train, n_eval=n_eval)
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    teacher = root / "teacher"
    if not (teacher / "config.json").exists():
        torch.manual_seed(1234)
        cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
        model = LlamaForCausalLM(LlamaConfig(**{**cfg, "hidden_size": 48, "intermediate_size": 96}, vocab_size=len(tok)))
        model.save_pretrained(teacher)
        tok.save_pretrained(teacher)
    return {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "tokenizer": str(data / "tokenizer"),
            "teacher": str(teacher)}


ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells 12 sea shells by the sea shore, for 3.50 each.",
    "Don't count your chickens before they hatch!",
    "In 2024, the library opened 7 new reading rooms.",
    "Café owners say naïve customers order the façade special.",
    "Where there's a will, there's a way.",
    "The meeting starts at 10:30 and ends at 11:45.",
]
"""Short English texts with digits, contractions and accents: what a byte-level BPE tokenizer splits in its own way."""

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(out: Path, *, vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2 style: adds no special tokens) with a chat template, trained on `ENGLISH`
    and saved to `out`. Returns it loaded back with `AutoTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(ENGLISH * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def tiny_model_dir(out: Path, model_type: str, vocab_size: int, *, seed: int = 0, **config):
    """A random tiny causal LM of `model_type` (llama, qwen2, gpt2, ...) saved with `save_pretrained` to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64) if model_type != "gpt2" else dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**sizes, **config}))
    model.save_pretrained(out)
    return out


def tiny_recipe(assets: dict[str, str], out: Path, **sections) -> dict:
    """A 2-process distillation recipe on the tiny assets; `sections` are deep-merged on top."""
    from distill.config.recipe import deep_merge

    base = {
        "trainer": "distill", "output_dir": str(out), "seed": 0,
        "student": {"config": TINY_LLAMA, "deepspeed": "zero2", "optimizer": {"lr": 3e-3}},
        "teacher": {"from_pretrained": assets["teacher"], "deepspeed": "zero3"},
        "kd": {"loss": "forward_kl", "alpha": 0.5},
        "data": {"train": assets["train"], "eval": assets["eval"], "max_length": 64},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 6, "log_every": 1, "progress": False},
        "launch": {"num_processes": 2, "timeout_s": 120},
    }
    return deep_merge(base, sections)


def pythonpath(*dirs: str | Path) -> str:
    """PYTHONPATH for a process a test starts: `dirs` first, then the caller's own PYTHONPATH, kept because a
    contributor's packages may be found only through it (a `pip install --target` directory)."""
    return os.pathsep.join(p for p in (*map(str, dirs), os.environ.get("PYTHONPATH")) if p)


FORKED = REPO / "tests" / "forked.py"


def python(*args: str) -> list[str]:
    """The command `python ARGS` as the suite starts it: forked from this worker's forkserver, which imported torch,
    transformers, DeepSpeed, accelerate and distill once (tests/forkserver.py), where that runs it as a fresh
    interpreter would; a fresh interpreter otherwise, and always with DISTILL_TEST_FORK=0. Tests of starting
    itself (the CLI, signals, killed launchers) start `sys.executable` directly."""
    from tests.forked import SOCKET_ENV

    if os.environ.get(SOCKET_ENV):
        return [sys.executable, "-I", str(FORKED), *args]
    return [sys.executable, *args]


def launch(module: str, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` on N CPU processes, started as a plain `python -m distill.train` starts its ranks
    (accelerate's launcher with `--use_deepspeed`; tests/scripts/launch.py). tests/cli/test_cli.py runs
    `accelerate launch`, torchrun and deepspeed themselves."""
    cmd = python("-m", "tests.scripts.launch", str(nproc), module, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": pythonpath(REPO), **(env or {})})


def launch_scenarios(module: str, root: Path, out_dir: Path, scenarios: dict[str, list[str]], *, out: str = "out.json",
                     read=None, **kw) -> dict[str, Any]:
    """Every scenario of test script `module` (`main(ROOT OUT_FILE *args)`) in one 2-process launch
    (tests/scripts/many.py); each scenario's output file read (`read`, JSON by default), by name. One launch's
    imports instead of one per scenario."""
    args = []
    for name, extra in scenarios.items():  # each in its own directory: the scripts write their runs beside the output
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        args += ["::", str(root), str(out_dir / name / out), *extra]
    check(launch("tests.scripts.many", module, *args, **kw))
    return {name: (read or read_json)(out_dir / name / out) for name in scenarios}


def gpu_env() -> dict[str, str]:
    """This process's environment with the machine's GPUs visible again (tests/conftest.py hides them)."""
    env = dict(os.environ)
    machine = env.get("DISTILL_TEST_GPUS", "all")
    if machine == "all":
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = machine
    return env


@functools.cache
def machine_gpus() -> int:
    """GPUs the machine gives the suite, counted in a process of its own: the suite's keeps CUDA unstarted and hidden."""
    probe = "import torch; print(torch.cuda.device_count())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=gpu_env(), timeout=120)
    return int(out.stdout.strip() or 0)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a launcher's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(proc: subprocess.CompletedProcess) -> None:
    """Fail with the processes' output when a launched run failed: the first Python traceback in full (the root
    cause; the launcher's own traceback and the other ranks' come after it), then the tails."""
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- first traceback ---\n{first_traceback(proc.stderr)}"
                             f"\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")


def first_traceback(text: str, lines: int = 60) -> str:
    """The first `Traceback (most recent call last):` block of a launch's stderr, up to `lines` lines."""
    at = text.find("Traceback (most recent call last)")
    return "(none)" if at < 0 else "\n".join(text[at:].splitlines()[:lines])


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def end_of_script() -> None:
    """The end of a multi-process test script: every rank waits, then the process group is torn down
    (as `distill.train` does), so no rank exits while the others' collectives still need it. Then the
    process leaves as `distill.train` does, without interpreter finalization (`distill.runtime.launch.leave`)."""
    import torch.distributed as dist

    from distill.runtime.launch import leave

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    leave(0)


def peak_cpu_bytes(fn) -> int:
    """The most bytes of CPU tensors `fn()` held at once beyond what existed before it: torch.profiler's
    allocation events, replayed in order. What `torch.cuda.max_memory_allocated` measures, on CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak



class OneProcessAccelerator:
    """What TRL's trainers read of their Accelerator, for one process on the CPU: the parity tests build TRL's
    trainers without __init__ and call their loss code directly."""
    num_processes, process_index, device, sync_gradients = 1, 0, torch.device("cpu"), True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    gather_for_metrics = gather


class TrainedModelStub(torch.nn.Module):
    """The model attribute TRL's loss code checks (gradient checkpointing), and nothing else."""
    is_gradient_checkpointing = False
