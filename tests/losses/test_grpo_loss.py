"""GRPO's pure functions (distill/losses/grpo.py, distill/rl/rewards.py), and their parity with TRL.

The parity tests run TRL's own `GRPOTrainer` code on fixed tensors: `_compute_loss` for the loss and
its gradient with respect to the policy's per-token log-probs, `_generate_and_score_completions` for
the advantages (with its generation and reward calls replaced by the fixed batch). Each is called on
a bare `GRPOTrainer` object holding only the attributes that code reads, so nothing is re-typed from
TRL's formulas. Tolerance: float32 rounding (1e-6 relative).
"""
from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from distill.config.errors import RecipeError
from distill.losses.grpo import GRPO_LOSSES, group_advantages, grpo_loss, token_loss
from distill.rl.rewards import RewardError, RewardFunction, call_reward_function, load_reward_functions, weighted_reward

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def _batch(seed=0, B=8, C=7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, C, generator=g) * 3
    old = logps + 0.3 * torch.randn(B, C, generator=g)
    ref = logps + 0.3 * torch.randn(B, C, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, C, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2] = 0  # a masked (truncated) completion
    mask[5, 1:] = 0
    return logps, old, ref, adv, mask


# -- our functions on their own ----------------------------------------------------------------------
from tests.helpers import OneProcessAccelerator, TrainedModelStub


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 2.0, 5.0, 5.0, 5.0])
    adv, std = group_advantages(r, 3, "group")
    s = float(torch.tensor([1.0, 0.0, 2.0]).std())  # unbiased, as TRL's nanstd
    assert adv[:3].tolist() == pytest.approx([0.0, -1 / (s + 1e-4), 1 / (s + 1e-4)], rel=1e-6)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0] and std[3:].tolist() == [0.0, 0.0, 0.0]
    none, _ = group_advantages(r, 3, "none")
    assert none.tolist() == pytest.approx([0.0, -1.0, 1.0, 0.0, 0.0, 0.0])
    batch, bstd = group_advantages(r, 3, "batch")
    assert bstd[0] == pytest.approx(float(r.std()), rel=1e-6)
    assert batch[1] == pytest.approx(-1 / (float(r.std()) + 1e-4), rel=1e-6)


def test_unscorable_completions_get_advantage_zero_and_leave_the_group_statistics():
    r = torch.tensor([1.0, math.nan, 3.0, math.nan])
    adv, _ = group_advantages(r, 4, "group")
    s = float(torch.tensor([1.0, 3.0]).std())
    assert adv.tolist() == pytest.approx([-1 / (s + 1e-4), 0.0, 1 / (s + 1e-4), 0.0], rel=1e-6)


