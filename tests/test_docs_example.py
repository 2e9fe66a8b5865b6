"""docs/writing-a-trainer.md runs as written: its Python block is the trainer, its YAML block the recipe."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import check

pytestmark = pytest.mark.multiprocess
DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-trainer.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_ensemble_trainer_example_runs_on_two_processes(assets, tmp_path):
    (code,), (recipe_text,) = _blocks("python"), _blocks("yaml")
    (tmp_path / "ensemble.py").write_text(code)
    recipe = yaml.safe_load(recipe_text)
    # Same recipe, pointed at this session's small data, for a fast run.
    recipe["data"].update(train=assets["train"], eval=assets["eval"], max_length=64)
    recipe["teacher_a"]["from_pretrained"] = recipe["teacher_b"]["from_pretrained"] = assets["teacher"]
    recipe["train"].update(max_steps=6, log_every=1, progress=False)
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "distill.train", "ensemble.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    check(proc)
    assert re.search(r"teacher_a\s+frozen\s+3\s+none\s+sharded\s+fp32", proc.stdout)
    assert re.search(r"teacher_b\s+frozen\s+3\s+none\s+sharded\s+bf16", proc.stdout)
    run = tmp_path / "runs" / "ensemble"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "kd" in m and "step" in m and "loss" in m]
    assert train[-1]["loss"] < train[0]["loss"]
    assert (run / "final" / "student" / "model.safetensors").exists()
    shutil.rmtree(run)
