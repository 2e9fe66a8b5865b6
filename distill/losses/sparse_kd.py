"""Distillation divergences against a sparse teacher: a few (token id, log-probability) entries per position and
the probability mass outside them, as a teacher cache stores them (distill/teacher_cache/).

Every loss is a pure function with one signature::

    fn(student_logits [B, T, V_s] or [N, V_s],
       teacher         SparseTeacher of the same leading shape, m entries per position,
       labels          [B, T] or [N] (int, pre-shifted, ``ignore_index`` = ignored),
       *, temperature=1.0, top_k=None, tail="renormalize", num_valid_tokens=None,
       ignore_index=-100, **own_params) -> scalar tensor

with the conventions of distill/losses/kd.py (at least fp32, log space, ``T**2``, the sum over valid positions
divided by ``num_valid_tokens``) and the same names and parameters as the dense losses there. The teacher:

* ``ids`` [..., m]: token ids, most likely first for the entries of a top-k; ``logp`` [..., m]: the teacher's
  log-probabilities at temperature 1 over its whole vocabulary, ``-inf`` in an empty slot; ``log_tail`` [...]:
  the log of the mass outside the entries (``-inf``: none). Ids are distinct within a position.
* ``top_k``: the first ``top_k`` entries are kept and the others join the tail.
* ``tail="renormalize"``: the teacher is its entries renormalised and the tail is dropped. With the teacher's
  top-k entries this is exactly the dense loss with ``top_k=k`` (both distributions restricted as kd.py does),
  and with every token of the vocabulary it is the dense loss without ``top_k``.
* ``tail="bucket"``: the tail is one more class, compared with the student's mass outside the entries: the
  divergence between the two distributions coarsened to the entries + "everything else" (for the KLs a lower
  bound of the full divergence). It needs ``temperature=1``: the tempered mass of the tail is not stored.
* ``temperature``: the entries are re-tempered, ``softmax(logp / T)`` over them. The top-k set does not depend
  on T, so with ``renormalize`` this equals the dense top-k loss at T.

The student's probabilities are its full softmax over ``V_s``; the entries' ids must be below ``V_s`` (the
teacher cache refuses a student whose vocabulary is smaller than the cache's). Positions whose label is ignored
may hold anything: they are replaced by a one-token teacher before any arithmetic, so no NaN reaches a gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.config.registry import Registry, UnknownNameError
from distill.losses.chunked import DEFAULT_CHUNK_SIZE, chunked_kd_loss
from distill.losses.kd import IGNORE_INDEX, _check_unit, _kl, _log_mix, _reduce, _upcast

TAILS = ("renormalize", "bucket")


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher at each position as entries and a tail (see the module docstring); indexable along the leading
    dimensions like a tensor."""

    ids: Tensor  # [..., m] int
    logp: Tensor  # [..., m] float, -inf in empty slots
    log_tail: Tensor  # [...] float

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape[:-1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index) -> "SparseTeacher":
        return SparseTeacher(self.ids[index], self.logp[index], self.log_tail[index])

    def flat(self) -> "SparseTeacher":
        """Every position in one leading dimension: [N, m]."""
        m = self.ids.shape[-1]
        return SparseTeacher(self.ids.reshape(-1, m), self.logp.reshape(-1, m), self.log_tail.reshape(-1))

    def to(self, dtype: torch.dtype) -> "SparseTeacher":
        """The log-probabilities in `dtype` (ids unchanged)."""
        return SparseTeacher(self.ids, self.logp.to(dtype), self.log_tail.to(dtype))


class UnknownSparseKDLossError(UnknownNameError):
    """Raised by :func:`get_sparse_kd_loss`."""


SPARSE_KD_LOSSES: Registry = Registry("sparse KD loss", UnknownSparseKDLossError)
register_sparse_kd_loss = SPARSE_KD_LOSSES.register
"""Decorator adding a loss on a sparse teacher under a name; ``override=True`` replaces one."""
get_sparse_kd_loss = SPARSE_KD_LOSSES.lookup


def sparse_kd_loss(name: str, student_logits: Tensor, teacher: SparseTeacher, labels: Tensor, **kwargs) -> Tensor:
    """Look up ``name`` among the sparse losses and call it."""
    return get_sparse_kd_loss(name)(student_logits, teacher, labels, **kwargs)


@dataclass
class Columns:
    """One position's distributions over the compared classes: ``t`` and ``s``, the teacher's and the student's
    log-probabilities [N, C] (the student's not renormalised), and ``s_out`` [N], the log of the student's mass
    outside the classes (-inf when they cover everything)."""

    t: Tensor
    s: Tensor
    s_out: Tensor
    mask: Tensor  # [N] valid positions


