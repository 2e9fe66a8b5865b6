"""Log-probabilities of label tokens, in fp32, without a [tokens, vocab] fp32 copy of the logits."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


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
            x = logits[s:s + chunk].to(acc)  # [c, V]
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            picked[s:s + chunk] = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # [M, V]
        g = grad_out.to(lse.dtype)
        for s in range(0, logits.shape[0], ctx.chunk):
            # d/dx (x[label] - logsumexp x) = onehot(label) - softmax(x)
            gs = torch.exp(logits[s:s + ctx.chunk].to(lse.dtype) - lse[s:s + ctx.chunk, None]) * -g[s:s + ctx.chunk, None]
            gs.scatter_add_(-1, labels[s:s + ctx.chunk, None], g[s:s + ctx.chunk, None])
            grad[s:s + ctx.chunk] = gs.to(grad.dtype)
        return grad, None, None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk: int = 4096) -> torch.Tensor:
    """Sum of log p(label) over each row's predicted tokens: logits [N, T, V], labels [N, T] -> [N] (fp32; fp64 for fp64 logits).

    Math in fp32, `chunk` tokens at a time, so memory beyond the logits themselves is one
    [chunk, V] fp32 block and the gradient, in the logits' dtype."""
    mask = labels != ignore_index  # [N, T]
    flat = _LabelLogps.apply(logits.reshape(-1, logits.shape[-1]), labels.masked_fill(~mask, 0).reshape(-1), chunk)
    return (flat.view(labels.shape) * mask).sum(-1)
