"""Prompts, with or without reference completions: the data of on-policy distillation.

Two record formats, detected per dataset from its columns:

* plain text: ``{"prompt": str, "completion": str}`` (``completion`` optional);
* chat: ``{"messages": [{"role", "content"}, ...]}``. When the last message is the assistant's,
  it is the completion and the messages before it are the prompt; otherwise every message is
  prompt. The prompt is rendered with ``add_generation_prompt=True``.

On-policy runs generate their own completions; a dataset completion is used when a step does
not generate (``kd.on_policy.lmbda < 1``) and by offline distillation on the same data, where only
completion tokens are predicted.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from distill.data.loading import DataBundle, collator_padding, pad_id, tokenized_splits
from distill.data.synthetic import SyntheticLanguage, cut_documents, existing_meta, write_splits, writer_cli
from distill.data.text import CausalCollator, load_dataset_source

_FORMAT_VERSION = 1
_HINT = "To create synthetic prompts locally, run: python -m distill.data.prompts DIR"


def is_prompt_dataset(columns: list[str]) -> bool:
    return "prompt" in columns or "messages" in columns


def load_prompt_dataset(source: str, *, split: str | None = "train", config: str | None = None,
                        revision: str | None = None) -> Any:
    """A ``datasets.Dataset`` of prompts (see the module docstring), each record checked; the source and
    ``split`` as :func:`~distill.data.text.load_dataset_source` reads them."""
    ds = load_dataset_source(source, split=split, hint=_HINT, config=config, revision=revision)
    cols = ds.column_names
    if not is_prompt_dataset(cols):
        raise ValueError(f"{source}: prompt records need a 'prompt' (and optional 'completion') or a 'messages' "
                         f"field; columns found: {cols}")
    for i, row in enumerate(ds):
        if "messages" in cols:
            msgs = row["messages"]
            if not msgs or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
                _bad(source, i, "messages", "must be a non-empty list of {'role', 'content'} messages")
        else:
            if not isinstance(row["prompt"], str):
                _bad(source, i, "prompt", f"must be a string, got {row['prompt']!r}")
            if row.get("completion") is not None and not isinstance(row["completion"], str):
                _bad(source, i, "completion", f"must be a string, got {row['completion']!r}")
    return ds


def _bad(source: str, i: int, field: str, problem: str) -> None:
    raise ValueError(f"{source}: record {i}: field {field!r} {problem}; fix or remove that record")


def tokenize_prompts(ds: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int) -> tuple[Any, dict[str, int]]:
    """Records -> ``prompt_ids`` and ``completion_ids`` (lists of int; the latter may be empty).

    The prompt starts with ``bos`` when the tokenizer adds one and keeps its LAST
    ``max_prompt_length`` tokens; a completion ends with ``eos`` and keeps its FIRST
    ``max_length - len(prompt)`` tokens. Returns ``(dataset, stats)`` with counts ``n``,
    ``prompt_truncated``, ``completion_truncated`` and ``with_completion``.
    """
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token so completions can end")
    first = [tokenizer("a", add_special_tokens=s)["input_ids"][:1] for s in (True, False)]
    adds_bos = bos is not None and first[0] == [bos] and first[1] != [bos]
    chat = "messages" in ds.column_names
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat-format prompts need a tokenizer with a chat_template; set tokenizer.chat_template "
                         "or convert the records to plain {'prompt', 'completion'} strings")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(row: dict[str, Any], i: int) -> dict[str, Any]:
        if chat:
            msgs = row["messages"]
            prompt_msgs, answer = (msgs[:-1], msgs[-1:]) if msgs[-1]["role"] == "assistant" else (msgs, [])
            prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
            completion = None
            if answer:
                full = tokenizer.apply_chat_template(msgs, tokenize=False)
                if not full.startswith(prompt):
                    raise ValueError(f"record {i}: the chat template does not render the prompt as a prefix of "
                                     "the whole conversation; use a template that does, or plain-text records")
                completion = full[len(prompt):]
        else:
            prompt, completion = row["prompt"], row.get("completion")
        p = ids(prompt)
        if adds_bos and p[:1] != [bos]:
            p = [bos] + p
        if not p:
            raise ValueError(f"record {i}: empty prompt and the tokenizer adds no bos; give a non-empty prompt")
        prompt_cut = len(p) > max_prompt_length
        if prompt_cut:
            keep_bos = adds_bos and max_prompt_length > 1
            p = [bos] * keep_bos + p[len(p) - max_prompt_length + keep_bos:]
        c = []
        if completion:
            c = ids(completion)
            c = c if c[-1:] == [eos] else c + [eos]
        budget = max_length - len(p)
        return {"prompt_ids": p, "completion_ids": c[:budget], "_prompt_cut": prompt_cut,
                "_completion_cut": len(c) > budget}

    out = ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenize prompts")
    stats = {"n": len(out), "prompt_truncated": sum(out["_prompt_cut"]),
             "completion_truncated": sum(out["_completion_cut"]),
             "with_completion": sum(1 for c in out["completion_ids"] if c)}
    return out.remove_columns(["_prompt_cut", "_completion_cut"]), stats


class PromptCollator:
    """Prompt records -> a batch for generation and for scoring the dataset completion.

    Output: ``prompt_ids`` [B, P] and ``prompt_mask`` [B, P], LEFT-padded (generation appends on
    the right); ``input_ids``, ``attention_mask`` [B, T] = prompt + completion, right-padded, and
    ``labels`` [B, T] shifted as in :class:`~distill.data.text.CausalCollator`, predicting
    completion tokens only; ``real`` [B] bool, False for rows that only even out the ranks.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = 8, max_length: int | None = None) -> None:
        self.pad = int(pad_token_id)
        self.padding = {"pad_to_multiple_of": pad_to_multiple_of, "max_length": max_length}
        self._causal = CausalCollator(pad_token_id, **self.padding)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(ex["prompt_ids"]) for ex in examples]
        width = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)  # [B, P]
        prompt_mask = torch.zeros_like(prompt_ids)  # [B, P]
        for b, p in enumerate(prompts):
            prompt_ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            prompt_mask[b, width - len(p):] = 1
        real = [ex.get("real", True) for ex in examples]
        batch = self._causal([{"input_ids": p + (list(ex["completion_ids"]) if r else []), "prompt_length": len(p)}
                              for p, ex, r in zip(prompts, examples, real)])
        return {**batch, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                "real": torch.tensor(real, dtype=torch.bool)}


