"""Pairwise preference losses (DPO family), registered by name.

Every preference loss is a pure function with one signature::

    fn(policy_chosen_logps   [B],
       policy_rejected_logps [B],
       ref_chosen_logps      [B],
       ref_rejected_logps    [B],
       *, beta=0.1, label_smoothing=0.0) -> per-pair losses [B]

Each input is one log-probability per sequence: the SUM of the log-probs of its
response tokens (prompt and padding excluded). Our DPO trainer passes summed log-probs
to every loss, IPO included (the IPO paper and TRL average over response tokens
instead; a caller wanting that divides by the response lengths first; the
functions here take whatever they are given).

The losses are returned per pair, not reduced: the trainer sums them and divides by the
global number of pairs (all ranks, all micro-batches), which reproduces one big batch.

With ``h = (pc - pr) - (rc - rr)`` (how much more the policy prefers the chosen
response than the reference does):

* ``sigmoid`` (DPO, Rafailov et al. 2023, arXiv 2305.18290): ``-log sigmoid(beta h)``;
  ``label_smoothing = eps > 0`` gives conservative DPO, assuming labels are flipped
  with probability ``eps``: ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``
  (TRL's ``loss_type="sigmoid"``).
* ``robust`` (Chowdhury et al. 2024, arXiv 2403.00409; TRL's ``"robust"``): the unbiased
  version of the noisy-label loss, ``(-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``.
* ``ipo`` (Azar et al. 2023, arXiv 2310.12036): ``(h - 1/(2 beta))**2``.
* ``hinge`` (SLiC, Zhao et al. 2023, arXiv 2305.10425): ``relu(1 - beta h)``.

Inputs are promoted to at least fp32 (float64 stays float64, so exact tests work).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config.registry import Registry, UnknownNameError
from distill.losses.kd import _upcast

PreferenceLossFn = Callable[..., Tensor]


class UnknownPreferenceLossError(UnknownNameError):
    """Raised by :func:`get_preference_loss`; catchable as either ``ValueError`` or ``KeyError``."""


PREFERENCE_LOSSES: Registry = Registry("preference loss", UnknownPreferenceLossError)
register_preference_loss = PREFERENCE_LOSSES.register
"""Decorator adding a loss under a name; ``override=True`` replaces an existing one."""
get_preference_loss = PREFERENCE_LOSSES.lookup


def preference_loss(name: str, *logps: Tensor, **kwargs) -> Tensor:
    """Look up ``name`` in the registry and call it on the four log-prob tensors."""
    return get_preference_loss(name)(*logps, **kwargs)


def rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Implicit DPO rewards ``beta * (policy - ref)`` [B], detached (for logging only)."""
    _check_beta(beta)
    return (beta * (_upcast(policy_logps) - _upcast(ref_logps))).detach()


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _logits(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Validate and return ``h = (pc - pr) - (rc - rr)`` [B] in at least fp32."""
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        # At 0.5 the labels carry no information (and robust divides by zero).
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shapes = {tuple(x.shape) for x in (pc, pr, rc, rr)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(
            "expected four [B] log-prob tensors (one summed log-prob per sequence), got shapes "
            f"{[tuple(x.shape) for x in (pc, pr, rc, rr)]}"
        )
    pc, pr, rc, rr = (_upcast(x) for x in (pc, pr, rc, rr))
    return (pc - pr) - (rc - rr)


def _no_smoothing(name: str, label_smoothing: float) -> None:
    # A silently ignored setting would make two runs look different when they are not.
    if label_smoothing:
        raise ValueError(
            f"preference loss {name!r} has no label_smoothing; use 'sigmoid' or 'robust', or set it to 0"
        )


@register_preference_loss("sigmoid")
def sigmoid(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
            ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """DPO: ``-log sigmoid(beta h)``; conservative DPO with ``label_smoothing`` [B]."""
    h = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta, label_smoothing)
    loss = -F.logsigmoid(beta * h)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
    return loss


@register_preference_loss("robust")
def robust(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
           ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO: unbiased under label flips with probability ``label_smoothing`` [B].

    Unlike conservative DPO it can be negative, and it equals :func:`sigmoid` at 0.
    """
    h = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta, label_smoothing)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


@register_preference_loss("ipo")
def ipo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """IPO: ``(h - 1/(2 beta))**2`` [B]; regresses the margin to a target instead of pushing it to infinity.

    ``beta`` plays the role of the paper's ``tau``. With summed log-probs (our trainer's
    default) ``h`` grows with the response length, so the same ``beta`` asks for a
    smaller per-token margin than with the token-averaged log-probs of the paper and TRL.
    """
    _no_smoothing("ipo", label_smoothing)
    h = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, 0.0)
    return (h - 1 / (2 * beta)) ** 2


@register_preference_loss("hinge")
def hinge(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
          ref_rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """SLiC hinge: ``relu(1 - beta h)`` [B]; zero (and no gradient) once the margin exceeds ``1/beta``."""
    _no_smoothing("hinge", label_smoothing)
    h = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, 0.0)
    return torch.relu(1 - beta * h)
