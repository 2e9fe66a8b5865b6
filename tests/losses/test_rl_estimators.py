"""Group RL's other estimators (distill/losses/advantages.py) and ratios: RLOO, REINFORCE++, a ratio per completion.

RLOO is checked against TRL's own `RLOOTrainer` code on fixed tensors, as tests/losses/test_grpo_loss.py checks GRPO:
`_generate_and_score_completions` for the advantages (generation, log-probs and reward calls replaced by the fixed
batch) and `_compute_loss` for the loss and its gradient, each called on a bare `RLOOTrainer` holding only the
attributes that code reads. REINFORCE++ (not in TRL) is checked against a slow float64 reference, and across two
"ranks" whose one all-reduce sums both. GSPO's ratio runs against TRL's GRPOTrainer in tests/losses/test_grpo_loss.py.
"""
from __future__ import annotations

import math
import statistics
import threading
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from distill.config.errors import RecipeError
from distill.config.recipe import validate_recipe
from distill.losses.advantages import ADVANTAGES, advantages, batch_moments, reinforce_pp, rloo, sequence_kl
from distill.losses.grpo import grpo_loss, token_loss
from distill.rl.rewards import weighted_reward
from distill.trainers.grpo import GRPOSpec, GRPOTrainer
from tests.helpers import TINY_LLAMA, OneProcessAccelerator, TrainedModelStub

NAN = math.nan


# -- slow references, one float64 number at a time ---------------------------------------------------
def _rloo_by_hand(rewards: list[float], G: int) -> list[float]:
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i and not math.isnan(x)]
            out.append(0.0 if math.isnan(r) or not others else r - sum(others) / len(others))
    return out


def _normalised_by_hand(values: list[float], skip: list[bool]) -> list[float]:
    kept = [v for v, s in zip(values, skip) if not s]
    mean, std = statistics.fmean(kept), statistics.stdev(kept)
    return [0.0 if s else (v - mean) / (std + 1e-4) for v, s in zip(values, skip)]


REWARDS = [1.0, 0.0, 2.5, NAN, 4.0, 4.0, -1.0, 0.5, NAN, NAN, 3.0, NAN]  # 3 groups of 4; the last has one scored


def test_rloo_by_hand():
    r = torch.tensor(REWARDS, dtype=torch.float64)
    assert rloo(r, 4).tolist() == pytest.approx(_rloo_by_hand(REWARDS, 4), abs=1e-12)
    hand = _rloo_by_hand(REWARDS, 4)
    # Normalised over the step: unscored completions and one alone in its group are left out of the statistics.
    skip = [math.isnan(x) for x in REWARDS]
    skip[10] = True
    assert rloo(r, 4, "batch").tolist() == pytest.approx(_normalised_by_hand(hand, skip), abs=1e-12)


def test_reinforce_pp_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    r = (torch.randn(48, generator=g, dtype=torch.float64) * 3 + 5)
    r[[3, 17, 40]] = NAN
    values = r.tolist()
    expected = _normalised_by_hand(values, [math.isnan(x) for x in values])
    assert reinforce_pp(r, 8).tolist() == pytest.approx(expected, abs=1e-12)
    # Not the group's baseline: a group whose rewards are all equal still gets advantages (GRPO's would be 0).
    assert reinforce_pp(torch.tensor([1.0, 1.0, 3.0, 3.0]), 2).abs().min() > 0.5