def with_completions(batch: dict[str, torch.Tensor], completions: torch.Tensor, *, eos_id: int, pad_id: int,
                     pad_to_multiple_of: int | None = 8, max_length: int | None = None,
                     lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The batch re-built around generated completions, to be scored like dataset completions.

    ``completions`` [B, N] are the tokens generated after ``batch["prompt_ids"]``; each is cut
    after its first ``eos`` (what follows is the generator's padding), or after ``lengths`` [B]
    tokens when given (the generator's count, which knows every eos id). Returns the batch with
    ``input_ids``, ``attention_mask``, ``labels`` [B, T'] replaced: prompt + completion,
    right-padded, predicting the completion tokens (eos included) of real rows only.
    """
    rows = []
    done = completions == eos_id  # [B, N]
    cut = lengths.tolist() if lengths is not None else None
    for b in range(completions.shape[0]):
        prompt = batch["prompt_ids"][b][batch["prompt_mask"][b].bool()].tolist()
        if cut is not None:
            n = cut[b]
        else:
            hit = done[b].nonzero()
            n = int(hit[0]) + 1 if len(hit) else completions.shape[1]
        seq = prompt + completions[b, :n].tolist()
        rows.append({"input_ids": seq, "prompt_length": len(prompt) if bool(batch["real"][b]) else len(seq)})
    device = completions.device
    rebuilt = CausalCollator(pad_id, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length)(rows)
    return {**batch, **{k: v.to(device) for k, v in rebuilt.items()}}


def build_prompt_data(recipe, tokenizer, rank: int, world_size: int, *, max_prompt_length: int, compiled: bool = False,
                      log=print) -> tuple[DataBundle, dict[str, dict[str, int]]]:
    """Prompt records of `data.train` / `data.eval` as per-rank batches of left-padded prompts and their
    completions, and each split's tokenisation counts (`n`, `with_completion`, truncations)."""
    d = recipe.data
    splits, counts = {"eval": None}, {}
    for key, ds, stats in tokenized_splits(d, lambda src, opts: tokenize_prompts(
            load_prompt_dataset(src, **opts), tokenizer, max_length=d.max_length, max_prompt_length=max_prompt_length)):
        splits[key], counts[key] = ds, stats
        if rank == 0 and (stats["prompt_truncated"] or stats["completion_truncated"]):
            log(f"data.{key}: of {stats['n']} prompts, {stats['prompt_truncated']} left-truncated to "
                f"{max_prompt_length} tokens, {stats['completion_truncated']} completions cut at data.max_length")
    pad = pad_id(tokenizer)
    collator = PromptCollator(pad, **collator_padding(d.max_length, compiled))
    bundle = DataBundle(splits["train"], splits["eval"], collator, recipe.train.micro_batch_size, rank, world_size,
                        recipe.seed, pad, grad_accum=recipe.train.grad_accum,
                        pad_example={"prompt_ids": [pad], "completion_ids": [], "real": False})
    return bundle, counts


def write_prompt_dataset(out_dir: str | os.PathLike[str], *, seed: int = 0, n_train: int = 2000, n_eval: int = 200,
                         prompt_words: tuple[int, int] = (2, 6)) -> dict[str, Any]:
    """Write synthetic ``{"prompt", "completion"}`` records, ``tokenizer/`` and ``meta.json``.

    Each record is a document of :class:`~distill.data.synthetic.SyntheticLanguage` ``seed`` (1 to
    3 sentences) cut after its first ``k`` words (``k`` uniform on ``prompt_words``): the prompt is
    the start, the completion the rest, so completions end where documents do and their lengths
    vary from a few words to dozens. Deterministic per seed and idempotent.
    """
    lo, hi = prompt_words
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= prompt_words[0] <= prompt_words[1], got {prompt_words}")
    out = Path(out_dir)
    config = {"format_version": _FORMAT_VERSION, "kind": "prompts", "seed": seed, "n_train": n_train,
              "n_eval": n_eval, "prompt_words": [lo, hi]}
    old = existing_meta(out, config)
    if old is not None:
        return old
    out.mkdir(parents=True, exist_ok=True)
    lang = SyntheticLanguage(seed)
    splits = {name: cut_documents(lang, random.Random(f"prompts-{seed}-{name}"), n, (lo, hi),
                                  sentences=lambda rng: rng.randint(1, 3),
                                  record=lambda prompt, rest: {"prompt": prompt, "completion": rest})
              for name, n in (("train", n_train), ("eval", n_eval))}
    return write_splits(out, splits, lang, config)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m distill.data.prompts OUT_DIR [--seed S] [--n-train N] [--n-eval N]``."""
    writer_cli("Write synthetic prompts with reference completions.", lambda a: write_prompt_dataset(a.out_dir, seed=a.seed, n_train=a.n_train, n_eval=a.n_eval), argv)


if __name__ == "__main__":
    main()
