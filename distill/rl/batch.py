"""The pieces of a GRPO generation batch that need no model: masks, widths, splits, repeated data.

A generation batch is laid out as TRL lays it out: prompts left-padded [B, P] next to completions
right-padded [B, C], so every completion token sits in the columns P..P+C-1 of `input_ids` and a
forward with `logits_to_keep=C + 1` returns the logits that predict exactly those tokens.
"""
from __future__ import annotations

from typing import Iterator

import torch


def completion_masks(completions: torch.Tensor, *, eos_id: int, mask_truncated: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """completions [B, N] as generated (padding after a row's eos) -> (attention [B, N], loss [B, N], truncated [B]).

    A completion runs up to and including its first eos; one without an eos was cut by the length limit
    (`truncated`). `attention` is 1 on a completion's tokens; `loss` is the same, with truncated
    completions' rows zeroed when `mask_truncated` (TRL's `mask_truncated_completions`)."""
    ended = completions == eos_id  # [B, N]
    truncated = ~ended.any(-1)  # [B]
    first = torch.where(truncated, completions.shape[1], ended.int().argmax(-1))  # [B]: index of the eos
    attention = (torch.arange(completions.shape[1], device=completions.device)[None, :] <= first[:, None]).long()
    loss = attention * (~truncated).long()[:, None] if mask_truncated else attention
    return attention, loss, truncated


def padded_width(prompt_width: int, completion_width: int, padding: dict) -> int:
    """The completion width that makes prompt + completion a multiple of `padding["pad_to_multiple_of"]`, never
    past `padding["max_length"]` unless the tokens themselves are longer (the collators' rule: few batch shapes
    for compiled layers, multiples of 8 otherwise)."""
    total, multiple = prompt_width + completion_width, padding.get("pad_to_multiple_of") or 1
    target = -(-total // multiple) * multiple
    cap = max(padding.get("max_length") or target, total)
    return min(target, cap) - prompt_width


def pad_columns(x: torch.Tensor, width: int, value: int | float) -> torch.Tensor:
    """x [B, N] right-padded with `value` to [B, width] (width >= N)."""
    if width == x.shape[1]:
        return x
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), value)], dim=1)


def split_rows(batch: dict, parts: int) -> list[dict]:
    """A dict of tensors (and lists) with B rows -> `parts` dicts of B / parts consecutive rows each."""
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)
    size = n // parts
    return [{k: v[i * size:(i + 1) * size] if (torch.is_tensor(v) and v.dim() > 0) or isinstance(v, list) else v
             for k, v in batch.items()} for i in range(parts)]


class RepeatedData:
    """A `DataBundle` whose every training batch comes `repeat` times in a row (`grpo.num_iterations`): the
    steps that reuse a generation batch consume no new prompts, and a resumed run finds its place."""

    def __init__(self, inner, repeat: int):
        self.inner, self.repeat = inner, repeat

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def steps_per_epoch(self) -> int:
        return self.inner.steps_per_epoch * self.repeat

    def check(self) -> None:
        self.inner.check()

    def train_batches(self, *, start_step: int = 0) -> Iterator[list[dict]]:
        first, done = divmod(start_step, self.repeat)
        for i, batch in enumerate(self.inner.train_batches(start_step=first)):
            for _ in range(self.repeat - (done if i == 0 else 0)):
                yield batch
