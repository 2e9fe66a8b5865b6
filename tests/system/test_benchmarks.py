"""The benchmark scripts run end to end on CPU and report every field they promise."""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import python

REPO = Path(__file__).resolve().parents[2]


def test_distill_throughput_tiny_on_one_cpu_process(tmp_path):
    out, log = tmp_path / "bench.json", tmp_path / "bench.log"
    cmd = python(str(REPO / "benchmarks" / "distill_throughput.py"), "--pair", "tiny", "--device", "cpu",
           "--modes", "naive", "sharded", "replicated", "--micro-batch", "2", "3", "--warmup", "1", "--steps", "2",
           "--timing-steps", "1", "--peak-tflops", "0.5", "--cprofile", str(tmp_path / "cp"), "--out", str(out))
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=600, cwd=tmp_path)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, log.read_text()[-6000:]
    res = json.loads(out.read_text())

    # FLOPs per token, from the tiny configs by hand (see the benchmark's docstring).
    sys.path.insert(0, str(REPO / "benchmarks"))
    import distill_throughput as bench

    s_cfg, t_cfg = bench.model_configs(bench.parse_args(["--pair", "tiny", "--device", "cpu"]))
    S, V = 32, 256

    def matmul_params(c, total):
        return total - V * c["hidden_size"]  # untied: all but the input embedding

    def attn(c):
        return 4 * c["num_hidden_layers"] * S * c["hidden_size"]

    fpt = (6 * matmul_params(s_cfg, res["student_params"]) + 3 * attn(s_cfg)
           + 2 * matmul_params(t_cfg, res["teacher_params"]) + attn(t_cfg))
    assert res["flops_per_token"] == fpt
    assert res["world_size"] == 1 and res["seq_len"] == S and res["peak_flops_per_gpu"] == 0.5e12

    rows = res["results"]
    assert [(r["mode"], r["micro_batch"]) for r in rows] == [(m, b) for m in ("naive", "sharded", "replicated") for b in (2, 3)]
    stage = {r["mode"]: r["teacher_zero_stage"] for r in rows}
    assert stage == {"naive": 3, "sharded": 3, "replicated": 0}
    # The step time against what the test and the phase split measure on their own: the timed steps fit in the
    # benchmark's wall time, and a step takes about as long as its phases timed one by one. The median over the six
    # rows, within 8x either way: one step on a loaded machine can stall for a second (25x its phases, seen on a
    # 2-core CI machine), while a time per token or per ms would put every row 60 to 1000 times off.
    assert sum(r["step_s"] for r in rows) * 2 < wall
    ratios = sorted(r["step_s"] / sum(r["split_s"].values()) for r in rows)
    assert 1 / 8 < statistics.median(ratios) < 8, ratios
    for r in rows:
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["micro_batch"] * S / r["step_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s_per_gpu"] * fpt / 0.5e12)
        assert set(r["split_s"]) == set(bench.PHASES) and all(v >= 0 for v in r["split_s"].values())
        assert r["split_s"]["teacher_forward"] > 0 and r["split_s"]["backward"] > 0
        assert sum(r["split_frac"].values()) == pytest.approx(1.0)
        assert len(r["peak_mem_gib_per_rank"]) == 1
    naive_z = next(r for r in rows if r["mode"] == "naive")["student_zero"]
    assert naive_z["reduce_bucket_size"] == s_cfg["hidden_size"] ** 2  # accelerate's derivation, not ours
    for mb in ("2", "3"):
        assert set(res["summary"][mb]) == {"sharded_over_naive_tokens", "replicated_over_naive_tokens",
                                           "naive_teacher_forward_over_replicated", "sharded_teacher_forward_over_replicated"}
    assert "tok/s/GPU" in log.read_text()
    # --cprofile: where the host spent our steps, per mode and micro-batch
    assert "distill/loop/trainer.py" in (tmp_path / "cp.replicated.2.txt").read_text()
    assert "by cumulative" in (tmp_path / "cp.naive.3.txt").read_text()


@pytest.mark.multiprocess
def test_targets_script_runs_its_steps(tmp_path):
    """benchmarks/targets.sh in its CPU smoke mode, two steps that cover its two kinds of launch: a profiled
    throughput comparison and DPO (distill's side; ONLY=, as a time-limited job runs it); each writes what the
    docs read. The other steps are the same launches with other sizes and flags."""
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "targets.sh"), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "SMOKE": "1", "ONLY": "small_profile dpo"})
    assert proc.returncode == 0, proc.stdout[-3000:] + (tmp_path / "log.txt").read_text()[-6000:]
    res = json.loads((tmp_path / "small_profile.json").read_text())
    assert res["world_size"] == 2 and [r["mode"] for r in res["results"]] == ["replicated"]
    assert all(r["tokens_per_s_per_gpu"] > 0 for r in res["results"])
    assert (tmp_path / "profile.replicated.2.txt").read_text().count("aten::mm") == 1
    res = json.loads((tmp_path / "dpo.json").read_text())
    assert [(r["impl"], r["world_size"]) for r in res["results"]] == [("distill", 2)]
    assert all(not (tmp_path / f"{name}.json").exists() for name in ("small", "large"))  # ONLY= ran nothing else