def prepare(student_logits: Tensor, teacher: SparseTeacher, labels: Tensor, *, temperature: float = 1.0,
            top_k: int | None = None, tail: str = "renormalize", ignore_index: int = IGNORE_INDEX,
            outside: bool = True) -> Columns:
    """Flatten, upcast, apply top-k, temperature and the tail rule: the classes every loss compares. `outside`: the
    loss needs the student's mass outside the entries (two more passes over the logits; always with the bucket)."""
    if student_logits.shape[:-1] != teacher.shape or teacher.shape != labels.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_logits.shape)}, teacher entries "
                         f"{tuple(teacher.ids.shape)}, labels {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if tail == "bucket" and temperature != 1.0:
        raise ValueError("tail='bucket' needs temperature 1: the tempered mass of the tail is not known")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    s = _upcast(student_logits).reshape(-1, student_logits.shape[-1])  # [N, V]
    flat = teacher.flat()
    ids, a, a_tail = flat.ids.long(), flat.logp.to(s.dtype), flat.log_tail.to(s.dtype)  # [N, m], [N, m], [N]
    mask = labels.reshape(-1) != ignore_index  # [N]
    if top_k is not None and top_k < ids.shape[1]:
        a_tail = torch.logaddexp(a_tail, torch.logsumexp(a[:, top_k:], -1))
        ids, a = ids[:, :top_k], a[:, :top_k]
    # Ignored positions get a one-token teacher, whatever their slots hold: garbage there must not reach the
    # backward pass (0 * NaN is NaN).
    lone = torch.full_like(a, float("-inf"))
    lone[:, 0] = 0.0
    a = torch.where(mask[:, None], a, lone)
    ids = torch.where(mask[:, None], ids, torch.zeros_like(ids))
    a_tail = torch.where(mask, a_tail, torch.full_like(a_tail, float("-inf")))
    if temperature != 1.0:
        s = s / temperature
    empty = torch.isneginf(a)  # [N, m]
    logq = s.log_softmax(-1)  # [N, V]
    b = logq.gather(-1, ids).masked_fill(empty, float("-inf"))  # [N, m]
    if outside or tail == "bucket":
        # The student's mass outside the entries, exactly: the logits that are no entry, not 1 - sum (which rounds).
        hits = torch.zeros_like(s, dtype=torch.int32).scatter_add_(-1, ids, (~empty).int())  # [N, V]
        s_out = torch.logsumexp(s.masked_fill(hits > 0, float("-inf")), -1) - torch.logsumexp(s, -1)  # [N]
    else:
        s_out = torch.full_like(a_tail, float("nan"))  # not used
    if tail == "bucket":
        t = torch.cat([a, a_tail[:, None]], -1)
        t = t - torch.logsumexp(t, -1, keepdim=True)  # stored values may not sum to 1 exactly
        return Columns(t, torch.cat([b, s_out[:, None]], -1), torch.full_like(s_out, float("-inf")), mask)
    return Columns((a / temperature).log_softmax(-1), b, s_out, mask)


def _outside(c: Columns, weight: float) -> Tensor:
    """``weight * (student mass outside the classes)`` [N]; 0 where there is none (and for weight 0)."""
    return torch.zeros_like(c.s_out) if weight == 0 else weight * c.s_out.exp()


def _restricted(s: Tensor, t: Tensor) -> Tensor:
    """The student renormalised over the classes where the teacher has mass (reverse KL's support)."""
    return s.masked_fill(torch.isneginf(t), float("-inf")).log_softmax(-1)


def _common(temperature, top_k, tail, ignore_index) -> dict:
    return dict(temperature=temperature, top_k=top_k, tail=tail, ignore_index=ignore_index)


