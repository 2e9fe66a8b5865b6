"""PPO's pure functions (distill/losses/ppo.py) against slow references written one float at a time, on random
inputs with padding: the KL estimators, the shaped rewards, GAE and the returns, masked whitening (one process
and two "ranks" whose all-reduce sums both), the clipped policy and value losses and their gradients."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from distill.losses.ppo import (KL_ESTIMATORS, gae, masked_whiten, policy_loss, shaped_rewards, token_kl, value_loss)

B, C = 5, 7


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 1, 5, 0]  # a full row, short rows, an empty one
    mask = torch.tensor([[1 if t < n else 0 for t in range(C)] for n in lengths])
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    logps, old = -r(B, C).abs(), -r(B, C).abs()
    pad = mask == 0  # padding holds junk, as a forward's outputs there do: it must not reach any result
    return {"mask": mask, "logps": logps.masked_fill(pad, 7.0), "old": old.masked_fill(pad, -9.0),
            "ref": (-r(B, C).abs()).masked_fill(pad, 3.0), "values": r(B, C).masked_fill(pad, 50.0),
            "old_values": r(B, C).masked_fill(pad, -50.0), "returns": r(B, C).masked_fill(pad, 100.0),
            "adv": r(B, C).masked_fill(pad, 1e3), "scores": r(B), "lengths": lengths}


# -- slow references ---------------------------------------------------------------------------------
def _kl_by_hand(lp: float, ref: float, name: str) -> float:
    d = lp - ref
    return {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) + d - 1}[name]


def _gae_by_hand(rewards: list[float], values: list[float], n: int, gamma: float, lam: float) -> tuple[list, list]:
    adv = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(n)):
        next_v = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [adv[t] + values[t] if t < n else 0.0 for t in range(len(rewards))]


def _whiten_by_hand(rows: list[list[float]], lengths: list[int]) -> list[list[float]]:
    kept = [x for row, n in zip(rows, lengths) for x in row[:n]]
    mean = sum(kept) / len(kept)
    var = sum((x - mean) ** 2 for x in kept) / (len(kept) - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) if t < n else 0.0 for t, x in enumerate(row)] for row, n in zip(rows, lengths)]


def _policy_by_hand(lp, old, adv, lengths, n_tokens, eps_low, eps_high):
    total, clipped = 0.0, 0
    for i, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(lp[i][t] - old[i][t])
            a = adv[i][t]
            plain, clip = -ratio * a, -min(max(ratio, 1 - eps_low), 1 + eps_high) * a
            total += max(plain, clip)
            clipped += clip > plain
    return total / n_tokens, clipped


def _value_by_hand(v, old, ret, lengths, n_tokens, clip):
    total, clipped = 0.0, 0
    for i, n in enumerate(lengths):
        for t in range(n):
            plain = (v[i][t] - ret[i][t]) ** 2
            if clip is None:
                total += plain
                continue
            vc = old[i][t] + min(max(v[i][t] - old[i][t], -clip), clip)
            total += max(plain, (vc - ret[i][t]) ** 2)
            clipped += (vc - ret[i][t]) ** 2 > plain
    return 0.5 * total / n_tokens, clipped


# -- the tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_kl_estimators_by_hand(name):
    b = _batch()
    got = token_kl(b["logps"], b["ref"], b["mask"], name)
    for i, n in enumerate(b["lengths"]):
        for t in range(C):
            want = _kl_by_hand(float(b["logps"][i, t]), float(b["ref"][i, t]), name) if t < n else 0.0
            assert float(got[i, t]) == pytest.approx(want, abs=1e-12), (i, t)
    assert (got[0] < 0).any() if name == "k1" else (got >= 0).all()


def test_shaped_rewards_put_the_score_on_the_last_token():
    b = _batch()
    kl = token_kl(b["logps"], b["ref"], b["mask"])
    got = shaped_rewards(b["scores"], kl, b["mask"], kl_coef=0.3)
    for i, n in enumerate(b["lengths"]):
        for t in range(C):
            want = (-0.3 * float(kl[i, t]) + (float(b["scores"][i]) if t == n - 1 else 0.0)) if t < n else 0.0
            assert float(got[i, t]) == pytest.approx(want, abs=1e-12), (i, t)
    assert float(got[4].abs().sum()) == 0  # no token: the score lands nowhere


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_and_returns_by_hand(gamma, lam):
    b = _batch(1)
    rewards = torch.randn(B, C, dtype=torch.float64).masked_fill(b["mask"] == 0, 9.0)
    adv, ret = gae(rewards, b["values"], b["mask"], gamma, lam)
    for i, n in enumerate(b["lengths"]):
        want_a, want_r = _gae_by_hand(rewards[i].tolist(), b["values"][i].tolist(), n, gamma, lam)
        assert adv[i].tolist() == pytest.approx(want_a, abs=1e-12), i
        assert ret[i].tolist() == pytest.approx(want_r, abs=1e-12), i


def test_gae_in_fp32_from_bf16_inputs():
    b = _batch(2)
    adv, ret = gae(b["returns"].bfloat16(), b["values"].bfloat16(), b["mask"])
    assert adv.dtype == ret.dtype == torch.float32


def test_masked_whiten_by_hand_and_across_ranks():
    b = _batch(3)
    got = masked_whiten(b["adv"], b["mask"])
    want = _whiten_by_hand(b["adv"].tolist(), b["lengths"])
    for i in range(B):
        assert got[i].tolist() == pytest.approx(want[i], abs=1e-9), i
    # Two ranks holding rows 0-2 and 3-4: each whitens with the statistics of all five rows.
    parts, results, barrier, box = [(0, 3), (3, 5)], {}, threading.Barrier(2), {}

    def summed(x):  # an all-reduce of two threads
        box[threading.get_ident()] = x
        barrier.wait()
        total = sum(box.values())
        barrier.wait()
        return total

    def rank(k):
        lo, hi = parts[k]
        results[k] = masked_whiten(b["adv"][lo:hi], b["mask"][lo:hi], all_reduce=summed)

    threads = [threading.Thread(target=rank, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat([results[0], results[1]]), got)
    alone = masked_whiten(b["adv"][:3], b["mask"][:3])  # one rank's own statistics: other values, so the check bites
    assert not torch.allclose(alone, got[:3])


@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_policy_loss_and_gradient_by_hand(eps_high):
    b = _batch(4)
    old = b["old"].clone()
    old[b["mask"].bool()] = b["logps"][b["mask"].bool()] + 0.4 * torch.randn(int(b["mask"].sum()), dtype=torch.float64)
    lp = b["logps"].clone().requires_grad_()
    n = 13.0  # the step's tokens on all ranks, more than this batch's
    terms = policy_loss(lp, old, b["adv"], b["mask"], n, clip_eps=0.2, clip_eps_high=eps_high)
    want, clipped = _policy_by_hand(b["logps"].tolist(), old.tolist(), b["adv"].tolist(), b["lengths"], n, 0.2,
                                    0.2 if eps_high is None else eps_high)
    assert float(terms.loss.detach()) == pytest.approx(want, abs=1e-12)
    assert int(terms.clipped.sum()) == clipped > 0
    terms.loss.backward()
    # d/dlogp of -ratio * A is -ratio * A where the unclipped term is taken; 0 where the clip acts, and on padding.
    ratio = torch.exp(b["logps"] - old)
    want_grad = torch.where(b["mask"].bool() & ~terms.clipped, -ratio * b["adv"] / n, 0.0)
    torch.testing.assert_close(lp.grad, want_grad)


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_and_gradient_by_hand(clip):
    b = _batch(5)
    v = b["values"].clone().requires_grad_()
    n = 11.0
    terms = value_loss(v, b["old_values"], b["returns"], b["mask"], n, clip=clip)
    want, clipped = _value_by_hand(b["values"].tolist(), b["old_values"].tolist(), b["returns"].tolist(), b["lengths"], n, clip)
    assert float(terms.loss.detach()) == pytest.approx(want, abs=1e-12)
    assert int(terms.clipped.sum()) == clipped
    assert (clipped > 0) == (clip is not None)
    terms.loss.backward()
    # The gradient flows through whichever error is larger; the clipped one is flat where the clip acts.
    vals, old, ret = b["values"], b["old_values"], b["returns"]
    plain = vals - ret
    if clip is None:
        want_grad = plain
    else:
        inside = (vals - old).abs() <= clip
        want_grad = torch.where(terms.clipped, torch.where(inside, old + (vals - old) - ret, 0.0), plain)
    torch.testing.assert_close(v.grad, torch.where(b["mask"].bool(), want_grad / n, 0.0))