def _threads(fn, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """fn(part, all_reduce) on one thread per "rank"; all_reduce sums the ranks' tensors. Returns each rank's result
    and how many all-reduces it made."""
    n = len(parts)
    barrier, slots, results, calls = threading.Barrier(n), {}, [None] * n, [0] * n

    def all_reduce_of(rank):
        def all_reduce(x):
            calls[rank] += 1
            slots[calls[rank], rank] = x
            barrier.wait()
            out = sum(slots[calls[rank], k] for k in range(n))
            barrier.wait()
            return out
        return all_reduce

    def run(rank):
        results[rank] = fn(parts[rank], all_reduce_of(rank))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    return results, calls


@pytest.mark.parametrize("name,scale", [("reinforce_pp", "batch"), ("rloo", "batch")])
def test_statistics_of_the_step_over_ranks_take_one_all_reduce(name, scale):
    """Two "ranks" each with half of the step's groups: each half's advantages are the whole step's, after one
    all-reduce (sums, squares and counts together, in float64)."""
    r = torch.tensor(REWARDS)
    whole = advantages(name, r, 4, scale)
    results, calls = _threads(lambda part, ar: advantages(name, part, 4, scale, all_reduce=ar), [r[:8], r[8:]])
    assert torch.cat(results).tolist() == pytest.approx(whole.tolist(), rel=1e-6, abs=1e-7)
    assert calls == [1, 1]
    mean, std = batch_moments(r)
    assert (float(mean), float(std)) == pytest.approx((statistics.fmean([x for x in REWARDS if x == x]),
                                                        statistics.stdev([x for x in REWARDS if x == x])), rel=1e-12)


def test_estimator_names_and_their_scalings(tmp_path):
    assert set(ADVANTAGES) >= {"group", "rloo", "reinforce_pp"}
    assert [GRPOSpec(advantage=a).scale_rewards for a in ("group", "rloo", "reinforce_pp")] == ["group", "none", "batch"]
    raw = {"trainer": "grpo", "output_dir": str(tmp_path / "run"), "policy": {"config": TINY_LLAMA},
           "data": {"train": str(tmp_path / "t.jsonl"), "tokenizer": str(tmp_path)},
           "grpo": {"num_generations": 4, "reward_funcs": ["distill.data.reward_task:end_mark"]},
           "train": {"micro_batch_size": 4}}
    for grpo, said in [({"advantage": "reinforce_pp", "scale_rewards": "group"}, "does not apply to `advantage: reinforce_pp`"),
                       ({"advantage": "rloo", "scale_rewards": "group"}, "takes none or batch"),
                       ({"advantage": "rlo"}, "Did you mean 'rloo'"),
                       ({"importance_sampling_level": "sequences"}, "Did you mean 'sequence'")]:
        with pytest.raises(RecipeError, match=said):
            validate_recipe({**raw, "grpo": {**raw["grpo"], **grpo}}, GRPOTrainer)


# -- parity with TRL's RLOOTrainer -------------------------------------------------------------------
def _bare_rloo(**attrs):
    """An RLOOTrainer without __init__: only what `_generate_and_score_completions` / `_compute_loss` read."""
    from trl import RLOOTrainer

    t = object.__new__(RLOOTrainer)
    t.__dict__.update(accelerator=OneProcessAccelerator(), model=TrainedModelStub(), aux_loss_enabled=False, epsilon_low=0.2, epsilon_high=0.2,
                      _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    t.__dict__.update(attrs)
    return t


@pytest.mark.trl
@pytest.mark.parametrize("beta,normalize", [(0.0, False), (0.0, True), (0.05, False), (0.05, True)])
def test_rloo_advantages_match_trl(beta, normalize):
    """TRL's `_generate_and_score_completions` on a fixed batch: 2 prompts x 4 completions, two weighted reward
    functions with an unscorable completion, two truncated completions masked, old and reference log-probs for
    the KL penalty in the reward: our `kl_penalty: reward` rewards through `rloo` give its advantages."""
    pytest.importorskip("trl")
    from trl import RLOOTrainer

    G, weights = 4, torch.tensor([1.0, 0.5])
    per_function = torch.tensor([[1.0, 0.5], [0.0, 0.5], [NAN, NAN], [2.0, 1.0],
                                 [3.0, 1.0], [2.0, 0.0], [1.0, NAN], [0.5, 0.5]])
    prompt_ids = [[1, 5]] * 4 + [[1, 6, 7]] * 4
    completion_ids = [[9, 2], [9, 9, 9], [8, 2], [2], [7, 7, 7], [9, 8, 2], [5, 2], [6, 6, 2]]  # eos 2; rows 1, 4 cut
    from distill.rl.batch import completion_masks

    padded = torch.tensor([ids + [0] * (3 - len(ids)) for ids in completion_ids])
    _, mask, _ = completion_masks(padded, eos_id=2, mask_truncated=True)
    g = torch.Generator().manual_seed(1)
    old = (-torch.rand(8, 3, generator=g) * 2) * mask
    ref = (old + 0.5 * torch.randn(8, 3, generator=g)) * mask
    logps_of = iter([old, ref])  # TRL asks for the policy's log-probs first, then the reference's
    t = _bare_rloo(
        beta=beta, num_generations=G, normalize_advantages=normalize, reward_weights=weights, reward_func_names=["a", "b"],
        reward_clip_range=None, ref_model=object(), mask_truncated_completions=True, eos_token_ids=[2],
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, log_multimodal=False,
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [], "extra": defaultdict(list),
               "images": []},
        _pending_extra_logs=defaultdict(list), _pending_metrics=defaultdict(list),
        args=SimpleNamespace(per_device_train_batch_size=8, gradient_checkpointing_kwargs=None))
    t._generate = lambda prompts: (prompt_ids, completion_ids, ["text"] * 8)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (next(logps_of), None, None)
    t._calculate_rewards = lambda inputs, prompts, completions, ids: per_function
    out = RLOOTrainer._generate_and_score_completions(t, [{"prompt": "p"}] * 8)

    rewards = weighted_reward(per_function, weights)
    if beta:
        rewards = rewards - beta * sequence_kl(old, ref, mask)
    ours = advantages("rloo", rewards, G, "batch" if normalize else "none")
    assert torch.allclose(ours, out["advantages"], rtol=1e-5, atol=1e-6), (ours, out["advantages"])
    assert torch.equal(mask, out["completion_mask"].to(mask.dtype))
    if beta:
        assert t._metrics["train"]["kl"][0] == pytest.approx(float(sequence_kl(old, ref, mask).sum() / mask.sum()), rel=1e-6)


@pytest.mark.trl
@pytest.mark.parametrize("epsilon_high", [0.2, 0.28])
def test_rloo_loss_and_gradient_match_trl(epsilon_high):
    """TRL's `_compute_loss` on two micro-batches of one step (the HF Trainer divides each by the accumulation, 2):
    the loss and its gradient with respect to the per-token log-probs equal ours with `importance_sampling_level:
    sequence_sum` and `loss_type: grpo` (a sequence's ratio of whole probabilities, the loss averaged over sequences)."""
    pytest.importorskip("trl")
    from trl import RLOOTrainer

    g = torch.Generator().manual_seed(2)
    B, C = 8, 6
    logps = -torch.rand(B, C, generator=g) * 2
    mask = torch.ones(B, C, dtype=torch.long)
    mask[0, 3:], mask[5, 1:], mask[6, 4:] = 0, 0, 0
    logps = logps * mask
    old = (logps + 0.15 * torch.randn(B, C, generator=g)) * mask  # ratios of whole sequences inside and outside the clip
    adv = torch.randn(B, generator=g)
    halves = (slice(0, 4), slice(4, None))

    theirs = logps.clone().requires_grad_()
    trl_total = 0.0
    for h in halves:
        t = _bare_rloo(epsilon_low=0.2, epsilon_high=epsilon_high)
        part = theirs[h]
        t._get_per_token_logps_and_entropies = lambda *a, _p=part, **k: (_p, torch.zeros_like(_p), None)
        loss = RLOOTrainer._compute_loss(t, None, {
            "prompt_ids": torch.ones(4, 2, dtype=torch.long), "prompt_mask": torch.ones(4, 2, dtype=torch.long),
            "completion_ids": torch.ones(4, C, dtype=torch.long), "completion_mask": mask[h], "advantages": adv[h],
            "old_logps": (old[h] * mask[h]).sum(1)}) / 2
        loss.backward()
        trl_total += float(loss.detach())
    clipped = t._metrics["train"]["clip_ratio/region_mean"]
    assert 0 < sum(clipped) < 2, clipped  # some sequences are clipped, not all

    ours = logps.clone().requires_grad_()
    our_total = 0.0
    for h in halves:
        terms = token_loss(ours[h], adv[h], old_logps=old[h], epsilon=0.2, epsilon_high=epsilon_high, mask=mask[h],
                           importance_sampling_level="sequence_sum")
        loss = grpo_loss("grpo", terms.loss, mask[h], max_completion_length=C, normaliser=torch.tensor(B))
        loss.backward()
        our_total += float(loss.detach())
    assert our_total == pytest.approx(trl_total, rel=1e-6)
    assert ours.grad.abs().sum() > 0
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-8), (ours.grad - theirs.grad).abs().max()