@register_sparse_kd_loss("forward_kl")
def forward_kl(student_logits, teacher, labels, *, temperature=1.0, top_k=None, tail="renormalize",
               num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """KL(p_T ‖ p_S) over the teacher's classes (0 · log 0 = 0 elsewhere, as in kd.forward_kl)."""
    c = prepare(student_logits, teacher, labels, **_common(temperature, top_k, tail, ignore_index), outside=False)
    return _reduce(_kl(c.t, c.s), c.mask, num_valid_tokens, temperature)


@register_sparse_kd_loss("reverse_kl")
def reverse_kl(student_logits, teacher, labels, *, temperature=1.0, top_k=None, tail="renormalize",
               num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """KL(p_S ‖ p_T) with the student renormalised over the teacher's classes, as kd.reverse_kl under top-k."""
    c = prepare(student_logits, teacher, labels, **_common(temperature, top_k, tail, ignore_index), outside=False)
    return _reduce(_kl(_restricted(c.s, c.t), c.t), c.mask, num_valid_tokens, temperature)


@register_sparse_kd_loss("generalized_jsd")
def generalized_jsd(student_logits, teacher, labels, *, beta=0.5, temperature=1.0, top_k=None, tail="renormalize",
                    num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m), m = β·p_T + (1 − β)·p_S; outside the teacher's classes m is
    (1 − β)·p_S, which adds −(1 − β)·log(1 − β) per unit of student mass there. beta 0 and 1 are the KLs."""
    _check_unit("beta", beta)
    common = dict(_common(temperature, top_k, tail, ignore_index), num_valid_tokens=num_valid_tokens)
    if beta == 0:
        return forward_kl(student_logits, teacher, labels, **common)
    if beta == 1:
        return reverse_kl(student_logits, teacher, labels, **common)
    c = prepare(student_logits, teacher, labels, **_common(temperature, top_k, tail, ignore_index))
    log_m = _log_mix(c.t, c.s, beta)
    per_token = beta * _kl(c.t, log_m) + (1 - beta) * (_kl(c.s, log_m) + _outside(c, -math.log1p(-beta)))
    return _reduce(per_token, c.mask, num_valid_tokens, temperature)


@register_sparse_kd_loss("skew_forward_kl")
def skew_forward_kl(student_logits, teacher, labels, *, alpha=0.1, temperature=1.0, top_k=None, tail="renormalize",
                    num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """KL(p_T ‖ α·p_T + (1 − α)·p_S); alpha 0 is forward_kl."""
    _check_unit("alpha", alpha)
    if alpha == 0:
        return forward_kl(student_logits, teacher, labels, num_valid_tokens=num_valid_tokens,
                          **_common(temperature, top_k, tail, ignore_index))
    c = prepare(student_logits, teacher, labels, **_common(temperature, top_k, tail, ignore_index), outside=False)
    return _reduce(_kl(c.t, _log_mix(c.t, c.s, alpha)), c.mask, num_valid_tokens, temperature)


@register_sparse_kd_loss("skew_reverse_kl")
def skew_reverse_kl(student_logits, teacher, labels, *, alpha=0.1, temperature=1.0, top_k=None, tail="renormalize",
                    num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """KL(p_S ‖ α·p_S + (1 − α)·p_T); outside the teacher's classes the mixture is α·p_S (−log α per unit of
    student mass there); alpha 0 is reverse_kl."""
    _check_unit("alpha", alpha)
    if alpha == 0:
        return reverse_kl(student_logits, teacher, labels, num_valid_tokens=num_valid_tokens,
                          **_common(temperature, top_k, tail, ignore_index))
    c = prepare(student_logits, teacher, labels, **_common(temperature, top_k, tail, ignore_index))
    per_token = _kl(c.s, _log_mix(c.s, c.t, alpha)) + _outside(c, -math.log(alpha))
    return _reduce(per_token, c.mask, num_valid_tokens, temperature)


@register_sparse_kd_loss("tvd")
def tvd(student_logits, teacher, labels, *, temperature=1.0, top_k=None, tail="renormalize",
        num_valid_tokens=None, ignore_index=IGNORE_INDEX) -> Tensor:
    """½ Σ |p_T − p_S|: over the teacher's classes, plus the student's mass outside them."""
    c = prepare(student_logits, teacher, labels, **_common(temperature, top_k, tail, ignore_index))
    gap = (c.t.exp() - c.s.exp()).abs().sum(-1) + _outside(c, 1.0)
    return _reduce(0.5 * gap, c.mask, num_valid_tokens, temperature)


def chunked_sparse_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher: SparseTeacher, labels: Tensor, *,
                           loss: str = "forward_kl", alpha_ce: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           num_valid_tokens=None, ignore_index: int = IGNORE_INDEX, temperature: float = 1.0,
                           top_k: int | None = None, tail: str = "renormalize", loss_kwargs: dict | None = None,
                           student_bias: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha_ce * CE + (1 - alpha_ce) * KD`` from the student's final hidden states [N or B, T, H_s] and lm_head
    weight [V_s, H_s], against a sparse teacher of the same leading shape, chunk by chunk as
    `distill.losses.chunked_kd_loss` (whose conventions and return value it has): no [tokens, V] logits are held."""
    return chunked_kd_loss(student_hidden, student_weight, teacher.flat(), None, labels, loss=get_sparse_kd_loss(loss),
                           alpha_ce=alpha_ce, chunk_size=chunk_size, num_valid_tokens=num_valid_tokens,
                           ignore_index=ignore_index, temperature=temperature, top_k=top_k,
                           loss_kwargs={**(loss_kwargs or {}), "tail": tail}, student_bias=student_bias)
