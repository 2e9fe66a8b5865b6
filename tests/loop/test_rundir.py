"""A run directory belongs to one run: its lock, `overwrite` over an older run, pruning, resume identity."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from distill.cli.train import main
from distill.config.errors import RecipeError
from distill.loop.rundir import LOCK_FILE, check_resume_identity, lock_run_dir, recipe_changes, release_run_dir
from distill.trainers import load_recipe
from tests.helpers import check, python, tiny_recipe


def _hold(run, env, started, done):
    """In a forked process: take the run directory's lock (with `env` as the environment) and keep it."""
    os.environ.clear()
    os.environ.update(env)
    try:
        lock_run_dir(run)
        started.put("held")
    except RecipeError as e:
        started.put(str(e))
    done.wait(600)


def _holder(run, env):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # no second interpreter to start: the lock is all it does
    started, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(run, env, started, done), daemon=True)
    proc.start()
    return proc, started.get(timeout=60)


def test_lock_refuses_a_second_run_names_the_first_and_dies_with_it(tmp_path):
    run = tmp_path / "run"
    holder, said = _holder(run, {k: v for k, v in os.environ.items() if k != "DISTILL_RUN_LOCK"})
    try:
        assert said == "held"
        with pytest.raises(RecipeError, match=f"is in use by another run \\(pid {holder.pid} on "):
            lock_run_dir(run)
        # A process the holder starts (a rank of its launch) inherits its token and runs under its lock.
        token = json.loads((run / LOCK_FILE).read_text())["token"]
        child, said = _holder(run, {**os.environ, "DISTILL_RUN_LOCK": token})
        child.kill()
        assert said == "held"
    finally:
        holder.kill()  # a run killed hard leaves the file behind, not the lock
        holder.join()
    assert (run / LOCK_FILE).exists()
    lock_run_dir(run)
    release_run_dir(run)


def test_recipe_changes_name_what_changes_the_result():
    saved = {"seed": 0, "output_dir": "a", "train": {"max_steps": 30, "log_every": 10, "save_every": 5},
             "student": {"optimizer": {"lr": 3e-3, "fused": None}, "compile": None, "config": {"hidden_size": 32}},
             "launch": {"num_processes": 2, "timeout_s": 60}}
    now = {"seed": 0, "output_dir": "b", "train": {"max_steps": 12, "log_every": 1, "save_every": None},
           "student": {"optimizer": {"lr": 1e-3, "fused": True}, "compile": False, "config": {"hidden_size": 32}},
           "launch": {"num_processes": 2, "timeout_s": 30}, "resume": True}
    assert recipe_changes(saved, now, []) == {"student.optimizer.lr": (3e-3, 1e-3), "train.max_steps": (30, 12)}
    assert recipe_changes(saved, now, ["train.max_steps", "student.optimizer"]) == {}
    now["student"]["config"]["num_hidden_layers"] = 3
    now["student"]["grad_clip"] = None  # a key the checkpoint's distill did not have yet, at its default: no change
    assert recipe_changes(saved, now, ["train"]) == {"student.optimizer.lr": (3e-3, 1e-3),
                                                     "student.config.num_hidden_layers": ("<absent>", 3)}
    now["student"]["grad_clip"] = 0.5
    assert recipe_changes(saved, now, ["train", "student.optimizer", "student.config"]) == {
        "student.grad_clip": ("<absent>", 0.5)}


