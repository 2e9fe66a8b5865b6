"""Checkpoints, resume, signals, killed ranks and export, on 2 CPU processes: through the CLI, and the runs that
export reads through `distill.run` under a launcher (one launch for both)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.helpers import check, launch_scenarios, python, tiny_recipe

pytestmark = pytest.mark.multiprocess
WARMING_UP = {"name": "constant", "warmup_steps": 1000}


def _recipe(tmp_path, assets, name, **sections):
    raw = tiny_recipe(assets, tmp_path / name, **sections)
    # The rate rises every step and never reaches its peak, the same whether a run is 4 or 400 steps long: a resumed
    # run that restarted its schedule would differ. Dropout draws from the torch RNG every step: one that restarted
    # its RNG would too.
    raw["student"]["scheduler"] = WARMING_UP
    raw["student"]["config"] = {**raw["student"]["config"], "attention_dropout": 0.1}
    raw["data"]["eval"] = None
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(path, *args, timeout=300, env=None):
    return subprocess.run(python("-m", "distill.train", str(path), *args), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "student" / "model.safetensors"))


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


SAVING = ["train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def saved_runs(assets, tmp_path_factory):
    """A 4-step run with pruned checkpoints per student ZeRO stage, both trained in one 2-process launch."""
    root = tmp_path_factory.mktemp("saved")
    paths = {zero: _recipe(root, assets, zero, student={"deepspeed": zero}) for zero in ("zero2", "zero3")}
    launch_scenarios("tests.scripts.recipe_run", root, root / "histories",
                     {zero: [str(path), *SAVING] for zero, path in paths.items()}, timeout=600)
    return paths


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_export_matches_the_runs_own_save_and_resume_refusals(saved_runs, assets, tmp_path, zero, capsys):
    """A run with pruned checkpoints exports what it saved itself; export of a missing step or of a file that would
    run code is refused. Resuming is refused with no checkpoint, with another number of processes, and an existing
    run is not overwritten without `overwrite` (refusals in this process: they happen before anything launches)."""
    from transformers import AutoModelForCausalLM

    from distill.cli.export import main as export
    from distill.cli.train import main as train

    if zero == "zero2":
        fresh = _recipe(tmp_path, assets, "fresh")
        assert train([str(fresh), "--resume"]) == 2 and "no complete checkpoint" in capsys.readouterr().err
    path = saved_runs[zero]
    run = path.with_suffix("")
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004"]  # keep_checkpoints=1 pruned step 2
    assert (run / "checkpoints" / ckpts[0] / "recipe.yaml").exists()
    if zero == "zero2":
        assert train([str(path), "launch.num_processes=1", "--resume", *SAVING]) == 2
        assert "written by 2 processes" in capsys.readouterr().err
        assert train([str(path), "overwrite=false", "train.max_steps=3"]) == 2 and "--resume" in capsys.readouterr().err
    out = tmp_path / "export"
    assert export([str(run), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    saved = AutoModelForCausalLM.from_pretrained(run / "final" / "student").eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=0, atol=0)
    capsys.readouterr()
    assert export([str(run), str(out), "--step", "2"]) == 2 and "step_00000004" in capsys.readouterr().err
    # A file of the run directory replaced by one that runs code when unpickled: refused, and nothing ran.
    state = next((run / "checkpoints" / ckpts[0] / "student" / "state").glob("*model_states.pt"))
    marker = tmp_path / "ran"
    torch.save({"module": _Payload(f"touch {marker}")}, state)
    assert export([str(run), str(tmp_path / "export2")]) == 2
    assert f"{state} holds objects other than tensors" in capsys.readouterr().err
    assert not marker.exists()


class _Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _start(path, *args):
    # Output to a file: an unread pipe fills up and blocks the run.
    log = open(path.with_suffix(".log"), "w")
    return subprocess.Popen([sys.executable, "-m", "distill.train", str(path), *args], stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for_step(run, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and _steps(run) and _steps(run)[-1] >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("run did not reach the step")


def _workers(proc):
    """The ranks: children of the launching process (the launcher starts each in its own session)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, pids
    return pids


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one_bitwise(assets, tmp_path, capsys):
    """SIGTERM to the whole job: a checkpoint at the step it stops at, exit 0. Resuming with other settings is refused
    by name; resumed with more steps (allowed), the run ends with exactly the weights of a run never stopped. That
    run's ranks start fresh (`DISTILL_RANK_START=spawn`, as where a GPU is visible), the stopped one's are forked:
    both ways train the same weights."""
    from distill.cli.train import main

    path = _recipe(tmp_path, assets, "parts")
    run = tmp_path / "parts"
    proc = _start(path, "train.max_steps=400")
    _wait_for_step(run, 2, proc)
    for pid in _workers(proc) + [proc.pid]:  # the whole job, as a scheduler signals every task before preemption
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0  # stopped as asked, with a checkpoint: a success
    err = path.with_suffix(".log").read_text()
    # Forked ranks leave after their checkpoint as started ones do, not when the launcher's 30 s wait for them runs
    # out and it kills them: a scheduler's grace period may end first.
    assert "forcefully exiting" not in err, err[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stopped = [m for m in metrics if "stopped_by" in m]
    assert stopped and stopped[0]["stopped_by"] == "SIGTERM", err[-3000:]
    step = stopped[0]["step"]
    assert (run / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").exists()
    end = step + 2
    # Another recipe is another run: refused by name, before anything loads; more steps only when allowed.
    assert main([str(path), "--resume", f"train.max_steps={end}", "student.optimizer.lr=1e-3"]) == 2
    out = capsys.readouterr()
    assert f"student.optimizer.lr: 0.003 -> 0.001; train.max_steps: 400 -> {end}" in out.err, out.err
    assert "resume_allow=[student.optimizer.lr,train.max_steps]" in out.err and "roles (" not in out.out
    proc = _train(path, "--resume", f"train.max_steps={end}", "resume_allow=[train.max_steps]")
    check(proc)
    assert "resumed from" in proc.stdout and f"step_{step:08d}" in proc.stdout
    assert _steps(run) == list(range(1, end + 1))
    whole = _recipe(tmp_path, assets, "whole")
    proc = _train(whole, f"train.max_steps={end}", env={"DISTILL_RANK_START": "spawn"})
    check(proc)
    assert "ranks forked from this process" in err and "ranks forked" not in proc.stderr
    a, b = _weights(tmp_path / "whole"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # CPU ops here are deterministic


def test_killed_rank_ends_the_job_and_the_run_resumes(assets, tmp_path):
    path = _recipe(tmp_path, assets, "run", launch={"num_processes": 2, "timeout_s": 900})
    run = tmp_path / "run"
    proc = _start(path, "train.max_steps=400", "train.save_every=2")
    _wait_for_step(run, 3, proc)
    os.kill(max(_workers(proc)), signal.SIGKILL)
    # The job ends instead of hanging until the collective timeout (900 s): within seconds, where the limit here is
    # one a loaded machine cannot reach.
    proc.wait(timeout=300)
    assert proc.returncode != 0
    # A checkpoint written half-way would not be `latest`; the last complete one resumes.
    (run / "checkpoints" / ".partial-step_99999999").mkdir(exist_ok=True)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    with open(run / "metrics.jsonl", "a") as f:  # as a kill after logging a step and before its checkpoint leaves it
        f.write(json.dumps({"step": step + 1, "loss": -1.0}) + "\n")
    proc = _train(path, "--resume", f"train.max_steps={step + 1}", "resume_allow=[train.max_steps]")
    check(proc)
    assert f"resumed from {run / 'checkpoints' / latest}" in proc.stdout
    assert _steps(run) == list(range(1, step + 2))  # each step once, step + 1 as the resumed run logged it
    assert all(json.loads(line).get("loss") != -1.0 for line in (run / "metrics.jsonl").read_text().splitlines())
