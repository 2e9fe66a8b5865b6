"""Fused lm_head + (CE, KD) loss that never materialises full [N, V] logits.

For long sequences and large vocabularies the fp32 logits of student *and* teacher, plus
the student's logit gradient, dominate activation memory (e.g. 16k tokens x 152k vocab x
4 B = 10 GB per tensor). Here the tokens are walked in chunks. For each chunk:

1. both models' logits are one matmul each, in the weights' dtype (bf16 for a bf16
   model, as its lm_head would compute them), giving ``[chunk, V]`` in that dtype;
2. the loss and its gradient w.r.t. the logits are taken a few rows at a time (about
   ``SUB_ELEMS`` elements per fp32 temporary), and the gradient, cast to the weights'
   dtype, overwrites the student logits' rows that were just consumed;
3. that gradient goes through the lm_head by two matmuls, again in the weights' dtype:
   ``grad_hidden[chunk] = g @ W`` and ``grad_W += g.T @ h`` (accumulated in fp32 when
   there is more than one chunk, one row block at a time so the final cast never holds a
   full fp32 and a full bf16 copy at once).

No autograd graph goes through the matmuls. Only ``grad_hidden [N, H_s]`` and
``grad_weight [V_s, H_s]`` survive until backward, which just scales them by the incoming
gradient (the loss is a scalar, so that is exact).

The built-in ``forward_kl`` (the default) has its gradient written out by hand
(``softmax(s) - softmax(t)``, CE folded in), which needs about half the memory traffic of
autograd through the loss. Any other registered loss, or ``forward_kl`` replaced by a user
registration, goes through the loss function with autograd on the fp32 rows, so any
user-registered loss works unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses import kd as _kd
from distill.losses.kd import IGNORE_INDEX, count_valid, cross_entropy, get_kd_loss

DEFAULT_CHUNK_SIZE = 2048
SUB_ELEMS = 1 << 25
"""Elements of one fp32 [rows, V] temporary of the loss step (128 MiB): the rows it takes at a time. The step keeps
about three of them alive; big enough that each elementwise kernel saturates HBM. A test sets it small to cut a
tiny vocabulary into several steps; benchmarks/kd_loss.py sweeps it."""
ACC_BLOCK_ELEMS = 1 << 26
"""Row blocks of the fp32 weight-gradient accumulator are about this many elements."""

_FAST_KWARGS = frozenset({"temperature", "top_k", "ignore_index"})


# --------------------------------------------------------------------------- matmuls


ADDMM_MODE: dict[str, str] = {}
"""How `acc += a @ b` runs per device and dtypes (`_probe_addmm_mode`), probed once per process;
benchmarks/kd_loss.py records which one ran."""


def _probe_addmm_mode(device: torch.device) -> str:
    """How to do ``acc_fp32 += a_bf16 @ b_bf16`` on this device without fp32 copies of a, b.

    "addmm": cuBLAS accumulates straight into the fp32 tensor (``out_dtype``, newer torch);
    "mm":    a fp32 product per call, then an add; "upcast": fp32 copies of a and b.
    Each candidate is checked numerically once, on tiny tensors.
    """
    if device.type != "cuda":
        return "upcast"
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(24, 40, device=device, generator=g).bfloat16()[:, 3:35].t()  # strided, like g[:, rows].t()
    b = torch.randn(24, 16, device=device, generator=g).bfloat16()
    acc0 = torch.randn(32, 16, device=device, generator=g)
    want = acc0 + a.float() @ b.float()
    for mode in ("addmm", "mm"):
        acc = acc0.clone()
        try:
            _addmm_fp32(acc, a, b, mode)
            if torch.allclose(acc, want, rtol=1e-3, atol=1e-3):
                return mode
        except Exception:  # noqa: BLE001 -- unsupported overload in this torch build
            pass
    return "upcast"


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor, mode: str | None = None) -> None:
    if mode is None:
        key = str(acc.device)
        mode = ADDMM_MODE.get(key)
        if mode is None:
            mode = ADDMM_MODE[key] = _probe_addmm_mode(acc.device)
    if mode == "addmm":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "mm":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _WeightGrad:
    """``sum over chunks of g.T @ h`` in the weight's dtype, accumulated in >= fp32."""

    def __init__(self, weight: Tensor, n_chunks: int):
        self.dtype = weight.dtype
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        self.single = n_chunks == 1  # one matmul, exactly what the unchunked backward does
        self.out = None
        self.blocks: list[Tensor | None] = []
        self.bounds: list[tuple[int, int]] = []
        if n_chunks == 0:
            self.out = torch.zeros_like(weight)
        elif self.single:
            pass
        elif acc_dtype == weight.dtype:
            self.out = torch.zeros_like(weight)
        else:
            v, h = weight.shape
            rows = max(1, ACC_BLOCK_ELEMS // max(h, 1))
            self.bounds = [(r, min(r + rows, v)) for r in range(0, v, rows)]
            self.blocks = [torch.zeros((b - a, h), dtype=acc_dtype, device=weight.device) for a, b in self.bounds]

    def add(self, g: Tensor, h: Tensor) -> None:
        if self.single:
            self.out = torch.mm(g.t(), h)
        elif not self.blocks:
            self.out.addmm_(g.t(), h)
        else:
            for (a, b), acc in zip(self.bounds, self.blocks):
                _addmm_fp32(acc, g[:, a:b].t(), h)

    def result(self) -> Tensor:
        if not self.blocks:
            return self.out
        parts = []
        for i in range(len(self.blocks)):  # free each fp32 block as soon as it is cast
            parts.append(self.blocks[i].to(self.dtype))
            self.blocks[i] = None
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ----------------------------------------------------------------------- loss steps


def _forward_kl_rows(s, t, lab, grad_out, *, alpha, denom, cdt, temperature, top_k, ignore_index):
    """CE and forward-KL sums of a few rows; writes d(objective)/d(logits) into grad_out.

    Same math as ``kd.forward_kl`` + ``kd.cross_entropy`` (see there), with the gradient in
    closed form: d KL(p_t || p_s) / d x_s = p_s - p_t for x = logits / T. Returns the raw
    sums over valid rows (CE, and KL before the T**2 / count scaling).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    v_s = s.shape[1]
    vocab = min(v_s, t.shape[1])
    valid = lab != ignore_index
    safe_lab = torch.where(valid, lab, 0).unsqueeze(1)
    shared = temperature == 1.0 and vocab == v_s  # KD's student log-softmax is CE's

    xt = t[:, :vocab].to(cdt)
    if temperature != 1.0:
        xt = xt / temperature
    if top_k is not None and top_k < vocab:
        keep = torch.zeros_like(xt, dtype=torch.bool).scatter_(-1, xt.topk(top_k, dim=-1).indices, True)
        xt = xt.masked_fill(~keep, float("-inf"))
        del keep
    logp_t = torch.log_softmax(xt, -1)
    del xt

    xs = s.to(cdt)
    xs_kd = xs[:, :vocab]
    if temperature != 1.0:
        xs_kd = xs_kd / temperature
    logp_s = torch.log_softmax(xs_kd, -1)
    del xs_kd
    logp_full = None
    if shared:
        ce_rows = logp_s.gather(1, safe_lab).squeeze(1).neg()
    else:
        logp_full = torch.log_softmax(xs, -1)
        ce_rows = logp_full.gather(1, safe_lab).squeeze(1).neg()
    del xs

    p_t = logp_t.exp()
    dead = torch.isneginf(logp_t) if top_k is not None else None
    diff = logp_t.sub_(logp_s)
    if dead is not None:  # 0 * log 0 = 0, as in kd._kl
        diff.masked_fill_(dead, 0.0)
        del dead
    kl_rows = diff.mul_(p_t).sum(-1)
    del diff, logp_t
    zero = torch.zeros((), dtype=cdt, device=s.device)
    ce_sum = torch.where(valid, ce_rows, zero).sum()
    kd_sum = torch.where(valid, kl_rows, zero).sum()
    if grad_out is None:
        return ce_sum, kd_sum

    scale = valid.to(cdt) / denom  # [rows]; zero for ignored rows
    p_s = logp_s.exp_()
    if alpha == 0.0:
        g_kd = p_s.sub_(p_t)
        if vocab < v_s:
            grad_out[:, vocab:].zero_()
        torch.mul(g_kd, (scale * temperature).unsqueeze(1), out=grad_out[:, :vocab])
        return ce_sum, kd_sum
    if shared:  # alpha (p_s - onehot) + (1 - alpha) (p_s - p_t)
        g = p_s.sub_(p_t, alpha=1.0 - alpha)
    else:
        g = logp_full.exp_().mul_(alpha)
        g[:, :vocab].add_(p_s.sub_(p_t), alpha=(1.0 - alpha) * temperature)
    del p_t
    g.scatter_add_(1, safe_lab, torch.full_like(safe_lab, -alpha, dtype=cdt))
    torch.mul(g, scale.unsqueeze(1), out=grad_out)
    return ce_sum, kd_sum


def _autograd_rows(s, t, lab, grad_out, *, kd_fn, kd_kwargs, alpha, num_valid, cdt):
    """Any registered KD loss, with autograd on fp32 copies of a few rows of logits."""
    xs = s.to(cdt, copy=True).requires_grad_(grad_out is not None)
    xt = t.to(cdt)
    with torch.enable_grad():
        kd = kd_fn(xs, xt, lab, num_valid_tokens=num_valid, **kd_kwargs)
        with torch.set_grad_enabled(grad_out is not None and alpha != 0):
            ce = cross_entropy(xs, lab, num_valid_tokens=num_valid, ignore_index=kd_kwargs["ignore_index"])
        if grad_out is not None:
            objective = (1 - alpha) * kd
            if alpha != 0:
                objective = objective + alpha * ce
            (g,) = torch.autograd.grad(objective, xs)
            grad_out.copy_(g)
    return ce.detach(), kd.detach()


# ------------------------------------------------------------------------- function


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels,
                kd_fn, kd_kwargs, alpha_ce, chunk_size, num_valid, need_grad):
        n_tokens = s_hidden.shape[0]
        device = s_hidden.device
        cdt = torch.promote_types(s_hidden.dtype, torch.float32)
        any_grad = any(need_grad)
        fast = kd_fn is _kd.forward_kl and set(kd_kwargs) == _FAST_KWARGS
        temperature = kd_kwargs["temperature"]
        denom = torch.as_tensor(num_valid, device=device).to(cdt).clamp(min=1)

        n_chunks = math.ceil(n_tokens / chunk_size)
        grad_hidden = (torch.empty(s_hidden.shape, dtype=s_hidden.dtype, device=device)
                       if need_grad[0] else None)
        grad_weight = _WeightGrad(s_weight, n_chunks) if need_grad[1] else None
        grad_bias = (torch.zeros(s_bias.shape, dtype=cdt, device=device)
                     if s_bias is not None and need_grad[2] else None)
        ce_acc = torch.zeros((), dtype=cdt, device=device)
        kd_acc = torch.zeros((), dtype=cdt, device=device)
        t_vocab = 0 if t_weight is None else t_weight.shape[0]
        rows_per_step = max(1, SUB_ELEMS // max(s_weight.shape[0], t_vocab, 1))

        # The chunk count depends on positions only, never on how many labels are valid,
        # so ranks with equal N run the same kernels (and, under ZeRO-3, the same
        # collectives around this call). All-ignored chunks still run and add 0.
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h_s = s_hidden[start:end]
            # Matmuls in the model's dtype (as its lm_head would); fp32 only row by row below.
            logits = F.linear(h_s, s_weight, s_bias)
            # No teacher weight: the teacher is given per token already (a sparse teacher's entries).
            t_logits = t_hidden[start:end] if t_weight is None else F.linear(t_hidden[start:end], t_weight, t_bias)
            for r0 in range(0, end - start, rows_per_step):
                r = slice(r0, min(r0 + rows_per_step, end - start))
                lab = labels[start + r.start:start + r.stop]
                # The gradient overwrites the logits rows just read: no extra [chunk, V].
                out = logits[r] if any_grad else None
                if fast:
                    ce, kd = _forward_kl_rows(
                        logits[r], t_logits[r], lab, out, alpha=alpha_ce, denom=denom, cdt=cdt,
                        temperature=temperature, top_k=kd_kwargs["top_k"],
                        ignore_index=kd_kwargs["ignore_index"])
                else:
                    ce, kd = _autograd_rows(logits[r], t_logits[r], lab, out, kd_fn=kd_fn, kd_kwargs=kd_kwargs,
                                            alpha=alpha_ce, num_valid=num_valid, cdt=cdt)
                ce_acc += ce
                kd_acc += kd
            del t_logits
            if any_grad:
                grad_logits = logits  # now d(objective)/d(logits), in the weight's dtype
                if grad_hidden is not None:
                    torch.mm(grad_logits, s_weight, out=grad_hidden[start:end])
                if grad_weight is not None:
                    grad_weight.add(grad_logits, h_s)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0, dtype=cdt)
                del grad_logits
            del logits

        if fast:  # raw sums -> the kd.py conventions (sum / count, KD times T**2)
            ce_total = ce_acc / denom
            kd_total = kd_acc * (temperature**2) / denom
        else:
            ce_total, kd_total = ce_acc, kd_acc
        ctx.save_for_backward(
            grad_hidden,
            None if grad_weight is None else grad_weight.result(),
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
    teacher_weight: Tensor | None,
    labels: Tensor,
    *,
    loss: str | Callable[..., Tensor] = "forward_kl",
    alpha_ce: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
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
        teacher_weight: [V_t, H_t], no grad; already gathered by the caller under ZeRO-3. None: ``teacher_hidden``
            is the teacher itself per token, sliced by rows and passed to ``loss`` as it is (a sparse teacher:
            `distill.losses.sparse_kd.chunked_sparse_kd_loss`).
        labels: [N] or [B, T], pre-shifted, ``ignore_index`` for ignored positions.
        loss: name of a registered KD loss (see ``KD_LOSSES``), or the loss function; ``loss_kwargs`` go to it.
        num_valid_tokens: the denominator of both terms. Pass the global count (all
            ranks, whole accumulated step) so micro-batch losses sum to the full-batch
            loss; default is the local valid count.
        chunk_size: tokens per chunk. Per chunk, one [chunk, V] logits tensor per model in
            the weights' dtype is alive, plus a few fp32 [rows, V] temporaries of about
            128 MiB each. With several chunks and bf16/fp16 weights the weight gradient is
            accumulated in fp32 (4 B x V x H). Larger chunks make the weight-gradient
            matmul more efficient; the default suits V ~ 128k, H 2k-4k.

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
    kd_fn = loss if callable(loss) else get_kd_loss(loss)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden if teacher_weight is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
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
        s_hidden, student_weight, student_bias, t_hidden, None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), labels,
        kd_fn, kd_kwargs, float(alpha_ce), int(chunk_size), num_valid_tokens, need_grad,
    )
    return total, {"ce": ce, "kd": kd}