def test_batch_std_over_ranks_equals_the_std_of_all_rewards():
    """scale_rewards=batch on two "ranks" (threads whose all_reduce sums both): each half's advantages are
    the whole batch's."""
    import threading

    r = torch.tensor([1.0, 4.0, 2.0, 2.5, 7.0, 0.5])
    whole, _ = group_advantages(r, 3, "batch")
    barrier, slots, results = threading.Barrier(2), {}, {}

    def all_reduce_of(rank):
        calls = []

        def all_reduce(x):
            calls.append(None)
            slots[len(calls), rank] = x
            barrier.wait()
            out = slots[len(calls), 0] + slots[len(calls), 1]
            barrier.wait()
            return out
        return all_reduce

    def run(rank):
        results[rank] = group_advantages(r[3 * rank:3 * rank + 3], 3, "batch", all_reduce=all_reduce_of(rank))[0]

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert torch.cat([results[0], results[1]]).tolist() == pytest.approx(whole.tolist(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batch_shares_sum_to_the_whole_step(loss_type):
    logps, old, ref, adv, mask = _batch()
    terms = token_loss(logps, adv, old_logps=old, ref_logps=ref, beta=0.1)
    whole = grpo_loss(loss_type, terms.loss, mask, max_completion_length=7)
    agg = GRPO_LOSSES[loss_type]
    n = agg.count(mask[:3]) + agg.count(mask[3:])
    parts = sum(grpo_loss(loss_type, terms.loss[s], mask[s], max_completion_length=7, normaliser=n)
                for s in (slice(0, 3), slice(3, None)))
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_bnpo_averages_micro_batch_token_means():
    logps, _, _, adv, mask = _batch()
    terms = token_loss(logps, adv)
    parts = [grpo_loss("bnpo", terms.loss[s], mask[s], max_completion_length=7, normaliser=torch.tensor(2.0))
             for s in (slice(0, 4), slice(4, None))]
    means = [(terms.loss[s] * mask[s]).sum() / mask[s].sum() for s in (slice(0, 4), slice(4, None))]
    assert float(sum(parts)) == pytest.approx(float(sum(means) / 2), rel=1e-6)


def test_first_update_is_the_policy_gradient():
    """Without old log-probs the ratio is 1: the gradient of each token's loss is -A (plus the KL term's)."""
    logps, _, _, adv, mask = _batch()
    x = logps.clone().requires_grad_()
    grpo_loss("dapo", token_loss(x, adv).loss, mask, max_completion_length=7).backward()
    expected = -adv[:, None].expand_as(x) * mask / mask.sum()
    assert torch.allclose(x.grad, expected, atol=1e-7)


# -- reward functions --------------------------------------------------------------------------------
def _fn(f, spec="tests:f", weight=1.0):
    return RewardFunction(spec, f, weight)


def test_reward_function_checks_name_the_function():
    prompts, completions, ids = ["a", "b"], ["x", "y"], [[1], [2]]
    ok = call_reward_function(_fn(lambda prompts, completions, **kw: [1, None]), prompts, completions, ids, {})
    assert ok[0] == 1.0 and math.isnan(ok[1])
    cases = [
        (lambda prompts, completions, **kw: 1 / 0, "raised ZeroDivisionError"),
        (lambda prompts, completions, **kw: [1.0], "returned 1 values for 2 completions"),
        (lambda prompts, completions, **kw: [1.0, float("nan")], "returned nan for completion 1"),
        (lambda prompts, completions, **kw: [1.0, "high"], "returned 'high' for completion 1"),
        (lambda prompts, completions, **kw: 3.0, "returned a float"),
        (lambda prompts, completions: [0, 0], "raised TypeError"),  # does not take the columns
    ]
    for f, said in cases:
        with pytest.raises(RewardError, match="`my.mod:score`") as e:
            call_reward_function(_fn(f, "my.mod:score"), prompts, completions, ids, {"answer": ["1", "2"]})
        assert said in str(e.value)


def test_reward_columns_and_weights():
    seen = {}

    def f(prompts, completions, completion_ids, answer, **kw):
        seen.update(answer=answer, ids=completion_ids)
        return [float(c == a) for c, a in zip(completions, answer)]

    r = call_reward_function(_fn(f), ["p", "p"], ["1", "3"], [[4], [5]], {"answer": ["1", "2"]})
    assert r.tolist() == [1.0, 0.0] and seen == {"answer": ["1", "2"], "ids": [[4], [5]]}
    per = torch.tensor([[1.0, math.nan], [0.0, 2.0], [math.nan, math.nan]])
    w = weighted_reward(per, torch.tensor([1.0, 0.5]))
    assert w[:2].tolist() == [1.0, 1.0] and math.isnan(w[2])


def test_reward_functions_load_from_the_recipe_or_say_why_not():
    fns = load_reward_functions(["distill.data.reward_task:end_mark", "distill.data.reward_task:whole_sentences"], [1.0, 0.5])
    assert [f.name for f in fns] == ["end_mark", "whole_sentences"] and [f.weight for f in fns] == [1.0, 0.5]
    for spec, said in [("distill.data.reward_task", "not `module:function`"), ("no_such_module_x:f", "cannot import"),
                       ("distill.data.reward_task:nope", "has no `nope`"), ("distill.data.reward_task:ENDS", "not a function")]:
        with pytest.raises(RecipeError, match=said):
            load_reward_functions([spec])
    with pytest.raises(RecipeError, match="one weight per function"):
        load_reward_functions(["distill.data.reward_task:end_mark"], [1.0, 2.0])


def test_synthetic_task_rewards():
    from distill.data.reward_task import end_mark, whole_sentences

    completions = ["cat sleeps ! a dog runs .", "bob waits !", "the red", ""]
    assert end_mark(None, completions, end_mark=["!"] * 4) == [0.5, 1.0, 0.0, 0.0]
    assert whole_sentences(None, completions) == [1.0, 1.0, 0.0, 0.0]
    assert end_mark(None, [[{"role": "assistant", "content": "bob waits ?"}]], end_mark=["?"]) == [1.0]


# -- parity with TRL ---------------------------------------------------------------------------------
def _bare_trl_trainer(**attrs):
    """A GRPOTrainer without __init__: only what `_compute_loss` / `_generate_and_score_completions` read."""
    from trl import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    t.__dict__.update(accelerator=OneProcessAccelerator(), model=TrainedModelStub(), top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                      importance_sampling_level="token", use_vllm=False, _entropy_bonus_enabled=False,
                      aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    t.__dict__.update(attrs)
    return t


SETTINGS = [
    dict(beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, kl_bias_correction=True, old=True),
    dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, delta=None, kl_bias_correction=True, old=True),
    dict(beta=0.04, epsilon=0.2, epsilon_high=None, delta=None, kl_bias_correction=False, old=False),
    dict(beta=0.1, epsilon=0.1, epsilon_high=0.3, delta=1.2, kl_bias_correction=True, old=True),
]


@pytest.mark.trl
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_loss_and_gradient_match_trl(loss_type, setting, level):
    """Two micro-batches of one step (gradient accumulation 2): the sum of the micro-batch losses and the
    gradient with respect to the policy's per-token log-probs, ours against TRL's `_compute_loss`, with a ratio
    per token and per completion (GSPO: TRL's importance_sampling_level="sequence")."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    s = SETTINGS[setting]
    logps, old, ref, adv, mask = _batch(seed=setting, B=8, C=7)
    halves = (slice(0, 4), slice(4, None))
    C = logps.shape[1]

    theirs = logps.clone().requires_grad_()
    trl_total = 0.0
    for h in halves:
        t = _bare_trl_trainer(beta=s["beta"], loss_type=loss_type, epsilon_low=s["epsilon"], importance_sampling_level=level,
                              epsilon_high=s["epsilon_high"] if s["epsilon_high"] is not None else s["epsilon"],
                              max_completion_length=C, current_gradient_accumulation_steps=2,
                              args=SimpleNamespace(use_bias_correction_kl=s["kl_bias_correction"], delta=s["delta"],
                                                   steps_per_generation=2))
        part = theirs[h]
        t._get_per_token_logps_and_entropies = lambda *a, _p=part, **k: (_p, torch.zeros_like(_p), None)
        inputs = dict(prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_mask=torch.ones(4, 2, dtype=torch.long),
                      completion_ids=torch.ones(4, C, dtype=torch.long), completion_mask=mask[h], advantages=adv[h],
                      ref_per_token_logps=ref[h], num_items_in_batch=mask.sum())
        if s["old"]:
            inputs["old_per_token_logps"] = old[h]
        loss = GRPOTrainer._compute_loss(t, None, inputs)
        loss.backward()
        trl_total += float(loss.detach())

    ours = logps.clone().requires_grad_()
    agg = GRPO_LOSSES[loss_type]
    n = sum(agg.count(mask[h]) for h in halves)
    our_total = 0.0
    for h in halves:
        terms = token_loss(ours[h], adv[h], old_logps=old[h] if s["old"] else None, ref_logps=ref[h], beta=s["beta"],
                           epsilon=s["epsilon"], epsilon_high=s["epsilon_high"], delta=s["delta"],
                           kl_bias_correction=s["kl_bias_correction"], mask=mask[h], importance_sampling_level=level)
        loss = grpo_loss(loss_type, terms.loss, mask[h], max_completion_length=C, normaliser=n)
        loss.backward()
        our_total += float(loss.detach())

    assert our_total == pytest.approx(trl_total, rel=1e-6, abs=1e-8)
    assert ours.grad.abs().sum() > 0
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-5, atol=1e-8), (ours.grad - theirs.grad).abs().max()


@pytest.mark.trl
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_and_truncation_mask_match_trl(scale_rewards):
    """TRL's `_generate_and_score_completions` with its generation and reward calls replaced by a fixed
    batch: 2 prompts x 3 completions, two weighted reward functions, one None, two truncated completions."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    G, weights = 3, torch.tensor([1.0, 0.5])
    per_function = torch.tensor([[1.0, 0.5], [0.0, 0.5], [1.0, math.nan], [2.0, 1.0], [3.0, 1.0], [2.0, 0.0]])
    prompt_ids = [[1, 5]] * 3 + [[1, 6, 7]] * 3
    completion_ids = [[9, 2], [9, 9, 9], [8, 2], [2], [7, 7, 7], [9, 8, 2]]  # eos = 2; rows 1 and 4 truncated
    t = _bare_trl_trainer(
        beta=0.0, num_generations=G, num_iterations=1, scale_rewards=scale_rewards,
        multi_objective_aggregation="sum_then_normalize", reward_weights=weights, reward_func_names=["a", "b"],
        mask_truncated_completions=True, eos_token_ids=[2], _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None, environment_factories=None, tools=None, environments=None, log_multimodal=False,
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [], "extra": defaultdict(list),
               "images": []},
        _pending_extra_logs=defaultdict(list), _pending_metrics=defaultdict(list),
        args=SimpleNamespace(per_device_train_batch_size=6, steps_per_generation=1, gradient_accumulation_steps=1,
                             gradient_checkpointing_kwargs=None))
    t._generate = lambda prompts: (prompt_ids, completion_ids, None, ["text"] * 6, None, {}, None, [])
    t._calculate_rewards = lambda inputs, prompts, completions, ids: per_function
    out = GRPOTrainer._generate_and_score_completions(t, [{"prompt": "p"}] * 6)

    ours, _ = group_advantages(weighted_reward(per_function, weights), G, scale_rewards)
    assert torch.allclose(ours, out["advantages"], rtol=1e-6, atol=1e-7), (ours, out["advantages"])
    assert t._metrics["train"]["reward"][0] == pytest.approx(float(weighted_reward(per_function, weights).nanmean()))

    from distill.rl.batch import completion_masks

    padded = torch.tensor([ids + [0] * (3 - len(ids)) for ids in completion_ids])
    _, mask, truncated = completion_masks(padded, eos_id=2, mask_truncated=True)
    assert torch.equal(mask, out["completion_mask"].to(mask.dtype))
    assert truncated.tolist() == [False, True, False, False, True, False]
