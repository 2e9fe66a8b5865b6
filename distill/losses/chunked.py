"""Fused lm_head + (CE, KD) loss that never materialises full [N, V] logits.

For long sequences and large vocabularies the fp32 logits of student *and* teacher, plus
the student's logit gradient, dominate activation memory (e.g. 16k tokens x 152k vocab x
4 B = 10 GB per tensor). Here the tokens are walked in chunks: each chunk's logits are
built, the loss and its gradient w.r.t. those logits are taken with autograd, and the
gradient is immediately pushed through the lm_head matmul. Only ``grad_hidden [N, H_s]``
and ``grad_weight [V_s, H_s]`` survive until backward, which just scales them by the
incoming gradient (the loss is a scalar, so that is exact).

Because the per-chunk loss goes through the registered KD function with autograd, any
user-registered loss works unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kd import IGNORE_INDEX, count_valid, cross_entropy, get_kd_loss


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
                kd_fn, kd_kwargs, alpha_ce, chunk_size, num_valid, need_grad):
        ignore_index = kd_kwargs["ignore_index"]
        n_tokens = s_hidden.shape[0]
        compute_dtype = torch.promote_types(s_hidden.dtype, torch.float32)
        grad_hidden = torch.zeros_like(s_hidden) if need_grad[0] else None
        # fp32 accumulator: the weight gradient is a sum over every chunk, and summing
        # hundreds of bf16 partials would lose precision.
        grad_weight = torch.zeros(s_weight.shape, dtype=compute_dtype, device=s_weight.device) if need_grad[1] else None
        grad_bias = (torch.zeros(s_bias.shape, dtype=compute_dtype, device=s_bias.device)
                     if s_bias is not None and need_grad[2] else None)
        any_grad = any(need_grad)
        ce_total = torch.zeros((), dtype=compute_dtype, device=s_hidden.device)
        kd_total = torch.zeros((), dtype=compute_dtype, device=s_hidden.device)

        # The chunk count depends on positions only, never on how many labels are valid,
        # so ranks with equal N run the same kernels (and, under ZeRO-3, the same
        # collectives around this call). All-ignored chunks still run and add 0.
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h_s = s_hidden[start:end]
            lab = labels[start:end]
            # Matmul in the model's dtype (as its lm_head would), then upcast the logits.
            logits = F.linear(h_s, s_weight, s_bias).to(compute_dtype)
            t_logits = F.linear(t_hidden[start:end], t_weight, t_bias).to(compute_dtype)

            with torch.enable_grad():
                logits.requires_grad_(any_grad)
                kd = kd_fn(logits, t_logits, lab, num_valid_tokens=num_valid, **kd_kwargs)
                with torch.set_grad_enabled(any_grad and alpha_ce != 0):
                    ce = cross_entropy(logits, lab, num_valid_tokens=num_valid, ignore_index=ignore_index)
                if any_grad:
                    objective = (1 - alpha_ce) * kd
                    if alpha_ce != 0:
                        objective = objective + alpha_ce * ce
                    (grad_logits,) = torch.autograd.grad(objective, logits)
            ce_total += ce.detach()
            kd_total += kd.detach()
            del t_logits, logits
            if not any_grad:
                continue

            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits.to(s_weight.dtype) @ s_weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h_s.to(compute_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del grad_logits

        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.to(s_weight.dtype),
            None if grad_bias is None else grad_bias.to(s_bias.dtype),
        )
        total = alpha_ce * ce_total + (1 - alpha_ce) * kd_total
        ctx.mark_non_differentiable(ce_total, kd_total)
        return total, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kd):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
        return (scale(grad_hidden), scale(grad_weight), scale(grad_bias)) + (None,) * 10


def chunked_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    loss: str = "forward_kl",
    alpha_ce: float = 0.0,
    chunk_size: int = 1024,
    num_valid_tokens: int | Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    top_k: int | None = None,
    loss_kwargs: dict | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha_ce * CE + (1 - alpha_ce) * KD`` straight from final hidden states.

    Args:
        student_hidden: [N, H_s] or [B, T, H_s], final hidden states (requires grad).
        student_weight: [V_s, H_s], the student's lm_head weight (requires grad).
        teacher_hidden: [N, H_t] or [B, T, H_t], no grad.
        teacher_weight: [V_t, H_t], no grad; already gathered by the caller under ZeRO-3.
        labels: [N] or [B, T], pre-shifted, ``ignore_index`` for ignored positions.
        loss: name of a registered KD loss (see ``KD_LOSSES``); ``loss_kwargs`` go to it.
        num_valid_tokens: the denominator of both terms. Pass the global count (all
            ranks, whole accumulated step) so micro-batch losses sum to the full-batch
            loss; default is the local valid count.
        chunk_size: tokens per chunk. At most one [chunk, V] logits tensor per model
            (plus the loss's own temporaries) is alive at a time.

    Callers under data parallelism should pad so N is equal on every rank: the work done
    is ceil(N / chunk_size) chunks regardless of how many labels are valid.

    Returns:
        (total, {"ce": detached CE, "kd": detached KD}), each term sum / num_valid_tokens.
        Equal, in value and student gradients, to the unchunked
        ``alpha_ce * cross_entropy(h_s @ W_s.T, labels) + (1 - alpha_ce) * kd(h_s @ W_s.T, h_t @ W_t.T, labels)``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not 0.0 <= alpha_ce <= 1.0:
        raise ValueError(f"alpha_ce must be in [0, 1], got {alpha_ce}")
    kd_fn = get_kd_loss(loss)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    labels = labels.reshape(-1).long()
    if not (s_hidden.shape[0] == t_hidden.shape[0] == labels.shape[0]):
        raise ValueError(
            f"token count mismatch: student {s_hidden.shape[0]}, teacher {t_hidden.shape[0]}, labels {labels.shape[0]}"
        )
    if num_valid_tokens is None:
        num_valid_tokens = count_valid(labels, ignore_index).clamp(min=1)
    kd_kwargs = dict(loss_kwargs or {}, temperature=temperature, top_k=top_k, ignore_index=ignore_index)
    grad_on = torch.is_grad_enabled()
    need_grad = (
        grad_on and s_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    total, ce, kd = _ChunkedKD.apply(
        s_hidden, student_weight, student_bias, t_hidden, teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), labels,
        kd_fn, kd_kwargs, float(alpha_ce), int(chunk_size), num_valid_tokens, need_grad,
    )
    return total, {"ce": ce, "kd": kd}