def test_throughput_plot_draws_every_results_file(tmp_path):
    from PIL import Image

    results = REPO / "benchmarks" / "results"
    out = tmp_path / "plot.png"
    files = [str(results / name) for name in ("throughput_0.3b_1.4b_compiled_h200x2.json", "throughput_1b_7b_h200x4.json")]
    proc = subprocess.run(python("benchmarks/plot_throughput.py", *files, "--out", str(out)), capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    width, height = Image.open(out).size
    assert width > 2 * height * 0.7  # two pairs side by side, two panels each


def test_logps_memory_benchmark_counts_the_chunks():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import logps_memory

    mib = logps_memory.main(["--tokens", "512", "--hidden", "32", "--vocab", "3000"])
    block = 512 * 3000 * 4 / 2**20  # the whole fp32 [tokens, V]: one chunk here
    assert mib["logits_grad"] == pytest.approx(512 * 3000 * 2 / 2**20)
    assert block <= mib["logits"] - mib["logits_grad"] <= 1.25 * block
    assert 0.5 * block < mib["chunked"] <= 1.75 * block


def test_memory_peak_replays_a_trace_to_what_was_alive_at_the_peak():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory_peak import peak_allocations, summarise

    def frames(line, name):  # innermost first, as in a snapshot: a torch frame, then ours
        return [{"filename": "/site/torch/nn/functional.py", "line": 1, "name": "linear"},
                {"filename": "/repo/distill/trainers/dpo.py", "line": line, "name": name}]

    mib = 2**20
    trace = [
        {"action": "alloc", "addr": 1, "size": 100 * mib, "stream": 0, "frames": frames(10, "weights")},
        {"action": "alloc", "addr": 2, "size": 300 * mib, "stream": 7, "frames": frames(20, "reference")},
        # used by another stream: stops counting when freed, though handed back later
        {"action": "free_requested", "addr": 2, "size": 300 * mib, "stream": 7},
        {"action": "alloc", "addr": 3, "size": 250 * mib, "stream": 0, "frames": frames(30, "policy")},
        {"action": "free_completed", "addr": 2, "size": 300 * mib, "stream": 7},
        {"action": "alloc", "addr": 4, "size": 60 * mib, "stream": 0, "frames": frames(30, "policy")},
        {"action": "free_requested", "addr": 3, "size": 250 * mib, "stream": 0},
    ]
    peak, at, alive = peak_allocations(trace)
    assert (peak, at) == (410 * mib, 5)  # 100 + 250 + 60, not the earlier 100 + 300
    assert sorted(e["addr"] for e in alive) == [1, 3, 4]
    text = summarise({"device_traces": [trace]})
    assert "peak 410.0 MiB allocated at event 5" in text
    assert "by stream: 0: 410.0 MiB" in text
    rows = [line.split() for line in text.splitlines()[3:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("310.0", "2", "distill/trainers/dpo.py:30"),
                                                  ("100.0", "1", "distill/trainers/dpo.py:10")]


def test_build_time_reports_the_cpu_build_of_the_pairs_teacher():
    """The reported build time lies between the CPU time this process takes for the same build on one thread
    (the wall time of a one-thread build is no shorter; half of it, for noise) and the script's whole wall time."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    start = time.perf_counter()
    proc = subprocess.run(python(str(REPO / "benchmarks" / "build_time.py"), "--pair", "tiny", "--device", "cpu"),
                          capture_output=True, text=True, timeout=120, cwd=REPO / "benchmarks")
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pair"] == "tiny" and result["threads"] == 1 and "gpu_s" not in result
    sys.path.insert(0, str(REPO / "benchmarks"))
    from distill_setups import LLAMA, PAIRS

    config = LlamaConfig(**{k: v for k, v in {**LLAMA, **PAIRS["tiny"][1], "max_position_embeddings": 1024}.items()
                            if k != "model_type"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu = time.process_time()
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        cpu = time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    assert 0.5 * cpu <= result["cpu_s"] < wall, (cpu, result["cpu_s"], wall)


def test_generation_benchmark_checks_and_times_on_cpu(tmp_path):
    """benchmarks/generation.py's CPU smoke run: the greedy check against generate() and the timing of two candidates."""
    out = tmp_path / "generation.json"
    proc = subprocess.run(python("benchmarks/generation.py", "--model", "tiny", "--batch", "4", "--new-tokens", "8",
                           "--prompt-len", "8", "--parts", "check", "throughput", "--candidates", "static", "generate",
                           "--out", str(out)), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["check"] == [{"mode": "static", "equal": True, "rows": 24, "first_difference": None, "width": [48, 48]}]
    assert {(r["candidate"], r["batch"]) for r in result["throughput"]} == {("static", 4), ("generate", 4)}
    assert all(r["tokens"] == [32] and r["tokens_per_s"] > 0 for r in result["throughput"])
