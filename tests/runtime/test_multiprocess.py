"""2-process CPU runs under accelerate + DeepSpeed (gloo): the proof that roles work across ranks.

Each test launches a script from tests/scripts/ that asserts inside every rank; see the
scripts for what is checked and why.
"""
import json

import pytest

from tests.helpers import check, launch, launch_scenarios

pytestmark = pytest.mark.multiprocess


def test_roles_switch_shard_logits_save_and_uneven_eval(assets, tmp_path):
    out = tmp_path / "roles.json"
    check(launch("tests.scripts.roles_check", str(assets["root"]), str(out)))
    result = json.loads(out.read_text())
    assert result["local_fraction"] == pytest.approx(0.5, abs=0.02)
    # Ours about 3 us, accelerate's select_deepspeed_plugin (a copy of the config) about 1.5 ms on 2 CPU cores
    # (docs/performance.md): a ratio a loaded machine does not change, both measured in turns in one process.
    assert result["switch_us"] * 20 < result["accelerate_switch_us"], result


TRAIN = {
    "forward_kl": [],
    "chunked_jsd": ["kd.chunked=true", "kd.chunk_size=16", "kd.loss=generalized_jsd", "kd.params={beta: 0.3}"],
    "reverse_kl_T2": ["kd.loss=reverse_kl", "kd.temperature=2.0", "train.grad_accum=1", "train.micro_batch_size=3"],
    # Compiled decoder layers (inductor) in both roles, fused AdamW: the same gradient, and it trains.
    # With the teacher's forward beside the student's, as on GPUs: compiling in one thread while the other
    # calls a compiled layer is refused by torch, so a call that needs a new graph runs again alone.
    # Rows cut to 16 tokens and no eval: one batch shape, so one static graph per role, compiled on the first
    # step (each further width is another graph: 130-160 s on 2 cores with an empty inductor cache, as in CI).
    "compiled_fused": ["student.compile=true", "teacher.compile=true", "teacher.placement=replicated",
                       "student.optimizer.fused=true", "train.overlap_frozen=true", "data.max_length=16", "data.eval=null"],
}
NAN = {"zero2_fp32": ["2", "train.max_steps=4", "student.precision=fp32"],
       "zero2_bf16": ["2", "train.max_steps=4", "student.precision=bf16"],
       "zero3_fp32": ["2", "train.max_steps=4", "student.deepspeed=zero3"],
       "in_a_row": ["2,3,4,5", "train.max_steps=6", "train.max_bad_steps=3"]}


@pytest.fixture(scope="module")
def train_runs(assets, tmp_path_factory):
    return launch_scenarios("tests.scripts.train_check", assets["root"], tmp_path_factory.mktemp("train"), TRAIN)


@pytest.mark.parametrize("name", TRAIN)
def test_distill_run_matches_whole_reference(train_runs, name):
    result = train_runs[name]
    assert result["grad_norm"] == pytest.approx(result["reference"], rel=1e-4)
    assert result["last_loss"] < result["first_loss"]
    assert result["batches_per_rank"][0] == result["batches_per_rank"][1]
    # Nothing imports inductor on CPU unless a role compiles (DeepSpeed's Muon import would: 2.3 s a process).
    # The compiled scenario runs last in the launch, so the others see a process it has not touched.
    assert result["inductor_loaded"] == (name == "compiled_fused")


@pytest.fixture(scope="module")
def clip_runs(assets, tmp_path_factory):
    return launch_scenarios("tests.scripts.clip_check", assets["root"], tmp_path_factory.mktemp("clip"),
                            {"null": ["null"], "0.5": ["0.5"]})


@pytest.mark.parametrize("clip", ["null", "0.5"])
def test_grad_clip_matches_a_reference_optimizer_step(clip_runs, clip):
    """`train.grad_clip: null` does not clip (DeepSpeed clips at 1.0 when its key is absent); a number clips the
    global norm over both ranks' shards as `torch.nn.utils.clip_grad_norm_` does."""
    result = clip_runs[clip]
    assert result["grad_norm"] == pytest.approx(result["reference_norm"], rel=1e-5)
    assert result["reference_norm"] > 2  # clipping at 1.0 would show ...
    assert result["max_diff"] < 1e-6 < 1e-3 < result["max_diff_to_clipped_at_1"]  # ... and does not happen


