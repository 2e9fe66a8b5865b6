"""PPO for language models (Ouyang et al. 2022; Ziegler et al. 2019; as OpenRLHF and TRL's PPO compute it): pure functions.

One rollout goes through them in order:

* :func:`token_kl` (k1, k2 or k3, registered by name in ``KL_ESTIMATORS``) of the generating policy against the
  reference, per completion token;
* :func:`shaped_rewards`: ``-kl_coef * kl`` on every completion token, plus the sequence's score on its last token;
* :func:`gae`: generalised advantage estimation (Schulman et al. 2016) over the completion tokens, and the returns;
* :func:`masked_whiten`: advantages normalised by the mean and std of every valid token of the rollout on all ranks;

and each minibatch of each PPO epoch through :func:`policy_loss` (the clipped surrogate) and :func:`value_loss`
(the clipped value loss), each a sum over valid tokens divided by the step's valid tokens on all ranks.

Shapes: ``B`` completions, ``C`` completion tokens, right-padded; ``mask`` [B, C] is 1 on the tokens that count
(a completion's tokens are contiguous from column 0). Column ``t`` of ``values`` is the critic's value of the state
before completion token ``t``. Everything is computed in at least fp32.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from distill.config.registry import Registry, UnknownNameError

from distill.losses.advantages import masked_moments
from distill.losses.kd import _upcast

WHITEN_EPS = 1e-8
"""Added to the variance before its inverse square root (OpenRLHF's and TRL's constant)."""


class UnknownKLEstimatorError(UnknownNameError):
    """Raised by :func:`get_kl_estimator`; catchable as either ``ValueError`` or ``KeyError``."""


KL_ESTIMATORS: Registry = Registry("KL estimator", UnknownKLEstimatorError)
"""name -> fn(logps [B, C], ref_logps [B, C]) -> [B, C] per-token estimate of KL(pi || pi_ref) on pi's samples."""
get_kl_estimator = KL_ESTIMATORS.lookup
register_kl_estimator = KL_ESTIMATORS.register


@register_kl_estimator("k1")
def _k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """log pi - log pi_ref: unbiased, can be negative per token (the PPO-RLHF papers, OpenRLHF's default)."""
    return logps - ref_logps


@register_kl_estimator("k2")
def _k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """(log pi - log pi_ref)^2 / 2: non-negative, biased."""
    return 0.5 * (logps - ref_logps) ** 2


@register_kl_estimator("k3")
def _k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """exp(ref - logp) - (ref - logp) - 1 (Schulman 2020): non-negative, unbiased."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def token_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """[B, C] the per-token KL estimate ``estimator`` of the policy that generated the completions (logps [B, C])
    against the reference (ref_logps [B, C]); 0 where mask [B, C] is 0."""
    kl = get_kl_estimator(estimator)(_upcast(logps), _upcast(ref_logps))
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def last_token(mask: Tensor) -> Tensor:
    """[B] the column of each row's last valid token (mask [B, C]; 0 for a row with none)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """[B, C] per-token rewards: ``-kl_coef * kl`` [B, C] on each valid token, plus the sequence's score
    (scores [B]) on its last valid token, as OpenRLHF's ``compute_reward`` and the PPO-RLHF papers place it.
    A row with no valid token gets 0 everywhere (its score lands nowhere)."""
    m = mask.bool()
    r = torch.where(m, -kl_coef * _upcast(kl), torch.zeros_like(_upcast(kl)))  # [B, C]
    has = m.any(-1)  # [B]
    score = torch.where(has, _upcast(scores), torch.zeros_like(_upcast(scores)))
    return r.scatter_add(1, last_token(mask)[:, None], score[:, None].to(r.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """(advantages [B, C], returns [B, C]) by generalised advantage estimation over the completion tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` 0 past a completion's last token (the episode ends
    there: a completion cut by the length limit too, as OpenRLHF treats it), ``A_t = delta_t + gamma * lam *
    A_{t+1}``, ``returns = A + V``. rewards, values, mask [B, C]; padding gets 0 in both outputs."""
    m = mask.to(torch.promote_types(rewards.dtype, torch.float32))
    r, v = _upcast(rewards) * m, _upcast(values) * m  # padding's values must not leak into the last delta
    out = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])  # [B]
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        out[:, t] = running
        next_value = v[:, t]
    return out, (out + v) * m


def masked_whiten(x: Tensor, mask: Tensor, *, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """x [B, C] -> ``(x - mean) / sqrt(var + 1e-8)`` with the mean and variance of the valid tokens (mask [B, C])
    of every rank (:func:`masked_moments`); 0 on padding."""
    mean, var = masked_moments(x, mask, all_reduce)
    out = ((x.double() - mean) * torch.rsqrt(var + WHITEN_EPS)).to(_upcast(x).dtype)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


class PolicyTerms(NamedTuple):
    loss: Tensor
    """Scalar: the clipped surrogate summed over valid tokens, divided by ``num_tokens``."""
    clipped: Tensor
    """[B, C] bool: tokens whose clipped term is the one taken (the clip acts; TRL's ``pg_clipfrac``)."""
    ratio: Tensor
    """[B, C] pi / pi_old, detached."""


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    # where, not a multiply: a NaN or Inf on a padding token must not reach the sum
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, num_tokens: Tensor | float, *,
                clip_eps: float = 0.2, clip_eps_high: float | None = None) -> PolicyTerms:
    """PPO's clipped surrogate: ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)`` per token,
    ``ratio = exp(logps - old_logps)``; summed over the valid tokens and divided by ``num_tokens`` (the step's on
    all ranks). logps [B, C] (with gradient), old_logps [B, C] (the generating policy's), advantages [B, C]
    (whitened), mask [B, C]."""
    logps, old, adv = _upcast(logps), _upcast(old_logps), _upcast(advantages)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logps - old)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv
    per_token = torch.maximum(unclipped, clipped)
    n = torch.as_tensor(num_tokens, device=per_token.device).to(per_token.dtype)
    return PolicyTerms(_masked_sum(per_token, mask) / n, (clipped > unclipped) & mask.bool(), ratio.detach())


class ValueTerms(NamedTuple):
    loss: Tensor
    """Scalar: half the squared error (the larger of clipped and unclipped), summed over valid tokens, divided by
    ``num_tokens``."""
    clipped: Tensor
    """[B, C] bool: tokens whose clipped error is the larger (TRL's ``vf_clipfrac``); all False without a clip."""


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, num_tokens: Tensor | float, *,
               clip: float | None = 0.2) -> ValueTerms:
    """PPO's clipped value loss: ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2)`` per token
    (``0.5 * (V - R)^2`` with ``clip`` None), summed over the valid tokens and divided by ``num_tokens``.
    values [B, C] (with gradient), old_values [B, C] (the critic's at the rollout), returns [B, C], mask [B, C]."""
    v, old, ret = _upcast(values), _upcast(old_values), _upcast(returns)
    err = (v - ret) ** 2
    if clip is None:
        per_token, took_clip = err, torch.zeros_like(mask, dtype=torch.bool)
    else:
        err_clipped = (old + torch.clamp(v - old, -clip, clip) - ret) ** 2
        per_token, took_clip = torch.maximum(err, err_clipped), (err_clipped > err) & mask.bool()
    n = torch.as_tensor(num_tokens, device=per_token.device).to(per_token.dtype)
    return ValueTerms(0.5 * _masked_sum(per_token, mask) / n, took_clip)
