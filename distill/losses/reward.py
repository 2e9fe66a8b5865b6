"""Reward-model losses: pairwise, on the scores of a sequence classifier, registered by name.

Every reward loss is a pure function with one signature::

    fn(chosen   [B],   # the reward model's score of prompt + chosen response
       rejected [B],   # ... of prompt + rejected response
       *, margin [B] | None = None) -> per-pair losses [B]

The losses are returned per pair, not reduced: the trainer sums them over a micro-batch's real pairs and
divides by the pairs of the whole step on all ranks, which reproduces one big batch.

* ``bradley_terry`` (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, arXiv 2203.02155):
  ``-log sigmoid(chosen - rejected - margin)``, the negative log-likelihood of the preference under the
  Bradley-Terry model. ``margin`` (Llama 2, Touvron et al. 2023, arXiv 2307.09288) asks the chosen score to
  lead by at least that much; None is 0 (TRL's ``RewardTrainer``, with a ``margin`` column or without).

:func:`centering` is the auxiliary term of Eisenstein et al. 2023 (arXiv 2312.09244), TRL's
``center_rewards_coefficient``: ``(chosen + rejected)**2`` per pair, which pulls the scores towards mean 0
(a reward model is defined only up to a constant; centred scores are comparable across models).

Inputs are promoted to at least fp32 (float64 stays float64, so exact tests work).
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from distill.config.registry import Registry, UnknownNameError
from distill.losses.kd import _upcast

RewardLossFn = Callable[..., Tensor]


class UnknownRewardLossError(UnknownNameError):
    """Raised by :func:`get_reward_loss`; catchable as either ``ValueError`` or ``KeyError``."""


REWARD_LOSSES: Registry = Registry("reward loss", UnknownRewardLossError)
register_reward_loss = REWARD_LOSSES.register
"""Decorator adding a loss under a name; ``override=True`` replaces an existing one."""
get_reward_loss = REWARD_LOSSES.lookup


def _pair(chosen: Tensor, rejected: Tensor, margin: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    if chosen.dim() != 1 or chosen.shape != rejected.shape or (margin is not None and margin.shape != chosen.shape):
        raise ValueError("expected [B] scores of the chosen and rejected sequences (and a [B] margin), got shapes "
                         f"{tuple(chosen.shape)}, {tuple(rejected.shape)}"
                         + ("" if margin is None else f", {tuple(margin.shape)}"))
    return _upcast(chosen), _upcast(rejected), None if margin is None else _upcast(margin)


@register_reward_loss("bradley_terry")
def bradley_terry(chosen: Tensor, rejected: Tensor, *, margin: Tensor | None = None) -> Tensor:
    """``-log sigmoid(chosen - rejected - margin)`` [B]."""
    c, r, m = _pair(chosen, rejected, margin)
    diff = c - r if m is None else c - r - m
    return -F.logsigmoid(diff)


def centering(chosen: Tensor, rejected: Tensor) -> Tensor:
    """``(chosen + rejected)**2`` [B]: the pair's share of TRL's ``mean((r_chosen + r_rejected)**2)``."""
    c, r, _ = _pair(chosen, rejected, None)
    return (c + r) ** 2
