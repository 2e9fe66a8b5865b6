"""Log-probabilities of label tokens, in fp32, without a [tokens, vocab] fp32 copy of the logits."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def logit_transform(model_config) -> str | None:
    """`attr=value` when a model changes its logits after the lm_head matmul (softcapping, scaling), which
    a loss computing `hidden @ lm_head.T` itself would not reproduce; None when it does not."""
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model_config, attr, None) not in (None, 1, 1.0):
            return f"{attr}={getattr(model_config, attr)}"
    return None


def _logsumexp_and_label_(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp [c], x[label] [c]) of fp32 logits x [c, V], which it overwrites: torch.logsumexp
    would allocate a second [c, V] block for exp(x - max)."""
    picked = x.gather(-1, labels[:, None]).squeeze(-1)
    top = x.amax(-1)  # [c]
    lse = x.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)
    return lse, picked


def _label_grad_(x: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g * (onehot(label) - softmax(x)), the gradient of g * log p(label), written over the fp32
    logits x [c, V] (one block instead of three temporaries)."""
    x.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    return x.scatter_add_(-1, labels[:, None], g[:, None])


class _LabelLogps(torch.autograd.Function):
    """log p(label) per row of logits [M, V] -> [M] fp32, computed `chunk` rows at a time.

    Saves the logits as they are (bf16 stays bf16) and the fp32 logsumexp [M]; backward rebuilds
    the softmax chunk by chunk. A log_softmax over the upcast logits instead keeps a [M, V] fp32
    tensor alive until backward, twice the size of bf16 logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)  # [M]
        picked = torch.empty_like(lse)  # [M]
        for s in range(0, logits.shape[0], chunk):
            # A copy, since it is overwritten; unnamed, so it is freed before the next chunk's.
            lse[s:s + chunk], picked[s:s + chunk] = _logsumexp_and_label_(logits[s:s + chunk].to(acc, copy=True),
                                                                          labels[s:s + chunk])
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # [M, V]
        g, c = grad_out.to(lse.dtype), ctx.chunk
        for s in range(0, logits.shape[0], c):
            grad[s:s + c] = _label_grad_(logits[s:s + c].to(lse.dtype, copy=True), lse[s:s + c], labels[s:s + c], g[s:s + c])
        return grad, None, None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk: int = 4096) -> torch.Tensor:
    """Sum of log p(label) over each row's predicted tokens: logits [N, T, V], labels [N, T] -> [N] (fp32; fp64 for fp64 logits).

    Math in fp32, `chunk` tokens at a time, so memory beyond the logits themselves is one
    [chunk, V] fp32 block and the gradient, in the logits' dtype."""
    mask = labels != ignore_index  # [N, T]
    flat = _LabelLogps.apply(logits.reshape(-1, logits.shape[-1]), labels.masked_fill(~mask, 0).reshape(-1), chunk)
    return (flat.view(labels.shape) * mask).sum(-1)


class _HeadLogps(torch.autograd.Function):
    """log p(label) of hidden states [M, H] through an lm_head weight [V, H] -> [M], `chunk` rows at a time.

    The logits of a chunk are one matmul in the weight's dtype (as the model's lm_head computes
    them), then fp32; backward recomputes them. Saves the hidden rows, the fp32 logsumexp and a
    reference to the weight: never a [M, V] tensor.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        acc = torch.promote_types(weight.dtype, torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)  # [M]
        out = torch.empty_like(lse)  # [M]
        for s in range(0, hidden.shape[0], chunk):
            # [c, V] logits, a new tensor either way; unnamed, so freed before the next chunk's
            lse[s:s + chunk], out[s:s + chunk] = _logsumexp_and_label_((hidden[s:s + chunk] @ weight.T).to(acc),
                                                                       labels[s:s + chunk])
        out -= lse
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        c, g = ctx.chunk, grad_out.to(lse.dtype)
        grad_h = torch.empty_like(hidden)  # [M, H]
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], c):
            x = (hidden[s:s + c] @ weight.T).to(lse.dtype)  # [c, V]
            gl = _label_grad_(x, lse[s:s + c], labels[s:s + c], g[s:s + c]).to(weight.dtype)
            del x  # before the matmuls below allocate
            grad_h[s:s + c] = gl @ weight
            if grad_w is not None:
                grad_w += gl.T @ hidden[s:s + c]  # [V, H] in the weight's dtype, accumulated in fp32
            del gl  # before the next chunk's logits
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


TRAINABLE_BLOCK_BYTES = 128 * 2**20
"""The fp32 [chunk, V] block of a head whose log-probs get gradients: 1048 rows at V 32000."""
FROZEN_BLOCK_BYTES = 32 * 2**20
"""The same without gradients: a frozen role's forward runs beside the trainable role's (train.overlap_frozen),
so its block adds to the trainable role's activations; smaller chunks cost only a few kernel launches there."""


def head_chunk_rows(vocab: int, grad: bool) -> int:
    """Rows per head matmul, so that the fp32 [rows, vocab] block stays within its budget."""
    return max(1, (TRAINABLE_BLOCK_BYTES if grad else FROZEN_BLOCK_BYTES) // (4 * vocab))


def head_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """`sequence_logps` from final hidden states [N, T, H] and the lm_head weight [V, H] -> [N].

    Only the predicted tokens go through the head, `chunk` at a time (default `head_chunk_rows`),
    so neither the [N, T, V] logits nor their gradient ever exist. The head must be a plain linear
    map without bias, softcapping or scaling (checked by the trainer from the model config)."""
    if chunk is None:
        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        chunk = head_chunk_rows(weight.shape[0], grad)
    mask = labels != ignore_index  # [N, T]
    rows = mask.nonzero()[:, 0]  # [M]: the row of each predicted token
    tokens = _HeadLogps.apply(hidden[mask], weight, labels[mask], chunk)  # [M]
    return torch.zeros(labels.shape[0], dtype=tokens.dtype, device=tokens.device).index_add(0, rows, tokens)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                chunk: int = 4096) -> torch.Tensor:
    """log p(label) of each predicted token: logits [N, T, V], labels [N, T] -> [N, T] (fp32), 0 where ignored.

    The per-token form of `sequence_logps` (same memory: one [chunk, V] fp32 block beyond the logits)."""
    mask = labels != ignore_index  # [N, T]
    flat = _LabelLogps.apply(logits.reshape(-1, logits.shape[-1]), labels.masked_fill(~mask, 0).reshape(-1), chunk)
    return flat.view(labels.shape) * mask


@torch.no_grad()
def token_entropy(logits: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Entropy of each position's distribution, for logging: logits [N, T, V] -> [N, T] (fp32, no gradient),
    `chunk` rows at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for s in range(0, flat.shape[0], chunk):
        x = flat[s:s + chunk].to(out.dtype)  # [c, V]
        logp = x.log_softmax(-1)
        p = logp.exp()
        out[s:s + chunk] = -torch.where(p > 0, p * logp, 0).sum(-1)  # 0 * log 0 = 0 for masked-out logits
    return out.view(logits.shape[:-1])
