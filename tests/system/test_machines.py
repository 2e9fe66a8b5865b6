"""Two machines without a shared file system, simulated on one host: two torchrun launchers (`--nnodes 2`), each
in its own directory with its own copy of the data and its own run directory. Each machine keeps a complete copy
of every checkpoint, and `--resume` on both continues the run exactly as if it had not stopped."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, check, free_port, pythonpath

RECIPE = ["quickstart", "output_dir=run", "train.progress=false", "train.log_every=1", "train.eval_every=null",
          "train.save_every=3", "train.keep_checkpoints=2", "train.max_steps=6", "student.scheduler.warmup_steps=20"]


def _two_machines(root: Path, *args: str) -> list[subprocess.CompletedProcess]:
    """Both launchers at once, each in its own directory; their output in files (a full pipe would stall a rank)."""
    port, procs = free_port(), []
    for node in (0, 1):
        where = root / f"machine{node}"
        where.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "distill.train", *RECIPE, *args]
        with open(where / "out.txt", "w") as out, open(where / "err.txt", "w") as err:
            procs.append((where, subprocess.Popen(cmd, cwd=where, stdout=out, stderr=err,
                                                  env={**os.environ, "PYTHONPATH": pythonpath(REPO), "OMP_NUM_THREADS": "1"})))
    done = []
    for where, p in procs:
        p.wait(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, (where / "out.txt").read_text(),
                                                (where / "err.txt").read_text()))
    return done


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


@pytest.mark.multiprocess
def test_each_machine_keeps_a_complete_checkpoint_and_resumes_from_its_own_disk(tmp_path):
    for proc in _two_machines(tmp_path):
        check(proc)
    machines = [tmp_path / f"machine{n}" / "run" / "checkpoints" for n in (0, 1)]
    for node, ckpts in enumerate(machines):
        assert (ckpts / "latest").read_text() == "step_00000006", node
        step = ckpts / "step_00000006"
        assert (step / "trainer_state.json").is_file() and (step / "recipe.yaml").is_file(), node
        assert (step / f"rng_rank{node}.pt").is_file() and not (step / f"rng_rank{1 - node}.pt").exists(), node
        states = {p.name for p in (step / "student" / "state").iterdir()}
        assert f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt" in states, (node, states)
        assert "mp_rank_00_model_states.pt" in states, (node, states)
        assert not list(ckpts.glob(".partial-*")), node
    uninterrupted = _losses(tmp_path / "machine0" / "run")
    # As if both machines had stopped after step 3: each falls back to its own copy of step 3.
    for ckpts in machines:
        shutil.rmtree(ckpts / "step_00000006")
        (ckpts / "latest").write_text("step_00000003")
    for proc in _two_machines(tmp_path, "--resume"):
        check(proc)
    resumed = _losses(tmp_path / "machine0" / "run")
    assert [resumed[s] for s in (4, 5, 6)] == [uninterrupted[s] for s in (4, 5, 6)]
