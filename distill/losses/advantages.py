"""Advantage estimators of group RL, registered by name (`grpo.advantage`): rewards -> advantages.

Every estimator is a pure function with one signature::

    fn(rewards [N], num_generations, scale_rewards, *, all_reduce=None) -> advantages [N]

``rewards`` holds ``N / num_generations`` groups, each the ``num_generations`` completions of one prompt,
next to each other. NaN marks a completion no reward could score: it is left out of every statistic and
gets advantage 0. ``all_reduce`` sums a tensor over ranks; estimators with statistics of the whole step
call it (None: this batch is the whole step). ``scale_rewards`` is one of the estimator's ``scalings``.

* ``group`` (GRPO, Shao et al. 2024): ``(r - mean of its group) / (std + 1e-4)``, the std of the group,
  of the step (``batch``) or none (:func:`distill.losses.grpo.group_advantages`; TRL's ``GRPOTrainer``).
* ``rloo`` (REINFORCE Leave-One-Out, Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740):
  ``r - mean of the other scored completions of its group``, then with ``batch`` normalised over the step
  (``(A - mean A) / (std A + 1e-4)``, TRL's ``normalize_advantages``); TRL's ``RLOOTrainer``.
* ``reinforce_pp`` (REINFORCE++, Hu 2025, arXiv 2501.03262): ``(r - mean) / (std + 1e-4)`` over every
  reward of the step on all ranks: the baseline and the scale are the global batch's, not the group's.

The statistics of the whole step take one all-reduce of (sum, sum of squares, count) in float64, so the
std of a step spread over ranks is the std of all its rewards (Bessel-corrected, as TRL's ``nanstd``).

:func:`sequence_kl` is the KL penalty that `grpo.kl_penalty: reward` subtracts from the rewards first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from distill.config.registry import Registry, UnknownNameError
from distill.losses.grpo import ADVANTAGE_EPS, group_advantages
from distill.losses.kd import _upcast


@dataclass(frozen=True)
class AdvantageEstimator:
    """An advantage estimator and the `scale_rewards` values it takes (the first is its default)."""

    fn: Callable[..., Tensor]
    """(rewards [N], num_generations, scale_rewards, *, all_reduce) -> advantages [N]."""
    scalings: tuple[str, ...]
    doc: str = ""


class UnknownAdvantageError(UnknownNameError):
    """Raised by :func:`get_advantage`; catchable as either ``ValueError`` or ``KeyError``."""


ADVANTAGES: Registry = Registry("advantage estimator", UnknownAdvantageError)
get_advantage = ADVANTAGES.lookup


def register_advantage(name: str, estimator: AdvantageEstimator, *, override: bool = False) -> AdvantageEstimator:
    """Add an estimator under ``name``; ``override=True`` replaces an existing one."""
    return ADVANTAGES.register(name, override=override)(estimator)


def _check(rewards: Tensor, num_generations: int) -> None:
    if rewards.dim() != 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"rewards must be [N] with N a multiple of num_generations={num_generations}, got {tuple(rewards.shape)}")


def masked_moments(x: Tensor, mask: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(mean, variance) of x [B, C] where mask [B, C] is 1, over every rank (``all_reduce`` sums a tensor over
    ranks; None: this tensor is all there is), float64 scalars: one all-reduce of (sum, sum of squares, count).
    The variance is Bessel-corrected (TRL's ``masked_var``); 0 for fewer than 2 values."""
    v, m = x.double(), mask.bool()
    kept = torch.where(m, v, torch.zeros_like(v))
    stats = torch.stack([kept.sum(), (kept * kept).sum(), m.sum().double()])  # [3]
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, squares, n = stats.unbind()
    mean = total / n.clamp(min=1)
    var = (squares - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
    return mean, torch.where(n > 1, var, torch.zeros_like(var))


def batch_moments(x: Tensor, all_reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(mean, std) of the non-NaN values of ``x`` [N] on every rank, float64 scalars (:func:`masked_moments`)."""
    mean, var = masked_moments(x, ~torch.isnan(x), all_reduce)
    return mean, var.sqrt()


def _normalised(x: Tensor, all_reduce) -> Tensor:
    mean, std = batch_moments(x, all_reduce)
    return ((x.double() - mean) / (std + ADVANTAGE_EPS)).to(x.dtype)


def group_estimator(rewards: Tensor, num_generations: int, scale_rewards: str = "group", *, all_reduce=None) -> Tensor:
    """GRPO's group-normalised advantages [N] (see :func:`distill.losses.grpo.group_advantages`)."""
    return group_advantages(rewards, num_generations, scale_rewards, all_reduce=all_reduce)[0]


def rloo(rewards: Tensor, num_generations: int, scale_rewards: str = "none", *, all_reduce=None) -> Tensor:
    """Leave-one-out advantages [N]: each reward minus the mean of the other scored rewards of its group
    (0 where it has none, or is not scored itself); with ``batch``, then normalised over the step."""
    _check(rewards, num_generations)
    r = _upcast(rewards)
    grouped = r.view(-1, num_generations)  # [N / G, G]
    scored = (~torch.isnan(grouped)).sum(1, keepdim=True)  # [N / G, 1]
    total = torch.nansum(grouped, 1, keepdim=True)  # [N / G, 1]
    baseline = (total - grouped) / (scored - 1)  # [N / G, G]: NaN with no other scored completion
    advantages = (grouped - baseline).view(-1)  # [N]
    if scale_rewards == "batch":
        advantages = _normalised(advantages, all_reduce)
    return torch.nan_to_num(advantages, nan=0.0)


def reinforce_pp(rewards: Tensor, num_generations: int, scale_rewards: str = "batch", *, all_reduce=None) -> Tensor:
    """REINFORCE++ advantages [N]: the rewards normalised by the mean and std of the whole step's, on all ranks."""
    _check(rewards, num_generations)
    return torch.nan_to_num(_normalised(_upcast(rewards), all_reduce), nan=0.0)


register_advantage("group", AdvantageEstimator(
    group_estimator, ("group", "batch", "none"), "against the mean of its group; divided by the group's std (GRPO)"))
register_advantage("rloo", AdvantageEstimator(
    rloo, ("none", "batch"), "against the mean of the other completions of its prompt (RLOO)"))
register_advantage("reinforce_pp", AdvantageEstimator(
    reinforce_pp, ("batch",), "normalised over every reward of the step on all ranks (REINFORCE++)"))


def advantages(name: str, rewards: Tensor, num_generations: int, scale_rewards: str | None = None, *,
               all_reduce=None) -> Tensor:
    """The advantages [N] of estimator ``name`` (``scale_rewards`` None: its default)."""
    est = get_advantage(name)
    scale = est.scalings[0] if scale_rewards is None else scale_rewards
    if scale not in est.scalings:
        raise ValueError(f"advantage estimator {name!r} takes scale_rewards {' or '.join(est.scalings)}, not {scale!r}")
    return est.fn(rewards, num_generations, scale, all_reduce=all_reduce)


def sequence_kl(old_logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """[B] per completion: ``sum_t (log pi_old(t) - log pi_ref(t))`` over its loss tokens (mask [B, C] 1), the
    first-order (k1) estimate of KL(pi_old || pi_ref) on its own samples, as TRL's RLOOTrainer (and the RLOO
    paper) subtract ``beta`` times it from the reward. Unlike k3 it can be negative for one completion."""
    diff = _upcast(old_logps) - _upcast(ref_logps)  # [B, C]
    return torch.where(mask.bool(), diff, torch.zeros_like(diff)).sum(-1)
