"""GRPO (Shao et al. 2024, arXiv 2402.03300) as TRL's `GRPOTrainer` computes it: pure functions.

Three pieces, each usable on its own:

* :func:`group_advantages`: rewards of ``G`` completions per prompt -> advantages, normalised within
  each group (``scale_rewards``: ``group``, ``batch`` or ``none``, TRL's names and formulas); the other
  estimators (RLOO, REINFORCE++) are in distill/losses/advantages.py.
* :func:`token_loss`: the per-token clipped surrogate with ``epsilon`` / ``epsilon_high`` (DAPO's
  clip-higher) and the optional two-sided bound ``delta``, plus ``beta`` times the k3 estimate of
  KL(policy || reference), optionally weighted by the importance ratio (TRL's ``use_bias_correction_kl``).
  The ratio is per token or per completion, by registered name (``IMPORTANCE_LEVELS``: ``token``,
  ``sequence`` for GSPO, ``sequence_sum`` for TRL's RLOOTrainer).
* an aggregation, by registered name (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``): how per-token losses
  become the step's loss. Each is split in two so the shared loop can accumulate micro-batches:
  ``count(mask)`` is one micro-batch's share of the step's normaliser (the loop sums it over every
  micro-batch of every rank) and ``reduce(per_token, mask, normaliser, max_completion_length)`` is that
  micro-batch's share of the loss. Summed over the micro-batches and ranks of a step, the shares give
  exactly what TRL computes for the same step (tests/losses/test_grpo_loss.py runs TRL's own code).

Shapes: ``B`` completions, ``C`` completion tokens (right-padded; ``mask`` [B, C] is 1 on the tokens
that count). Everything is computed in at least fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from distill.config.registry import Registry, UnknownNameError
from distill.losses.kd import _upcast

ADVANTAGE_EPS = 1e-4
"""Added to the reward std before dividing (TRL's constant): a group whose rewards are all equal gets 0."""
SCALE_REWARDS = ("group", "batch", "none")


def _nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Standard deviation with Bessel's correction, ignoring NaNs (NaN for fewer than 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else (std.squeeze(dim) if dim is not None else std.reshape(()))


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group", *,
                     all_reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """rewards [N] -> (advantages [N], std [N]): ``(r - mean of its group) / (std + 1e-4)``.

    ``rewards`` holds ``N / num_generations`` groups, each the ``num_generations`` completions of one
    prompt, next to each other. NaN marks a completion no reward could score: it is left out of its
    group's statistics and gets advantage 0. ``scale_rewards``: ``group`` divides by the group's std,
    ``batch`` by the std of every reward of the step, ``none`` does not divide (Dr. GRPO). With
    ``batch`` on several ranks, ``all_reduce`` (a sum over ranks) makes the std the global one.
    The returned std is the one the advantages were (or, with ``none``, would be) divided by, for
    logging the share of groups whose rewards were all equal.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    if rewards.dim() != 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"rewards must be [N] with N a multiple of num_generations={num_generations}, got {tuple(rewards.shape)}")
    r = _upcast(rewards)
    grouped = r.view(-1, num_generations)  # [N / G, G]
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # [N]
    if scale_rewards == "batch":
        std = _global_nanstd(r, all_reduce).expand_as(r)
    elif num_generations > 1:
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    else:
        std = torch.zeros_like(r)
    advantages = r - mean
    if scale_rewards != "none":
        advantages = advantages / (std + ADVANTAGE_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std


def group_std(rewards: Tensor, num_generations: int) -> Tensor:
    """[N / G] the std of each group's scored rewards (NaN for fewer than 2), rewards [N] in groups of G."""
    return _nanstd(_upcast(rewards).view(-1, num_generations), dim=1)


def _global_nanstd(r: Tensor, all_reduce) -> Tensor:
    """The std of the rewards of every rank (two passes, as one gathered tensor would give it)."""
    if all_reduce is None:
        return _nanstd(r) if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
    ok = ~torch.isnan(r)
    total, n = all_reduce(torch.stack([torch.where(ok, r, 0).sum(), ok.sum().to(r.dtype)])).unbind()
    mean = total / n.clamp(min=1)
    sq = all_reduce(torch.where(ok, (r - mean) ** 2, 0).sum())
    return torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))


