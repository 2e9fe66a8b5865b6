"""Sequence packing: whole tokenized documents side by side in rows of `data.max_length` tokens.

A packed row holds several documents, each with `position_ids` that restart at 0, and labels that
never cross from one document into the next. transformers (5.x, `masking_utils.create_causal_mask`)
turns such position_ids into a block-diagonal causal mask, so no document attends to another, but
only when the model is called with `position_ids`, WITHOUT an attention mask and without a KV cache
(`use_cache=False`; a cache is created by default and switches the detection off). `model_inputs`
builds exactly that call, so every loss on a packed batch equals the loss of its documents run one
per row.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch


PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations whose mask transformers builds from packed position_ids. The flash
attention kernels read them only for a batch of one row, so they would mix documents."""


def pack_documents(docs: Iterable[Sequence[int]], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy next-fit packing, in the order given: `(rows, position_ids)`, each row at most `max_length` long.

    A document longer than `max_length` is truncated (as unpacked); one that does not fit in the room
    left in the current row starts the next row, so no document is ever split. Empty documents are dropped.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to leave a target, got {max_length}")
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    row: list[int] = []
    pos: list[int] = []
    for doc in docs:
        doc = list(doc)[:max_length]
        if not doc:
            continue
        if len(row) + len(doc) > max_length:
            rows.append(row)
            positions.append(pos)
            row, pos = [], []
        row += doc
        pos += range(len(doc))
    if row:
        rows.append(row)
        positions.append(pos)
    return rows, positions


def pack_dataset(ds: Any, max_length: int) -> tuple[Any, dict[str, int]]:
    """A tokenized `datasets.Dataset` (column `input_ids`) packed into one with `input_ids` and `position_ids`.

    Returns `(packed, stats)` with stats `{"documents", "rows", "tokens"}`.
    """
    import datasets

    rows, positions = pack_documents(ds["input_ids"], max_length)
    stats = {"documents": len(ds), "rows": len(rows), "tokens": sum(len(r) for r in rows)}
    return datasets.Dataset.from_dict({"input_ids": rows, "position_ids": positions}), stats


def padding_fraction(lengths: Sequence[int], width: int) -> float:
    """The share of `len(lengths)` rows of `width` slots that is padding."""
    return 1.0 - sum(lengths) / max(1, len(lengths) * width)


class PackedCollator:
    """Packed rows -> batches of exactly `length` tokens with ALREADY-SHIFTED labels (see distill/data/text.py).

    Output (all ``torch.long``, [B, length]):

    * ``input_ids``: the row, right-padded with ``pad_token_id``;
    * ``attention_mask``: 1 on the documents' tokens, 0 on the padding tail; for counting only, it is
      not passed to the model (see `model_inputs`);
    * ``position_ids``: restart at 0 at every document; the padding tail is a segment of its own;
    * ``labels``: the next token of the same document, ``ignore_index`` at every document's last token
      and on the padding tail.

    An example is a dict with ``input_ids`` and ``position_ids``; a one-token example predicts nothing.
    """

    def __init__(self, pad_token_id: int | None, length: int, *, ignore_index: int = -100) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
        self.pad_token_id, self.length, self.ignore_index = int(pad_token_id), length, ignore_index

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        batch, width = len(examples), self.length
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
        position_ids = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
        labels = torch.full((batch, width), self.ignore_index, dtype=torch.long)  # [B, T]
        for b, ex in enumerate(examples):
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)  # [n]
            pos = torch.as_tensor(ex["position_ids"], dtype=torch.long)  # [n]
            n = ids.numel()
            if n > width or pos.numel() != n:
                raise ValueError(f"example {b}: {n} tokens and {pos.numel()} positions for rows of {width}")
            input_ids[b, :n], attention_mask[b, :n], position_ids[b, :n] = ids, 1, pos
            position_ids[b, n:] = torch.arange(width - n)
            # Token t+1 continues token t's document exactly where its position is not 0.
            same_doc = pos[1:] != 0  # [n-1]
            labels[b, : n - 1] = torch.where(same_doc, ids[1:], torch.full_like(ids[1:], self.ignore_index))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of a causal LM's forward for a text batch, packed or not.

    Packed (the batch has `position_ids`): position_ids, no attention mask, no cache, which is what
    makes transformers isolate the documents; otherwise input_ids and the padding mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
