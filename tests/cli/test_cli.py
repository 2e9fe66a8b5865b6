"""The command line as users run it: plain (it launches 2 processes itself), torchrun, bad input."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from distill.runtime.launch import free_port
from tests.helpers import check, python, pythonpath, tiny_recipe

pytestmark = pytest.mark.multiprocess


def _write(tmp_path, assets, name="recipe.yaml", **sections):
    raw = tiny_recipe(assets, tmp_path / "run", **sections)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _run(args, timeout=300, env=None, fresh=False):
    """`python -m distill.train ARGS`; `fresh`: in a new interpreter, as users start it, not forked (tests.helpers.python)."""
    cmd = [sys.executable, "-m", "distill.train", *args] if fresh else python("-m", "distill.train", *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_plain_cli_launches_two_processes_and_saves_a_loadable_student(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data.text import CausalCollator, load_text_dataset, tokenize_dataset
    from distill.losses import cross_entropy

    path, raw = _write(tmp_path, assets)
    proc = _run([str(path), "train.max_steps=4", "train.eval_every=2"], fresh=True)
    check(proc)
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "eval/ce" in m] == [0, 2, 4]  # before training, step 2 and the end
    # Cosine schedule without warmup over 4 steps: step k (from 0) uses lr * (1 + cos(pi k / 4)) / 2.
    lrs = [m["lr"] for m in metrics if "loss" in m]
    assert lrs == pytest.approx([3e-3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)], abs=1e-12)
    assert all(m["grad_norm"] > 0 for m in metrics if "loss" in m)
    # The run opens with the role table and closes with the before/after table.
    assert re.search(r"student\s+yes\s+2\s+none\s+-\s+fp32", proc.stdout), proc.stdout
    assert re.search(r"teacher\s+frozen\s+3\s+none\s+sharded\s+fp32", proc.stdout)
    assert "teacher placement sharded: auto: no GPU to size it against" in proc.stdout
    assert "student KL(teacher || student)" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())

    # The saved student, loaded the ordinary way, gives the eval loss the run reported.
    model = AutoModelForCausalLM.from_pretrained(run / "final" / "student").eval()
    tok = AutoTokenizer.from_pretrained(run / "final" / "student")
    ds, _ = tokenize_dataset(load_text_dataset(raw["data"]["eval"]), tok, max_length=64)
    collate = CausalCollator(tok.pad_token_id)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            b = collate([ds[j] for j in range(i, min(i + 8, len(ds)))])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(cross_entropy(logits, b["labels"], num_valid_tokens=1))
            n += int((b["labels"] != -100).sum())
    assert total / n == pytest.approx(summary["after"]["ce"], abs=1e-5)
    assert not (run / "final" / "teacher").exists()  # frozen roles are not saved


def test_torchrun_launch(assets, tmp_path):
    path, _ = _write(tmp_path, assets)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "-m", "distill.train", str(path), "train.max_steps=2", "data.eval=null"],
                          capture_output=True, text=True, timeout=300)
    check(proc)
    assert (tmp_path / "run" / "final" / "student" / "model.safetensors").exists()


def test_bad_recipe_exits_2_with_one_message_and_keeps_existing_run(assets, tmp_path, capsys):
    """Refused by the command before it launches anything (so in this process): exit 2, one message."""
    from distill.cli.train import main

    path, _ = _write(tmp_path, assets)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("earlier: run\n")
    assert main([str(path), "overwrite=false"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "overwrite=true" in err
    assert (run / "recipe.yaml").read_text() == "earlier: run\n"
    assert main([str(path), "train.micro_batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "`train.micro_batch_size`" in err and err.count("invalid recipe") == 1  # said once


def test_mismatched_tokenizers_are_refused(assets, tmp_path):
    from transformers import AutoTokenizer

    from distill.data.synthetic import SyntheticLanguage, build_tokenizer

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    other_dir = tmp_path / "other_tok"
    other = build_tokenizer(SyntheticLanguage(0))
    other.add_tokens(["zebra"])
    other.save_pretrained(other_dir)
    assert len(other) != len(tok)
    path, _ = _write(tmp_path, assets, data={"tokenizer": str(other_dir)})
    proc = _run([str(path)], env={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    assert proc.returncode == 2 and "Roles must share one tokenizer" in proc.stderr and "teacher.from_pretrained" in proc.stderr


def test_accelerate_config_with_deepspeed_fields_is_overridden_by_the_recipe(assets, tmp_path):
    """An `accelerate config` file that sets zero_stage and mixed_precision must not stop the run."""
    path, _ = _write(tmp_path, assets)
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_processes": 2, "num_machines": 1,
        "machine_rank": 0, "mixed_precision": "no", "main_process_port": free_port(),
        "deepspeed_config": {"zero_stage": 2, "gradient_accumulation_steps": 1}}))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "-m", "distill.train",
                           str(path), "train.max_steps=2", "data.eval=null"], capture_output=True, text=True, timeout=300)
    check(proc)
    assert "ignoring DeepSpeed settings of the accelerate config" in proc.stdout


def test_deepspeed_launcher_local_rank_argument_is_accepted():
    from distill.cli.train import parse_args

    args = parse_args(["--local_rank=1", "recipes/quickstart.yaml", "train.max_steps=3"])
    assert args.recipe == "recipes/quickstart.yaml" and args.overrides == ["train.max_steps=3"]


def test_help_lists_every_shipped_recipe_and_the_commands():
    from distill.config.presets import shipped_recipes

    proc = subprocess.run(python("-m", "distill", "train", "--help"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in shipped_recipes():
        assert f"\n  {name} " in proc.stdout
    assert "[dpo] DPO on synthetic preferences" in proc.stdout and "docs/recipe-reference.md" in proc.stdout
    top = subprocess.run(python("-m", "distill", "--help"), capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and all(f"distill {c} " in top.stdout for c in ("train", "export", "report", "recipes"))


FAILS_ON_ONE_RANK = """
from torch._dynamo.exc import InternalTorchDynamoError

