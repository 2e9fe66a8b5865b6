"""Parity with TRL: on the same tiny models, pairs and hyperparameters, our DPOTrainer's first steps'
losses match TRL's DPOTrainer.

Setup (see tests/scripts/trl_parity.py for what is aligned and why): a random tiny Llama
policy and a different random reference, 8 synthetic pairs forming the one batch of every step,
sigmoid loss with beta 0.5, AdamW lr 1e-3 constant, gradient clipping at 1.0 (active: the step-1
norm is about 2.9), fp32, one CPU process each. Each framework tokenizes the text itself; the test
checks both produce the same token ids before comparing losses.

Tolerance: relative 1e-4 on the losses of steps 1-3. Both sides compute in fp32 with other
summation orders (padding widths, TRL's chunked fused LM head, DeepSpeed's flattened ZeRO-2 AdamW
against torch's AdamW), which differ by float32 rounding: about 3e-7 relative when written. The
margin leaves room for other BLAS builds and thread counts while staying far below what a change of
method would show (a step-1 reward of order 1e-2 is the signal being compared); the token ids are
compared exactly, separately.
"""
import json
import os
import subprocess

import pytest

from tests.helpers import python

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.trl


def _run(*args, cwd=None):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
    return subprocess.Popen(python(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _wait(proc, what):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-8000:]}"


def test_first_dpo_steps_match_trl(tmp_path):
    from tests.scripts.trl_parity import PAIRS, STEPS, hand_loss, prepare

    paths = prepare(tmp_path)
    # Two processes, side by side: accelerate's state is process-global, so the trainers can't share one.
    ours = _run("-m", "distill.train", paths["recipe"])
    theirs = _run("-m", "tests.scripts.trl_parity", "trl", str(tmp_path))
    _wait(ours, "distill.train")
    _wait(theirs, "TRL's DPOTrainer")

    trl_out = json.loads((tmp_path / "trl.json").read_text())
    assert len(trl_out["trl_ids"]) == PAIRS
    assert trl_out["trl_ids"] == trl_out["distill_ids"], "the two frameworks tokenized the pairs differently"

    metrics = [json.loads(line) for line in open(paths["metrics"])]
    train = [m for m in metrics if "loss" in m and "grad_norm" in m]
    assert [m["step"] for m in train] == list(range(1, STEPS + 1))
    our_loss, trl_loss = [m["loss"] for m in train], trl_out["loss"]
    assert len(trl_loss) == STEPS
    assert our_loss == pytest.approx(trl_loss, rel=1e-4), (our_loss, trl_loss)
    # Learning happened (so steps 2-3 test the optimizer too) and the reference is not the policy.
    assert our_loss[2] < our_loss[0] - 0.05
    assert train[0]["rewards/chosen"] != 0.0
    assert train[0]["rewards/chosen"] == pytest.approx(trl_out["rewards/chosen"][0], rel=1e-4, abs=1e-6)
    # Same pre-clip gradient norm at step 1, and large enough that clipping acted on both sides.
    assert train[0]["grad_norm"] == pytest.approx(trl_out["grad_norm"][0], rel=1e-4)
    assert train[0]["grad_norm"] > 1.0

    # Step 1 from the two saved models by hand: one unpadded forward per sequence, float64 sums.
    assert our_loss[0] == pytest.approx(hand_loss(tmp_path), rel=1e-5)
