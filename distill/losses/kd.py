"""Token-level distillation divergences, registered by name.

Every KD loss is a pure function with one signature::

    fn(student_logits [B, T, V] or [N, V],
       teacher_logits  same leading shape, V may differ,
       labels          [B, T] or [N] (int, pre-shifted, ``ignore_index`` = ignored),
       *, temperature=1.0, top_k=None, num_valid_tokens=None,
       ignore_index=-100, **own_params) -> scalar tensor

and returns ``sum over valid positions of the per-token divergence / num_valid_tokens``.
The trainer passes the *global* valid count (all ranks, all micro-batches), so summing
the returned values over micro-batches and ranks reproduces one big batch exactly;
without it the local count is used.

Shared conventions:

* Logits are promoted to at least fp32 and everything is done in log space, so bf16
  inputs and very large (finite) logits stay finite.
* Temperature ``T``: both logits are divided by ``T`` and the divergence is multiplied by
  ``T**2`` (Hinton et al. 2015), which keeps gradient magnitudes comparable across ``T``.
* ``top_k``: the teacher keeps only its ``k`` most likely tokens (others get ``-inf``
  before ``log_softmax``, i.e. the kept probabilities are renormalised). Terms where a
  distribution has zero probability are defined as ``0 * log 0 = 0``.
* Vocab mismatch: tokenizers padded to different sizes share a prefix, so only
  ``[..., :min(V_s, V_t)]`` is compared.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config.registry import Registry, UnknownNameError

IGNORE_INDEX = -100

KDLossFn = Callable[..., Tensor]


class UnknownKDLossError(UnknownNameError):
    """Raised by :func:`get_kd_loss`; catchable as either ``ValueError`` or ``KeyError``."""


KD_LOSSES: Registry = Registry("KD loss", UnknownKDLossError)
register_kd_loss = KD_LOSSES.register
"""Decorator adding a loss under a name: ``@register_kd_loss("my_kl")``; ``override=True`` replaces one."""
get_kd_loss = KD_LOSSES.lookup


def kd_loss(name: str, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, **kwargs) -> Tensor:
    """Look up ``name`` in the registry and call it."""
    return get_kd_loss(name)(student_logits, teacher_logits, labels, **kwargs)


def count_valid(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of positions whose label is not ``ignore_index`` (int64 scalar tensor)."""
    return (labels != ignore_index).sum()


def _upcast(x: Tensor) -> Tensor:
    # At least fp32, but float64 stays float64 so gradcheck and exact tests work.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _denominator(mask: Tensor, num_valid_tokens, like: Tensor) -> Tensor:
    n = mask.sum() if num_valid_tokens is None else torch.as_tensor(num_valid_tokens, device=like.device)
    # A count of 0 only happens when every position everywhere is ignored; the numerator is
    # then 0 too and 0 (not NaN) is the useful answer.
    return n.to(like.dtype).clamp(min=1)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    num_valid_tokens: int | Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Next-token cross-entropy with the KD conventions.

    logits [..., V], labels [...] (pre-shifted). Returns sum over valid positions of
    ``-log p(label)`` divided by ``num_valid_tokens`` (default: local valid count).
    """
    logits = _upcast(logits).reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1).long()
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / _denominator(labels != ignore_index, num_valid_tokens, total)


def _prepare(student_logits, teacher_logits, labels, temperature, top_k, ignore_index):
    """Flatten, upcast, align vocabularies, apply temperature and top-k.

    Returns (student [N, V], teacher [N, V] with -inf outside its top-k, mask [N]).
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(student_logits.shape)}, teacher "
            f"{tuple(teacher_logits.shape)}, labels {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s = _upcast(student_logits[..., :vocab]).reshape(-1, vocab)
    t = _upcast(teacher_logits[..., :vocab]).reshape(-1, vocab).to(s.dtype)
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive int or None, got {top_k}")
        if top_k < vocab:
            keep = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, t.topk(top_k, dim=-1).indices, True)
            t = t.masked_fill(~keep, float("-inf"))
    return s, t, labels.reshape(-1) != ignore_index


def _reduce(per_token: Tensor, mask: Tensor, num_valid_tokens, temperature: float) -> Tensor:
    # where (not a multiply) so garbage in ignored rows can't leak NaN into the sum.
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return total * (temperature**2) / _denominator(mask, num_valid_tokens, total)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """Row-wise KL(p || q) [N] from log-probs [N, V], with 0 * log 0 = 0.

    The difference is masked *before* the multiply: masking the product instead would
    let ``0 * (-inf - -inf) = NaN`` reach the backward pass.
    """
    diff = (logp - logq).masked_fill(torch.isneginf(logp), 0.0)
    return (logp.exp() * diff).sum(-1)


def _log_mix(logp: Tensor, logq: Tensor, w: float) -> Tensor:
    """log(w * p + (1 - w) * q) computed in log space."""
    if w == 0:
        return logq
    if w == 1:
        return logp
    # Clamping -inf to the most negative float keeps logsumexp's backward finite where
    # both p and q are zero (it would compute exp(-inf - -inf) = NaN).
    lo = torch.finfo(logp.dtype).min
    stacked = torch.stack([logp.clamp(min=lo) + math.log(w), logq.clamp(min=lo) + math.log1p(-w)])
    return torch.logsumexp(stacked, dim=0)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@register_kd_loss("forward_kl")