from distill.trainers.distill import DistillTrainer


class FailsOnRank1(DistillTrainer):
    def loss_step(self, batch, num_tokens):
        self.calls = getattr(self, "calls", 0) + 1
        if self.rank == 1 and self.calls == 3:  # step 2: rank 0 goes on into the gradient all-reduce
            # as a failed compile of that rank's graphs would surface
            raise RuntimeError("injected failure on rank 1") from InternalTorchDynamoError("injected compile error")
        return super().loss_step(batch, num_tokens)
"""


def test_an_error_on_one_rank_ends_the_run_at_once_with_its_traceback(assets, tmp_path):
    """The other rank waits in a collective that the failing one never joins. Were the failing rank to destroy
    the process group first, under NCCL that would wait on the other rank and the run would hang with its error
    unsaid (docs/gpu.md, "A rank fails"). Gloo does not wait there; the message tells."""
    (tmp_path / "fails_on_one_rank.py").write_text(FAILS_ON_ONE_RANK)
    path, _ = _write(tmp_path, assets, trainer="fails_on_one_rank:FailsOnRank1", launch={"timeout_s": 900})
    proc = _run([str(path)], timeout=240, env={"PYTHONPATH": pythonpath(tmp_path)})
    assert proc.returncode == 1, proc.stderr[-3000:]  # the failed rank's status, through the launcher
    assert re.search(r"distill: rank 1 \(.+\) failed:", proc.stderr) and "RuntimeError: injected failure on rank 1" in proc.stderr
    assert re.search(r"distill: rank 1 \(.+\): RuntimeError: injected failure on rank 1\n", proc.stderr)  # its one line
    # the compile hint comes from the rank whose compile failed, not only from rank 0
    assert "distill: compiling the decoder layers failed (above)" in proc.stderr


@pytest.mark.parametrize("launched", [True, False], ids=["rank", "plain"])
def test_a_rank_exits_with_its_code_and_without_finalization(tmp_path, launched):
    """A rank of a finished run must not reach interpreter finalization, where gloo's and DeepSpeed's
    threads now and then abort it ("terminate called without an active exception") and fail the run."""
    marker = tmp_path / "finalized"
    code = ("import atexit, pathlib, sys; from distill.runtime.launch import leave; "
            f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('x')); print('out', end=''); leave(3)")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    if launched:
        env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 3 and proc.stdout == "out"  # buffered output still flushed
    assert marker.exists() is not launched


MISSING_ON_ONE_MACHINE = """
import os

from distill.config.errors import RecipeError
from distill.trainers.distill import DistillTrainer


class MissingOnRank1(DistillTrainer):
    @classmethod
    def check_recipe(cls, recipe):  # as a data file missing on one machine only would fail there
        if os.environ.get("RANK") == "1":
            raise RecipeError("`data.train`: /data/on-machine-0-only/train.jsonl does not exist (injected)")
        super().check_recipe(recipe)
"""


def test_an_error_on_one_machine_is_said_there_and_stops_the_other_machine_within_seconds(assets, tmp_path):
    """Two "machines" (two torchrun launchers of one process each, on localhost). Rank 1's recipe check fails on
    its machine; machine 0 knows nothing of it but through the job's store, and used to wait launch.timeout_s."""
    (tmp_path / "missing_on_one_machine.py").write_text(MISSING_ON_ONE_MACHINE)
    path, _ = _write(tmp_path, assets, trainer="missing_on_one_machine:MissingOnRank1", launch={"timeout_s": 600})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "distill.train", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for node in (0, 1)]
    (_, err0), (_, err1) = (p.communicate(timeout=200) for p in procs)  # 600 s of collective timeout would fail this
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert re.search(r"distill: rank 1 \(.+\): `data.train`: /data/on-machine-0-only/train.jsonl does not exist", err1), err1
    assert re.search(r"distill: rank 0 \(.+\): stopping: rank 1 \(.+\) failed \(exit status 2\)", err0), err0
    assert "does not exist" not in err0


NAN_EVERYWHERE = """
from distill.trainers.distill import DistillTrainer


class NanLoss(DistillTrainer):
    def loss_step(self, batch, num_tokens):
        losses = super().loss_step(batch, num_tokens)
        return {**losses, "loss": losses["loss"] * float("nan")}
"""


def test_a_nan_stop_exits_3_through_the_launcher(assets, tmp_path):
    (tmp_path / "nan_everywhere.py").write_text(NAN_EVERYWHERE)
    path, _ = _write(tmp_path, assets, trainer="nan_everywhere:NanLoss", train={"max_bad_steps": 2}, data={"eval": None})
    proc = _run([str(path)], timeout=240, env={"PYTHONPATH": pythonpath(tmp_path)})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.count("distill: stopped: 2 steps in a row ended with a NaN/Inf loss") == 1