@pytest.fixture(scope="module")
def nan_runs(assets, tmp_path_factory):
    return launch_scenarios("tests.scripts.nan_check", assets["root"], tmp_path_factory.mktemp("nan"), NAN)


@pytest.mark.parametrize("name", [n for n in NAN if n != "in_a_row"])
def test_nan_loss_on_one_rank_skips_the_step_everywhere(nan_runs, name):
    result = nan_runs[name]
    assert result["unchanged_at_step"] == [False, True, False, False]  # step 2 skipped, training goes on
    assert result["finite"] and result["stopped"] is None


def test_nan_losses_in_a_row_stop_every_rank_together(nan_runs):
    result = nan_runs["in_a_row"]
    assert result["steps_run"] == 4 and "3 steps in a row" in result["stopped"]
    assert result["unchanged_at_step"][1:] == [True, True, True]


def test_replicated_teacher_matches_sharded_and_sharded_gathers_whole_layers(assets, tmp_path):
    """Three runs: sharded (asked to overlap, it must run in turn), replicated in turn, replicated
    overlapped (its forwards in the worker thread); all must train and evaluate alike."""
    import torch

    res = launch_scenarios("tests.scripts.placement_check", assets["root"], tmp_path, {
        "sharded": ["sharded", "train.overlap_frozen=true"], "replicated": ["replicated", "train.overlap_frozen=false"],
        "overlapped": ["replicated", "train.overlap_frozen=true"]}, out="out.pt", read=torch.load)
    s, r, o = res["sharded"], res["replicated"], res["overlapped"]
    assert (s["stage"], r["stage"], o["stage"]) == (3, 0, 0)
    assert s["leaves"] == s["layers"] > 0 and r["leaves"] == 0  # each decoder layer is one ZeRO-3 unit
    assert s["threads"] == r["threads"] == ["MainThread"]
    assert o["threads"] == ["distill-frozen_0"]  # every teacher forward of training and eval beside the student's
    assert s["linear_swapped"] and s["torch_linear"]  # the ZeRO-3 teacher's load swapped it; the student trains on torch's
    for other in (r, o):
        torch.testing.assert_close(s["logits"], other["logits"], atol=1e-5, rtol=1e-5)
        for when in ("before", "after"):
            assert s[when].keys() == other[when].keys()
            for k in s[when]:
                assert other[when][k] == pytest.approx(s[when][k], rel=1e-5, abs=1e-6), (when, k)


def test_two_trainable_roles_step_as_their_references_and_resume_bitwise(assets, tmp_path):
    """Two students, ZeRO-2 and ZeRO-3, each with its own optimizer, warm-up and clipping norm, trained by the one
    loop: each ends with the weights of a plain-torch run of its own (and logs its reference's gradient norm and lr at
    every step); resumed from step 2, the run ends bitwise where the uninterrupted one did."""
    from tests.scripts.two_roles_check import SETTINGS, TRAIN_CLIP

    out = tmp_path / "two.json"
    check(launch("tests.scripts.two_roles_check", str(assets["root"]), str(out)))
    result = json.loads(out.read_text())
    assert result["steps"] == [1, 2, 3, 4] and result["resumed_steps"] == [3, 4]
    for name, role in result["roles"].items():
        assert role["max_diff"] < 1e-6 < 1e-4 < role["moved"], (name, role)
        assert role["grad_norms"] == pytest.approx(role["reference_norms"], rel=1e-5)
        assert role["lrs"] == pytest.approx(role["reference_lrs"], rel=1e-9)
        assert role["resumed_equal"], name
    # Clipping at each role's own norm shows: student_a's gradients are clipped, student_b's (clipping off) are
    # far above train.grad_clip, which neither role uses.
    assert min(result["roles"]["student_a"]["grad_norms"]) > SETTINGS["student_a"]["grad_clip"]
    assert min(result["roles"]["student_b"]["grad_norms"]) > 10 * TRAIN_CLIP
    nan = result["nan_step"]  # one role's NaN loss skips that role's update alone
    assert not nan["finite"] and nan["roles_finite"] == {"student_a": True, "student_b": False}
    assert nan["changed"] == {"student_a": True, "student_b": False} and nan["lr_moved"] == nan["changed"]
    assert "returned ['loss'], without `student_a/loss` (of `student_a`), `student_b/loss` (of `student_b`)" in result["missing_loss"]
