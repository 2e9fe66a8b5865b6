"""DPOTrainer: the loss against a whole single-process reference, precomputed vs live reference, learning."""
import json

import pytest
import torch

from tests.helpers import check, launch_scenarios, python

ROOT_ARGS = ["dpo.loss=sigmoid"]


@pytest.fixture(scope="module")
def live_and_cached(assets, tmp_path_factory):
    return launch_scenarios("tests.scripts.dpo_check", assets["root"], tmp_path_factory.mktemp("dpo"), {
        "live": ROOT_ARGS, "cached": [*ROOT_ARGS, "dpo.precompute_reference=true"],
        "overlapped": [*ROOT_ARGS, "reference.placement=replicated", "train.overlap_frozen=true"]})


@pytest.mark.multiprocess
def test_dpo_step_matches_whole_reference(live_and_cached):
    # dpo_check asserts the grad norm and loss against plain torch inside the run; here, the record.
    first = live_and_cached["live"]["first"]
    assert first["grad_norm"] == pytest.approx(live_and_cached["live"]["reference_grad_norm"], rel=1e-4)
    assert first["rewards/chosen"] != 0.0  # policy != reference: the check is not trivial
    # No role's forward kept a KV cache (all 20 layers' keys and values, for a no_grad reference).
    assert [run["kv_caches"] for run in live_and_cached.values()] == [[], [], []]
    # dpo_check compared the trained run's reference with its source, bit for bit (the cached run freed it).
    assert [run["reference_checked"] for run in live_and_cached.values()] == [True, False, True]


@pytest.mark.multiprocess
def test_reference_beside_the_policy_gives_the_same_step(live_and_cached):
    # dpo_check also asserts this run's grad norm and loss against plain torch.
    live, over = live_and_cached["live"], live_and_cached["overlapped"]
    assert live["reference_threads"] == ["MainThread"]  # ZeRO-3 on CPU: in turn
    assert over["reference_threads"] == ["distill-frozen_0"]
    # Beside it, only the decoders: the policy's head (and backward, its memory peak) waits for the reference.
    assert over["policy_heads"] > 0 and not over["policy_head_before_reference_done"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
        assert over["first"][key] == pytest.approx(live["first"][key], rel=1e-5, abs=5e-6), key


@pytest.mark.multiprocess
def test_precomputed_reference_gives_the_same_run(live_and_cached):
    live, cached = live_and_cached["live"], live_and_cached["cached"]
    # The cached pass batches pairs differently (other padding widths), so reference log-probs of
    # about -50 agree to float32 rounding (~4e-6), not bitwise; rewards are beta times their differences.
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "grad_norm"):
        assert cached["first"][key] == pytest.approx(live["first"][key], rel=1e-5, abs=5e-6), key
    assert cached["history"]["after"]["loss"] == pytest.approx(live["history"]["after"]["loss"], rel=1e-4)


@pytest.mark.multiprocess
def test_dpo_quickstart_learns_the_preferences(tmp_path):
    import subprocess

    proc = subprocess.run(python("-m", "distill.train", "recipes/dpo_quickstart.yaml", f"output_dir={tmp_path}/run",
                           "train.max_steps=30", "train.progress=false"), capture_output=True, text=True, timeout=600)
    check(proc)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["loss"] == pytest.approx(0.6931, abs=1e-3)  # reference == policy at the start
    assert summary["after"]["rewards/accuracy"] > 0.8  # held-out pairs; chance is 0.5
    assert "eval reward accuracy" in proc.stdout


def test_sequence_logps_against_a_loop():
    from distill.trainers.dpo import sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, -100, -100], [-100, 3, 4, 5, 6], [-100] * 5])
    got = sequence_logps(logits, labels)
    want = torch.zeros(3, dtype=torch.float64)
    for r in range(3):
        for t in range(5):
            if labels[r, t] != -100:
                want[r] += torch.log_softmax(logits[r, t], -1)[labels[r, t]]
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_sequence_logps_match_log_softmax_in_value_and_gradient(dtype):
    from distill.losses.logps import sequence_logps

    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 9, 50)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (4, 9))
    labels[0, :3] = -100
    labels[3] = -100
    weights = torch.randn(4)
    got = sequence_logps(logits, labels, chunk=5)  # chunks that cut across rows
    (got * weights).sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    want = (logp * mask).sum(-1)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), logits.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert grad.dtype == dtype and got.dtype == torch.float32
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1, -100, 5], [0, 2, 3]])
    assert torch.autograd.gradcheck(lambda t: sequence_logps(t, y, chunk=2), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_sequence_logps_equal_logits_path_in_value_and_gradients(dtype):
    from distill.losses.logps import head_sequence_logps, sequence_logps

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    weight = (0.5 * torch.randn(40, 16)).to(dtype).requires_grad_()
    labels = torch.randint(0, 40, (3, 7))
    labels[0, :2] = -100
    labels[2] = -100  # a padding pair's row: 0, and no gradient
    w = torch.randn(3)
    got = head_sequence_logps(hidden, weight, labels, chunk=4)
    (got * w).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = sequence_logps(hidden @ weight.T, labels)
    (want * w).sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].float(), hidden.grad.float(), **tol)
    torch.testing.assert_close(grads[1].float(), weight.grad.float(), **tol)
    assert got[2] == 0 and grads[0][2].abs().sum() == 0
    h = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1, -100, 5], [0, 2, 3]])
    assert torch.autograd.gradcheck(lambda a, b: head_sequence_logps(a, b, y, chunk=2), (h, wt))