class TokenTerms(NamedTuple):
    loss: Tensor
    """[B, C] per-token loss: the clipped surrogate plus ``beta`` times the KL term."""
    kl: Tensor | None
    """[B, C] the KL term as it enters the loss (before ``beta``): k3, times the ratio with ``kl_bias_correction``,
    which makes it an estimate of the current policy's KL from the generating policy's samples; None without a reference."""
    low_clipped: Tensor
    """[B, C] bool: ratio below 1 - epsilon with a negative advantage (the clip acts)."""
    high_clipped: Tensor
    """[B, C] bool: ratio above 1 + epsilon_high with a positive advantage."""


# -- importance sampling levels: the ratio of the clipped surrogate ------------------------------------
class UnknownImportanceLevelError(UnknownNameError):
    """Raised by :func:`get_importance_level`; catchable as either ``ValueError`` or ``KeyError``."""


IMPORTANCE_LEVELS: Registry = Registry("importance sampling level", UnknownImportanceLevelError)
"""name -> fn(log_ratio [B, C], mask [B, C] or None) -> log of the ratio, [B, C] (per token) or [B, 1] (per completion)."""
get_importance_level = IMPORTANCE_LEVELS.lookup
register_importance_level = IMPORTANCE_LEVELS.register


def _need_mask(mask: Tensor | None, level: str) -> Tensor:
    if mask is None:
        raise ValueError(f"importance_sampling_level {level!r} takes the completion mask [B, C]")
    return mask


@register_importance_level("token")
def _token_level(log_ratio: Tensor, mask: Tensor | None) -> Tensor:
    """Each token its own ratio pi / pi_old (GRPO, PPO)."""
    return log_ratio


@register_importance_level("sequence")
def _sequence_level(log_ratio: Tensor, mask: Tensor | None) -> Tensor:
    """One ratio per completion, the geometric mean of its tokens' (GSPO, Zheng et al. 2025, arXiv 2507.18071;
    TRL's ``importance_sampling_level="sequence"``)."""
    m = _need_mask(mask, "sequence").to(log_ratio.dtype)
    return ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]


@register_importance_level("sequence_sum")
def _sequence_sum_level(log_ratio: Tensor, mask: Tensor | None) -> Tensor:
    """One ratio per completion, of its whole probability: pi(y) / pi_old(y) (TRL's ``RLOOTrainer``)."""
    m = _need_mask(mask, "sequence_sum").to(log_ratio.dtype)
    return (log_ratio * m).sum(-1, keepdim=True)  # [B, 1]


def token_loss(logps: Tensor, advantages: Tensor, *, old_logps: Tensor | None = None, ref_logps: Tensor | None = None,
               beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None, delta: float | None = None,
               kl_bias_correction: bool = True, mask: Tensor | None = None,
               importance_sampling_level: str = "token") -> TokenTerms:
    """The per-token GRPO loss of completions under the policy being trained.

    logps [B, C]: log p(token) under the policy (with gradient); advantages [B] (or [B, C]);
    old_logps [B, C]: under the policy that generated them (None: ``logps`` detached, the first
    update of a generation batch); ref_logps [B, C]: under the reference (needed when ``beta`` != 0);
    mask [B, C]: the completion tokens (needed by the sequence levels).

    ``ratio = exp(logps - old_logps)`` per token, or one per completion by ``importance_sampling_level``
    (``IMPORTANCE_LEVELS``: ``token``, ``sequence``, ``sequence_sum``), broadcast over its tokens;
    ``loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)``,
    with ``ratio`` first capped at ``delta`` when given (INTELLECT-2's two-sided clip); plus
    ``beta * kl`` where ``kl = exp(ref - logp) - (ref - logp) - 1`` (k3, Schulman 2020), multiplied
    by ``ratio`` when ``kl_bias_correction`` (TRL's default: it changes the KL's gradient even where
    the ratio is 1).
    """
    logps = _upcast(logps)
    old = logps.detach() if old_logps is None else _upcast(old_logps)
    adv = _upcast(advantages)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # [B, 1] or [B, C]
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(get_importance_level(importance_sampling_level)(logps - old, mask))  # [B, C] or [B, 1]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(capped * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        diff = _upcast(ref_logps) - logps
        kl = torch.exp(diff) - diff - 1  # [B, C]
        if kl_bias_correction:
            kl = kl * ratio
        loss = loss + beta * kl
    shape = logps.shape  # a completion's ratio, and its loss, on each of its tokens
    return TokenTerms(loss.expand(shape), kl, ((ratio < 1 - eps_low) & (adv < 0)).expand(shape),
                      ((ratio > 1 + eps_high) & (adv > 0)).expand(shape))