def forward_kl(student_logits, teacher_logits, labels, *, temperature=1.0, top_k=None,
               num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """KL(p_T || p_S): mean-seeking; the student must cover every teacher mode."""
    s, t, mask = _prepare(student_logits, teacher_logits, labels, temperature, top_k, ignore_index)
    per_token = _kl(t.log_softmax(-1), s.log_softmax(-1))
    return _reduce(per_token, mask, num_valid_tokens, temperature)


@register_kd_loss("reverse_kl")
def reverse_kl(student_logits, teacher_logits, labels, *, temperature=1.0, top_k=None,
               num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """KL(p_S || p_T): mode-seeking.

    With ``top_k`` the teacher is zero outside its top-k, so any student mass there would
    make the divergence infinite. We therefore define it over the teacher's top-k support
    only: the student is renormalised over the same k tokens before comparing.
    """
    s, t, mask = _prepare(student_logits, teacher_logits, labels, temperature, top_k, ignore_index)
    if top_k is not None:
        s = s.masked_fill(torch.isneginf(t), float("-inf"))
    per_token = _kl(s.log_softmax(-1), t.log_softmax(-1))
    return _reduce(per_token, mask, num_valid_tokens, temperature)


@register_kd_loss("generalized_jsd")
def generalized_jsd(student_logits, teacher_logits, labels, *, beta=0.5, temperature=1.0, top_k=None,
                    num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv 2306.13649, Eq. 1).

    ``JSD(beta) = beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)``, ``m = beta p_T + (1 - beta) p_S``.
    The interior tends to 0 at both ends, so like TRL's ``generalized_jsd_loss`` the end
    points are *defined* as the KLs it interpolates between: ``beta=0`` is
    :func:`forward_kl` and ``beta=1`` is :func:`reverse_kl` (exactly, by delegation).
    """
    _check_unit("beta", beta)
    common = dict(temperature=temperature, top_k=top_k, num_valid_tokens=num_valid_tokens, ignore_index=ignore_index)
    if beta == 0:
        return forward_kl(student_logits, teacher_logits, labels, **common)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, labels, **common)
    s, t, mask = _prepare(student_logits, teacher_logits, labels, temperature, top_k, ignore_index)
    logp_t, logp_s = t.log_softmax(-1), s.log_softmax(-1)
    log_m = _log_mix(logp_t, logp_s, beta)
    per_token = beta * _kl(logp_t, log_m) + (1 - beta) * _kl(logp_s, log_m)
    return _reduce(per_token, mask, num_valid_tokens, temperature)


def _skew_kl(p_logits: Tensor, q_logits: Tensor, alpha: float) -> Tensor:
    """KL(p || alpha p + (1 - alpha) q) per token [..]: the skew divergence of DistiLLM, both ways."""
    logp = p_logits.log_softmax(-1)
    return _kl(logp, _log_mix(logp, q_logits.log_softmax(-1), alpha))


@register_kd_loss("skew_forward_kl")
def skew_forward_kl(student_logits, teacher_logits, labels, *, alpha=0.1, temperature=1.0, top_k=None,
                    num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024, arXiv 2402.03898): KL(p_T || alpha p_T + (1 - alpha) p_S).

    Mixing some teacher into the target bounds the divergence by ``log(1/alpha)``, which
    tames gradients when the student assigns ~0 to teacher tokens. ``alpha=0`` is
    :func:`forward_kl`; ``alpha=1`` is identically 0.
    """
    _check_unit("alpha", alpha)
    if alpha == 0:
        return forward_kl(student_logits, teacher_logits, labels, temperature=temperature, top_k=top_k,
                          num_valid_tokens=num_valid_tokens, ignore_index=ignore_index)
    s, t, mask = _prepare(student_logits, teacher_logits, labels, temperature, top_k, ignore_index)
    return _reduce(_skew_kl(t, s, alpha), mask, num_valid_tokens, temperature)


@register_kd_loss("skew_reverse_kl")
def skew_reverse_kl(student_logits, teacher_logits, labels, *, alpha=0.1, temperature=1.0, top_k=None,
                    num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """Skew reverse KL of DistiLLM: KL(p_S || alpha p_S + (1 - alpha) p_T).

    For ``alpha > 0`` it stays finite under ``top_k`` without restricting the student.
    ``alpha=0`` is :func:`reverse_kl` (with its top-k support convention).
    """
    _check_unit("alpha", alpha)
    if alpha == 0:
        return reverse_kl(student_logits, teacher_logits, labels, temperature=temperature, top_k=top_k,
                          num_valid_tokens=num_valid_tokens, ignore_index=ignore_index)
    s, t, mask = _prepare(student_logits, teacher_logits, labels, temperature, top_k, ignore_index)
    return _reduce(_skew_kl(s, t, alpha), mask, num_valid_tokens, temperature)


@register_kd_loss("tvd")
def tvd(student_logits, teacher_logits, labels, *, temperature=1.0, top_k=None,
        num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """Total variation distance 0.5 * sum_v |p_T - p_S|, bounded in [0, 1] per token."""
    s, t, mask = _prepare(student_logits, teacher_logits, labels, temperature, top_k, ignore_index)
    per_token = 0.5 * (t.softmax(-1) - s.softmax(-1)).abs().sum(-1)
    return _reduce(per_token, mask, num_valid_tokens, temperature)
