"""What only a GPU shows, run in processes that see the machine's GPUs (tests/conftest.py hides them from the
rest of the suite); skipped, with the reason, where fewer GPUs are visible than a test needs.

README's quickstart on whatever GPUs there are; the CUDA-graph decode against generate(); compiled layers and
bf16 roles against plain fp32 runs of the same recipe; on 2 GPUs, a ZeRO-2 student beside a ZeRO-3 teacher
over NCCL against the same recipe on 2 CPU processes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import check, gpu_env, machine_gpus, read_json

STEPS = ["train.max_steps=12", "train.eval_every=null", "train.progress=false", "train.log_every=1", "train.save_every=null"]


def _train(cwd: Path, *overrides: str, gpus: bool = True) -> tuple[subprocess.CompletedProcess, list[dict], dict]:
    """`python -m distill.train quickstart OVERRIDES` in `cwd`, as README runs it; (process, metrics lines, summary)."""
    proc = subprocess.run([sys.executable, "-m", "distill.train", "quickstart", "output_dir=run", *overrides],
                          cwd=cwd, capture_output=True, text=True, timeout=900, env=gpu_env() if gpus else None)
    check(proc)
    lines = [json.loads(x) for x in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
    return proc, [m for m in lines if "loss" in m], read_json(cwd / "run" / "summary.json")


@pytest.mark.gpu(1)
def test_readme_quickstart_runs_unchanged_on_the_gpus_there_are(tmp_path):
    """README's first command: 2 processes on 2 or more GPUs, on the CPU with one GPU, the choice said in the table."""
    proc, _, summary = _train(tmp_path, *STEPS)
    said = "device cuda: one GPU per process" if machine_gpus() >= 2 else "device cpu: 2 processes and 1 GPU visible"
    assert said in proc.stdout + proc.stderr
    assert summary["after"]["ce"] < summary["before"]["ce"] - 0.05


@pytest.mark.gpu(1)
def test_graph_replayed_decode_captures_and_equals_generate(tmp_path):
    """Every bucket's decode step captured as a CUDA graph, with 16 eos ids, gives generate()'s greedy tokens."""
    out = tmp_path / "decode.json"
    check(subprocess.run([sys.executable, "-m", "tests.scripts.gpu_check", str(out), "decode"], capture_output=True,
                         text=True, timeout=600, env=gpu_env()))
    for mode, got in read_json(out).items():
        assert got["graphs"] > 0 and not got["graphless"] and got["equal"], (mode, got)


ONE_GPU = ["launch.num_processes=1", "launch.device=cuda", "teacher.placement=replicated"]


@pytest.mark.gpu(1)
def test_compiled_layers_train_as_plain_layers_do(tmp_path):
    """The student's decoder layers compiled: the same losses step by step as plain layers, to float rounding."""
    (tmp_path / "plain").mkdir(), (tmp_path / "compiled").mkdir()
    _, plain, _ = _train(tmp_path / "plain", *STEPS, *ONE_GPU, "student.compile=false")
    proc, compiled, _ = _train(tmp_path / "compiled", *STEPS, *ONE_GPU, "student.compile=true")
    assert re.search(r"student +yes +2 +none +- +fp32 +yes", proc.stdout + proc.stderr)  # the roles table: compiled
    assert len(plain) == len(compiled) == 12
    for a, b in zip(plain, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), (a["step"], a["loss"], b["loss"])


@pytest.mark.gpu(1)
def test_bf16_roles_train_close_to_fp32(tmp_path):
    """Student and teacher in bf16 against fp32: the first loss within bf16's rounding, the run learning as much."""
    (tmp_path / "fp32").mkdir(), (tmp_path / "bf16").mkdir()
    _, full, full_summary = _train(tmp_path / "fp32", *STEPS, *ONE_GPU)
    _, half, half_summary = _train(tmp_path / "bf16", *STEPS, *ONE_GPU, "student.precision=bf16", "teacher.precision=bf16")
    assert half[0]["loss"] == pytest.approx(full[0]["loss"], rel=2e-2)
    drop = lambda s: s["before"]["ce"] - s["after"]["ce"]  # noqa: E731
    assert drop(half_summary) == pytest.approx(drop(full_summary), rel=0.25)


@pytest.mark.gpu(2)
def test_nccl_zero2_student_beside_zero3_teacher_trains_as_on_cpu(tmp_path):
    """2 GPUs over NCCL, the teacher sharded by ZeRO-3: the losses of the same recipe on 2 CPU processes (gloo)."""
    (tmp_path / "gpu").mkdir(), (tmp_path / "cpu").mkdir()
    recipe = [*STEPS, "teacher.placement=sharded", "student.compile=false"]
    proc, on_gpus, _ = _train(tmp_path / "gpu", *recipe, "launch.device=cuda")
    assert "device cuda: one GPU per process (2 processes" in proc.stdout + proc.stderr
    _, on_cpus, _ = _train(tmp_path / "cpu", *recipe, "launch.device=cpu", gpus=False)
    for a, b in zip(on_cpus, on_gpus):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2), (a["step"], a["loss"], b["loss"])