def test_resume_allow_must_name_recipe_keys(assets, tmp_path):
    raw = tiny_recipe(assets, tmp_path / "run", resume_allow=["train.max_stepz"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe, _ = load_recipe(tmp_path / "r.yaml")
    with pytest.raises(RecipeError, match=r"`resume_allow`: \['train.max_stepz'\] name no recipe key"):
        check_resume_identity(tmp_path, recipe)


def test_prune_keeps_the_newest_by_step_and_drops_a_left_timeline(tmp_path):
    from distill.loop.checkpoint import latest_checkpoint, prune_checkpoints

    root = tmp_path / "checkpoints"
    for step in (3, 9, 10, 25, 30):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    (root / "step_00000030" / "trainer_state.json").unlink()  # incomplete: not a checkpoint, left alone
    prune_checkpoints(root, 10, keep=2)  # this run just wrote step 10; 25 was written by a timeline it left
    assert sorted(p.name for p in root.iterdir()) == ["step_00000009", "step_00000010", "step_00000030"]
    (root / "latest").write_text("../../elsewhere")
    assert latest_checkpoint(tmp_path) is None  # `latest` names a checkpoint beside it, nothing else
    (root / "latest").write_text("step_00000010")
    assert latest_checkpoint(tmp_path) == root / "step_00000010"
    (root / "latest").write_text("step_00000030")
    assert latest_checkpoint(tmp_path) is None  # no trainer_state.json (written last): not complete


def test_metrics_keep_one_timeline_across_a_resume(tmp_path):
    from distill.cli.report import read_metrics
    from distill.loop.rundir import truncate_metrics

    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval/ce": 2.4}, {"step": 3, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    again = [{"step": 3, "loss": 2.1}, {"step": 4, "loss": 1.9}]
    # A directory written before the cut on resume: the report follows the later timeline.
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + again))
    assert read_metrics(old) == rows[:3] + again
    truncate_metrics(tmp_path, 2)  # resumed from step 2
    assert read_metrics(tmp_path) == rows[:3]


def _train(path, *args, timeout=300):
    return subprocess.run(python("-m", "distill.train", str(path), *args), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.multiprocess
def test_overwrite_over_an_older_longer_run_keeps_only_the_new_run(assets, tmp_path):
    """The older run's later checkpoints used to outrank the new ones in pruning: each new checkpoint was deleted
    as soon as it was written and `latest` named a deleted directory. `overwrite` now clears the older run first."""
    from safetensors.torch import load_file

    from distill.cli.export import main as export_main

    run = tmp_path / "run"
    raw = tiny_recipe(assets, run, overwrite=True, launch={"num_processes": 1}, data={"eval": None})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    old = run / "checkpoints"  # what an older run of 30 steps left: checkpoints 25 and 30, its metrics, a user file
    for step in (25, 30):
        (old / f"step_{step:08d}").mkdir(parents=True)
        (old / f"step_{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (old / "latest").write_text("step_00000030")
    (run / "recipe.yaml").write_text("older: run\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 30, "loss": 1.0}) + "\n")
    (run / "notes.txt").write_text("mine")
    proc = _train(path, "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=2")
    check(proc)
    assert "deleted the earlier run" in proc.stdout
    assert sorted(p.name for p in old.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert (old / "latest").read_text() == "step_00000002"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"  # not the run's: left alone
    out = tmp_path / "export"
    assert export_main([str(run), str(out)]) == 0
    exported, final = load_file(str(out / "student" / "model.safetensors")), load_file(str(run / "final" / "student" / "model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


@pytest.mark.multiprocess
def test_a_second_run_is_refused_and_a_killed_launcher_takes_its_ranks_with_it(assets, tmp_path, capsys):
    run = tmp_path / "run"
    raw = tiny_recipe(assets, run, overwrite=True, data={"eval": None})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "distill.train", str(path), "train.max_steps=400"], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.3)
        # overwrite: true, as every shipped CPU recipe has it; refused before anything is built or deleted
        assert main([str(path), "train.max_steps=2"]) == 2
        assert f"is in use by another run (pid {first.pid} on " in capsys.readouterr().err
        assert (run / "metrics.jsonl").read_text()
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True, text=True).stdout.split()]
        assert len(ranks) == 2
        first.send_signal(signal.SIGKILL)
        first.wait()
        t0 = time.time()
        while any(_alive(p) for p in ranks):  # a limit no loaded machine reaches; 400 steps take longer unloaded
            assert time.time() - t0 < 300, "the ranks of a killed launcher went on training"
            time.sleep(0.2)
        assert "its launcher (pid" in (tmp_path / "first.log").read_text()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert steps[-1] < 400, "the ranks of a killed launcher trained to the end"
    finally:
        if first.poll() is None:
            first.kill()
    lock_run_dir(run)  # the killed run's lock went with it
    release_run_dir(run)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its new parent) no longer runs
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
