"""How one token is drawn: the logits processed as transformers' `generate()` processes them, then one draw per row.

Shared by every decode loop (distill/generation/decode.py, distill/generation/generate.py); no host sync, so it runs inside a CUDA graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """How completions are sampled."""

    max_new_tokens: int
    temperature: float = 1.0
    """0: greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k."""
    min_new_tokens: int = 0
    """eos cannot be sampled before this many tokens."""
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def generate_kwargs(self) -> dict:
        """The same settings for transformers' `generate()`."""
        sampled = self.temperature > 0
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=sampled, pad_token_id=self.pad_token_id,
                  eos_token_id=list(self.eos_token_ids) or None, min_new_tokens=self.min_new_tokens or None, use_cache=True)
        if sampled:  # top_k=0: the whole distribution, not generate()'s default top 50
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


@dataclass
class Completions:
    tokens: torch.Tensor
    """[R, N] long: generated tokens, pad after each row's first eos; N is the longest row."""
    lengths: torch.Tensor
    """[R] long: tokens of each row up to and including its first eos; N' <= max_new_tokens without one."""


def processed_logits(logits: torch.Tensor, spec: SamplingSpec, eos: torch.Tensor, ban_eos) -> torch.Tensor:
    """[R, V] raw logits -> [R, V] fp32 logits a draw is taken from: -inf outside the support. As `generate()`:
    eos banned while `ban_eos` (min_new_tokens), then temperature, top-k (ties at the k-th value kept),
    top-p (the smallest set of tokens whose probability reaches top_p, at least one). Graph-safe."""
    x = logits.float()
    if spec.min_new_tokens and eos.numel():
        x[:, eos] = torch.where(torch.as_tensor(ban_eos, device=x.device), float("-inf"), x[:, eos])
    if spec.temperature == 0:
        return x
    x = x / spec.temperature
    if spec.top_k:
        kth = torch.topk(x, min(spec.top_k, x.shape[-1])).values[:, -1:]  # [R, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if spec.top_p < 1:
        ordered, order = torch.sort(x, descending=False)  # [R, V]
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - spec.top_p
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return x


def sample_next(logits: torch.Tensor, spec: SamplingSpec, eos: torch.Tensor, ban_eos=False) -> torch.Tensor:
    """One token per row [R] from logits [R, V]: argmax when greedy, else a draw from softmax(processed_logits).

    The draw is argmax(p / E) with E ~ Exp(1) per token (the exponential race: P(i) = p_i / sum p), which
    needs no read-back and so runs inside a CUDA graph."""
    x = processed_logits(logits, spec, eos, ban_eos)
    if spec.temperature == 0:
        return x.argmax(-1)
    probs = x.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def completion_lengths(tokens: torch.Tensor, eos_token_ids) -> torch.Tensor:
    """[R] tokens up to and including each row's first eos ([R, N] -> N where there is none)."""
    hit = torch.isin(tokens, torch.as_tensor(list(eos_token_ids), dtype=tokens.dtype, device=tokens.device))
    first = torch.where(hit, torch.arange(tokens.shape[1], device=tokens.device), tokens.shape[1]).amin(1)
    return torch.where(first < tokens.shape[1], first + 1, tokens.shape[1]) if tokens.shape[1] else first


# -- the models -----------------------------------------------------------------------------------