# -- aggregations -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Aggregation:
    """How a GRPO loss type turns per-token losses into the loss of a step (see the module docstring)."""

    count: Callable[[Tensor], Tensor]
    """mask [B, C] -> this micro-batch's share of the step's normaliser (a scalar)."""
    reduce: Callable[[Tensor, Tensor, Tensor, int], Tensor]
    """(per_token [B, C], mask [B, C], normaliser, max_completion_length) -> this micro-batch's share of the loss."""
    doc: str = ""


class UnknownGRPOLossError(UnknownNameError):
    """Raised by :func:`get_grpo_loss`; catchable as either ``ValueError`` or ``KeyError``."""


GRPO_LOSSES: Registry = Registry("GRPO loss type", UnknownGRPOLossError)
get_grpo_loss = GRPO_LOSSES.lookup


def register_grpo_loss(name: str, aggregation: Aggregation, *, override: bool = False) -> Aggregation:
    """Add a loss type (an aggregation) under ``name``; ``override=True`` replaces an existing one."""
    return GRPO_LOSSES.register(name, override=override)(aggregation)


def _masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    # where, not a multiply: a NaN on a padding token must not reach the sum
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def _rows(mask: Tensor) -> Tensor:
    return torch.tensor(mask.shape[0], device=mask.device)


def _seq_means(x, mask, n, _length):
    per_row = _masked_sum(x, mask, -1) / mask.sum(-1).clamp(min=1)  # [B]
    return per_row.sum() / n


register_grpo_loss("grpo", Aggregation(
    _rows, _seq_means,
    "each completion's mean token loss, averaged over completions (GRPO's paper; favours short correct and long wrong answers)"))
register_grpo_loss("bnpo", Aggregation(
    lambda mask: torch.ones((), device=mask.device),
    lambda x, mask, n, _length: _masked_sum(x, mask) / mask.sum().clamp(min=1) / n,
    "the token mean of each micro-batch, averaged over micro-batches and ranks (TRL: local normalisation)"))
register_grpo_loss("dr_grpo", Aggregation(
    _rows, lambda x, mask, n, length: _masked_sum(x, mask) / (n * length),
    "the sum of token losses / (completions x max_completion_length), a constant (Dr. GRPO)"))
register_grpo_loss("dapo", Aggregation(
    lambda mask: mask.sum(), lambda x, mask, n, _length: _masked_sum(x, mask) / n.clamp(min=1),
    "the token mean over every completion token of the step on all ranks (DAPO; TRL's default)"))


def grpo_loss(loss_type: str, per_token: Tensor, mask: Tensor, *, max_completion_length: int,
              normaliser: Tensor | None = None) -> Tensor:
    """The loss of one micro-batch for ``loss_type``: per_token [B, C], mask [B, C] -> scalar.

    ``normaliser``: the step's total of ``count`` over every micro-batch and rank; default this
    batch's own, i.e. the batch is the whole step."""
    agg = get_grpo_loss(loss_type)
    n = agg.count(mask) if normaliser is None else torch.as_tensor(normaliser, device=per_token.device)
    return agg.reduce(_upcast(per_token), mask, _upcast(n.float()), max_completion_length)
