"""docs/writing-a-trainer.md runs as written: its saved Python blocks are the trainers, its YAML blocks the recipes,
run on 2 processes from the command line (the ensemble) and from Python (the two students)."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.doc_blocks import blocks
from tests.helpers import REPO, check, python, pythonpath

pytestmark = pytest.mark.multiprocess
DOC = REPO / "docs" / "writing-a-trainer.md"


def _saved(name: str) -> str:
    return next(b.text for b in blocks(DOC) if b.mark == "save" and b.arg == name)


def _small(recipe_text: str, assets: dict, **train) -> str:
    """The page's recipe pointed at the session's small data, for a fast run."""
    recipe = yaml.safe_load(recipe_text)
    recipe["data"].update(train=assets["train"], eval=assets["eval"], max_length=64)
    for name, block in recipe.items():
        if isinstance(block, dict) and block.get("from_pretrained") == "distill:assets/teacher":
            block["from_pretrained"] = assets["teacher"]
    recipe["train"].update(progress=False, **train)
    return yaml.safe_dump(recipe)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ensemble_trainer_example_runs_on_two_processes(assets, tmp_path):
    (tmp_path / "ensemble.py").write_text(_saved("ensemble.py"))
    (tmp_path / "ensemble.yaml").write_text(_small(_saved("ensemble.yaml"), assets, max_steps=6, log_every=1))
    proc = subprocess.run(python("-m", "distill.train", "ensemble.yaml"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": pythonpath(tmp_path)})
    check(proc)
    assert re.search(r"teacher_a\s+frozen\s+3\s+none\s+sharded\s+fp32", proc.stdout)
    assert re.search(r"teacher_b\s+frozen\s+3\s+none\s+sharded\s+bf16", proc.stdout)
    run = tmp_path / "runs" / "ensemble"
    train = [m for m in _metrics(run) if "kd" in m and "step" in m and "loss" in m]
    assert train[-1]["loss"] < train[0]["loss"]
    assert (run / "final" / "student" / "model.safetensors").exists()
    shutil.rmtree(run)


def test_two_trainable_roles_example_runs_from_python_on_two_processes(assets, tmp_path):
    """The page's `distill.run` block, as written, trains the two students in 2 processes it starts itself: each
    role with its own ZeRO stage, schedule and clipping, its own metrics, checkpoint and final weights."""
    (tmp_path / "two_students.py").write_text(_saved("two_students.py"))
    (tmp_path / "two_students.yaml").write_text(_small(_saved("two_students.yaml"), assets, max_steps=6, log_every=1))
    code = next(b.text for b in blocks(DOC) if b.lang == "python" and "tests/system/test_docs_example.py" in b.arg)
    (tmp_path / "run.py").write_text(code)
    proc = subprocess.run(python("run.py"), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": pythonpath(REPO, tmp_path)})
    check(proc)
    out = proc.stdout
    assert re.search(r"roles \(2 processes\)", out)
    assert re.search(r"small\s+yes\s+2\s", out) and re.search(r"large\s+yes\s+3\s", out)
    run = tmp_path / yaml.safe_load(_saved("two_students.yaml"))["output_dir"]
    steps = [m for m in _metrics(run) if "small/loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 7))
    assert not {"loss", "lr", "grad_norm"} & set(steps[0])  # every number says whose it is
    first, last = steps[0], steps[-1]
    assert first["small/lr"] == pytest.approx(3e-3 / 5) and first["large/lr"] == pytest.approx(1e-3)  # own schedules
    for role in ("small", "large"):
        assert last[f"{role}/loss"] < first[f"{role}/loss"] and first[f"{role}/grad_norm"] > 0
        assert (run / "final" / role / "model.safetensors").exists()
        assert (run / "checkpoints" / "step_00000006" / role / "scheduler.json").exists()
    after = json.loads((run / "summary.json").read_text())["after"]
    assert out.strip().splitlines()[-1] == f"{after['small/kd']} {after['large/kd']}"  # the block's print