def test_chunked_logps_hold_one_fp32_block_at_a_time():
    """Each chunk's softmax and its gradient are computed in place: beyond its inputs, outputs and
    gradients, a chunk holds one fp32 [c, V] block and the bf16 one it came from. (Out-of-place
    exp/sub/mul held three fp32 blocks at once in backward.)"""
    from distill.losses.logps import head_sequence_logps, sequence_logps
    from tests.helpers import peak_cpu_bytes

    torch.manual_seed(0)
    M, H, V, c = 2048, 64, 8000, 1024
    block = c * V * 4  # one fp32 [c, V] chunk: 32 MB
    hidden = torch.randn(1, M, H, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.1 * torch.randn(V, H)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (1, M))
    peak = peak_cpu_bytes(lambda: head_sequence_logps(hidden, weight, labels, chunk=c).sum().backward())
    grad_w_fp32 = V * H * 4  # the weight gradient is accumulated in fp32 over chunks
    assert peak <= 1.5 * block + grad_w_fp32 + 3 * weight.numel() * 2 + 8 * hidden.numel() * 2, peak / block
    logits = torch.randn(1, M, V, dtype=torch.bfloat16, requires_grad=True)
    peak = peak_cpu_bytes(lambda: sequence_logps(logits, labels, chunk=c).sum().backward())
    assert peak <= 1.25 * block + logits.numel() * 2, peak / block  # + the bf16 gradient of the logits
    # fp32 logits are copied before the in-place math, never overwritten
    x = torch.randn(2, 5, 11, requires_grad=True)
    kept = x.detach().clone()
    sequence_logps(x, torch.randint(0, 11, (2, 5)), chunk=3).sum().backward()
    assert torch.equal(x.detach(), kept)


def test_head_logps_chunks_fit_their_block_budget():
    """Default chunks: a frozen role's forward (no grad; it may run beside the trainable role's)
    holds a quarter of the trainable block, and both give the same numbers."""
    from distill.losses.logps import FROZEN_BLOCK_BYTES, head_chunk_rows, head_sequence_logps
    from tests.helpers import peak_cpu_bytes

    torch.manual_seed(0)
    M, H, V = 4096, 32, 16000
    hidden = torch.randn(1, M, H, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.1 * torch.randn(V, H)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (1, M))
    assert (head_chunk_rows(V, grad=True), head_chunk_rows(V, grad=False)) == (2097, 524)  # 128 and 32 MiB of fp32
    with torch.no_grad():
        frozen = head_sequence_logps(hidden, weight, labels)
        peak = peak_cpu_bytes(lambda: head_sequence_logps(hidden, weight, labels))
    bf16_block = FROZEN_BLOCK_BYTES // 2  # the chunk's matmul output, before its fp32 copy
    assert FROZEN_BLOCK_BYTES <= peak <= FROZEN_BLOCK_BYTES + bf16_block + 4 * hidden.numel() * 2, peak / FROZEN_BLOCK_BYTES
    trained = head_sequence_logps(hidden, weight, labels)
    torch.testing.assert_close(trained.detach(), frozen)
    torch.testing.assert_close(frozen, head_sequence_logps(hidden.detach(), weight.detach(), labels, chunk=M))


def test_dpo_recipe_errors(assets, tmp_path):
    from distill.config.errors import RecipeError
    from distill.config.recipe import validate_recipe
    from distill.trainers.dpo import DPOTrainer

    raw = {"trainer": "dpo", "output_dir": str(tmp_path), "data": {"train": "x.jsonl"},
           "policy": {"from_pretrained": assets["teacher"]}}
    recipe = validate_recipe(raw, DPOTrainer)
    assert recipe.reference.from_pretrained == assets["teacher"]  # the reference defaults to the policy's weights
    with pytest.raises(RecipeError, match="dpo.loss"):
        validate_recipe({**raw, "dpo": {"loss": "sigmoidd"}}, DPOTrainer)
    with pytest.raises(RecipeError, match="weights_from"):
        validate_recipe({**raw, "reference": {"weights_from": "critic"}}, DPOTrainer)


def test_head_logps_refused_where_the_head_is_not_a_plain_matmul():
    from types import SimpleNamespace

    from distill.config.errors import RecipeError
    from distill.losses.logps import logit_transform
    from distill.trainers.dpo import DPOTrainer

    assert logit_transform(SimpleNamespace(final_logit_softcapping=30.0)) == "final_logit_softcapping=30.0"
    assert logit_transform(SimpleNamespace(final_logit_softcapping=None, logit_scale=1.0)) is None

    def recipe(zero=2, logps="chunked"):
        return SimpleNamespace(policy=SimpleNamespace(zero_stage=zero, lora=None), dpo=SimpleNamespace(logps=logps))

    plain = {"policy": SimpleNamespace(model_config=SimpleNamespace())}
    capped = {"policy": SimpleNamespace(model_config=SimpleNamespace(final_logit_softcapping=30.0))}
    DPOTrainer.check_plans(recipe(), plain)  # accepted
    DPOTrainer.check_plans(recipe(logps="auto"), capped)  # auto falls back to full logits
    with pytest.raises(RecipeError, match="softcapping"):
        DPOTrainer.check_plans(recipe(), capped)
    with pytest.raises(RecipeError, match="ZeRO-3"):
        DPOTrainer.check_plans(recipe(zero=3), plain)
