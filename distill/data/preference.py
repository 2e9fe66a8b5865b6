"""Preference pairs (prompt, chosen, rejected): loading, tokenising, collating, synthetic data.

Two record formats, detected per dataset from the type of the ``chosen`` column:

* plain text: ``{"prompt": str, "chosen": str, "rejected": str}`` (responses without the prompt);
* chat: ``{"chosen": [{"role", "content"}, ...], "rejected": [...]}``. Without a ``"prompt"``
  the prompt is every message but the last, which both sides must share, and the response
  is the last (assistant) message. With ``"prompt": [messages]`` the responses are the
  messages after it. :func:`load_preference_dataset` rewrites chat records to that form.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import torch

from distill.data.loading import DataBundle, collator_padding, pad_id, tokenized_splits
from distill.data.synthetic import SyntheticLanguage, existing_meta, write_splits, writer_cli
from distill.data.text import CausalCollator, load_dataset_source

FIELDS = ("prompt", "chosen", "rejected")
_FORMAT_VERSION = 1
_HINT = "To create synthetic preference pairs locally, run: python -m distill.data.preference DIR"


def load_preference_dataset(source: str, *, split: str | None = "train", data_files=None, config: str | None = None,
                            revision: str | None = None) -> Any:
    """Load and validate preference pairs as a ``datasets.Dataset``.

    ``source`` and ``split`` are resolved like :func:`distill.data.text.load_dataset_source` (a local
    ``.jsonl``/``.parquet`` file, a directory with ``{split}*.{ext}`` files, a ``save_to_disk`` directory,
    or a hub id with ``config`` and ``revision``).
    Chat records come back with an explicit ``prompt`` column. Raises
    ``FileNotFoundError`` for a missing path, and ``ValueError`` for an empty dataset or a
    record with a missing field or an empty response (naming the record and field).
    """
    ds = load_dataset_source(source, split=split, data_files=data_files, hint=_HINT, config=config, revision=revision)
    return _normalize(ds, source)


def _is_chat(ds: Any) -> bool:
    return getattr(ds.features["chosen"], "dtype", None) not in ("string", "large_string")


def _normalize(ds: Any, source: str = "dataset") -> Any:
    """Validate every record; give chat records an explicit prompt (idempotent)."""
    needed = ("chosen", "rejected") if "chosen" in ds.column_names and _is_chat(ds) else FIELDS
    for field in needed:
        if field not in ds.column_names:
            raise ValueError(f"{source}: record 0 has no field {field!r}; preference records need "
                             f"{needed} (columns found: {ds.column_names})")
    if not _is_chat(ds):
        for i, row in enumerate(zip(*(ds[f] for f in FIELDS))):
            for field, value in zip(FIELDS, row):
                if not isinstance(value, str):
                    _bad(source, i, field, "is missing" if value is None else f"must be a string, got {value!r}")
                if field != "prompt" and not value.strip():
                    _bad(source, i, field, "is empty")
        return ds

    def split_chat(row: dict[str, Any], i: int) -> dict[str, Any]:
        for field in FIELDS:
            msgs = row.get(field)
            if msgs is None and field != "prompt":
                _bad(source, i, field, "is missing")
            if msgs is not None and not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
                _bad(source, i, field, "must be a list of {'role', 'content'} messages")
        chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
        if prompt is None:
            if chosen[:-1] != rejected[:-1]:
                _bad(source, i, "rejected", "differs from 'chosen' before the last message; give the shared "
                     "messages as an explicit 'prompt' and only the responses in chosen/rejected")
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        elif prompt:
            chosen = chosen[len(prompt):] if chosen[:len(prompt)] == prompt else chosen
            rejected = rejected[len(prompt):] if rejected[:len(prompt)] == prompt else rejected
        for field, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or msgs[-1]["role"] != "assistant":
                _bad(source, i, field, "must end with an assistant message (the response)")
            if not str(msgs[-1]["content"] or "").strip():
                _bad(source, i, field, "is empty (its last assistant message has no content)")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return ds.map(split_chat, with_indices=True, desc="check preference pairs")


def _bad(source: str, i: int, field: str, problem: str) -> None:
    raise ValueError(f"{source}: record {i}: field {field!r} {problem}; fix or remove that record")


def tokenize_preferences(
    ds: Any, tokenizer: Any, *, max_length: int, max_prompt_length: int | None = None,
    num_proc: int | None = None, keep: tuple[str, ...] = (),
) -> tuple[Any, dict[str, int]]:
    """Tokenise pairs into ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` (lists of int).

    ``prompt_ids`` start with ``bos`` when the tokenizer adds one; each response ends
    with ``eos`` (appended unless already there). Prompt and response are tokenised
    separately, so with BPE tokenizers the response text should carry its own leading
    space. Chat records are rendered with ``tokenizer.apply_chat_template``: the prompt
    with ``add_generation_prompt=True``, the response as the rest of the full rendering.

    Truncation, so that ``len(prompt) + len(response) <= max_length`` on both sides:
    1. a prompt longer than ``max_prompt_length`` (default ``max_length // 2``) keeps its
       LAST ``max_prompt_length`` tokens, with a leading ``bos`` kept in front;
    2. each response keeps its FIRST ``max_length - len(prompt)`` tokens (losing its eos);
    3. a pair left with an empty response (only if ``max_prompt_length == max_length``)
       is dropped.
    All original columns but those named in ``keep`` are dropped. Returns ``(dataset, stats)``; stats counts pairs:
    ``n`` (kept), ``prompt_truncated`` and ``response_truncated`` (chosen or rejected
    cut) among the kept ones, ``dropped``, and ``max_tokens`` (longest untruncated
    prompt + response).
    """
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_length < 2 or not 1 <= max_prompt_length <= max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= max_prompt_length <= max_length, got "
                         f"max_length={max_length}, max_prompt_length={max_prompt_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token so responses can end")
    # Probing beats trusting bos_token_id: GPT-2 has one but never adds it.
    first = [tokenizer("a", add_special_tokens=s)["input_ids"][:1] for s in (True, False)]
    adds_bos = bos is not None and first[0] == [bos] and first[1] != [bos]
    ds = _normalize(ds)
    chat = _is_chat(ds)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat-format preference data needs a tokenizer with a chat_template; set "
                         "tokenizer.chat_template (a Jinja string) or convert the records to plain "
                         "{'prompt', 'chosen', 'rejected'} strings")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(row: dict[str, Any], i: int) -> dict[str, Any]:
        if chat:
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            full = [tokenizer.apply_chat_template(row["prompt"] + row[f], tokenize=False) for f in FIELDS[1:]]
            if not all(text.startswith(prompt) for text in full):
                raise ValueError(f"record {i}: the chat template does not render the prompt (with "
                                 "add_generation_prompt=True) as a prefix of the whole conversation; "
                                 "use a template that does, or plain-text records")
            responses = [text[len(prompt):] for text in full]
        else:
            prompt, responses = row["prompt"], [row["chosen"], row["rejected"]]
        p = ids(prompt)
        if adds_bos and p[:1] != [bos]:
            p = [bos] + p
        if not p:
            raise ValueError(f"record {i}: empty prompt and the tokenizer adds no bos, so the first "
                             "response token would have no context; give a non-empty prompt")
        c, r = (x if x[-1:] == [eos] else x + [eos] for x in map(ids, responses))
        longest = len(p) + max(len(c), len(r))
        prompt_cut = len(p) > max_prompt_length
        if prompt_cut:
            keep_bos = adds_bos and max_prompt_length > 1
            p = [bos] * keep_bos + p[len(p) - max_prompt_length + keep_bos:]
        budget = max_length - len(p)
        return {"prompt_ids": p, "chosen_ids": c[:budget], "rejected_ids": r[:budget],
                "_prompt_cut": prompt_cut and budget > 0, "_response_cut": 0 < budget < max(len(c), len(r)),
                "_drop": budget <= 0, "_longest": longest}

    missing = [c for c in keep if c not in ds.column_names]
    if missing:
        raise ValueError(f"no column {missing[0]!r} in the preference records (columns: {ds.column_names})")
    out = ds.map(encode, with_indices=True, num_proc=num_proc, desc="tokenize preference pairs",
                 remove_columns=[c for c in ds.column_names if c not in keep])
    # Counted after map so it stays correct with num_proc workers.
    drop = list(out["_drop"])
    stats = {"n": len(drop) - sum(drop), "prompt_truncated": sum(out["_prompt_cut"]),
             "response_truncated": sum(out["_response_cut"]), "dropped": sum(drop),
             "max_tokens": max(out["_longest"], default=0)}
    if stats["dropped"]:
        out = out.filter(lambda d: not d, input_columns="_drop")
    return out.remove_columns(["_prompt_cut", "_response_cut", "_drop", "_longest"]), stats


class PreferenceCollator:
    """Pairs -> one batch of ``2B`` sequences, so a single forward scores both sides.

    Output (``torch.long``): ``input_ids`` [2B, T] with rows ``0..B-1`` = prompt + chosen
    and rows ``B..2B-1`` = prompt + rejected, right-padded; ``attention_mask`` [2B, T];
    ``labels`` [2B, T] ALREADY SHIFTED like :class:`~distill.data.text.CausalCollator`:
    ``labels[r, t] = input_ids[r, t + 1]`` where ``t + 1`` is a response token, else
    ``ignore_index`` (prompt, padding, last position). Pairs: ``input_ids.shape[0] // 2``.
    """

    def __init__(self, pad_token_id: int | None, *, pad_to_multiple_of: int | None = None,
                 max_length: int | None = None, ignore_index: int = -100) -> None:
        self._causal = CausalCollator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of, max_length=max_length,
                                      ignore_index=ignore_index)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        as_list = CausalCollator.as_list
        return self._causal([{"input_ids": as_list(ex["prompt_ids"]) + as_list(ex[side]),
                              "prompt_length": len(ex["prompt_ids"])}
                             for side in ("chosen_ids", "rejected_ids") for ex in examples])


class IndexedCollator:
    """The preference collator, plus each pair's index (for cached reference log-probs) and the `columns` of
    the records as float tensors [B]."""

    def __init__(self, inner, columns: tuple[str, ...] = ()):
        self.inner, self.columns = inner, columns

    def __call__(self, examples):
        return {**self.inner(examples), "index": torch.tensor([ex["index"] for ex in examples]),
                **{c: torch.tensor([float(ex[c]) for ex in examples]) for c in self.columns}}


def build_preference_data(recipe, tokenizer, rank: int, world_size: int, *, max_prompt_length: int | None,
                          compiled: bool = False, log=print, columns: tuple[str, ...] = ()) -> DataBundle:
    """Preference pairs of `data.train` / `data.eval` as per-rank batches: chosen rows then rejected rows, each
    pair with an `index` unique over both splits (one table of cached reference log-probs serves both), and
    the numeric `columns` of the records (e.g. a margin), each a float tensor [B] under its own name."""
    d = recipe.data
    splits = {"eval": None}
    for key, ds, stats in tokenized_splits(d, lambda src, opts: tokenize_preferences(
            _numeric(load_preference_dataset(src, **opts), columns, src), tokenizer, max_length=d.max_length,
            max_prompt_length=max_prompt_length, keep=columns)):
        if rank == 0 and any(stats.get(k) for k in ("prompt_truncated", "response_truncated", "dropped")):
            log(f"data.{key}: of {stats['n']} pairs, {stats.get('prompt_truncated', 0)} prompts left-truncated, "
                f"{stats.get('response_truncated', 0)} responses cut at data.max_length={d.max_length}, "
                f"{stats.get('dropped', 0)} dropped (no response left)")
        offset = len(splits["train"]) if key == "eval" else 0
        splits[key] = ds.add_column("index", list(range(offset, offset + len(ds))))
    pad = pad_id(tokenizer)
    collator = IndexedCollator(PreferenceCollator(pad, **collator_padding(d.max_length, compiled)), columns)
    pad_example = {"prompt_ids": [pad], "chosen_ids": [], "rejected_ids": [], "index": -1, **{c: 0.0 for c in columns}}
    return DataBundle(splits["train"], splits["eval"], collator, recipe.train.micro_batch_size, rank, world_size,
                      recipe.seed, pad, grad_accum=recipe.train.grad_accum, pad_example=pad_example)


def _numeric(ds: Any, columns: tuple[str, ...], source: str) -> Any:
    """`ds`, after refusing a missing column of `columns` or a record whose value there is not a finite number."""
    for c in columns:
        if c not in ds.column_names:
            raise ValueError(f"{source}: the records have no column {c!r} (columns: {ds.column_names})")
        for i, v in enumerate(ds[c]):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _bad(source, i, c, f"must be a finite number, got {v!r}")
    return ds


def write_preference_dataset(
    out_dir: str | os.PathLike[str], *, seed: int = 0, n_train: int = 2000, n_eval: int = 200,
    prompt_words: tuple[int, int] = (3, 8), max_response_words: int = 24, replace_prob: float = 0.5,
) -> dict[str, Any]:
    """Write synthetic plain-text pairs: ``train.jsonl``, ``eval.jsonl``, ``tokenizer/``, ``meta.json``.

    Each record comes from a document of :class:`SyntheticLanguage` ``seed`` (1 to 3
    sentences): ``prompt`` is its first ``k`` words (``k`` uniform on ``prompt_words``),
    ``chosen`` the rest of it (documents whose rest is shorter than 2 or longer than
    ``max_response_words`` words are resampled, so ``chosen`` really ends where the
    document does and its ``eos`` is correct), and ``rejected`` the same continuation
    with each word replaced, with probability ``replace_prob`` (at least one word), by a
    different uniformly drawn vocabulary word. Same word count, hence same token count;
    a replaced word is nearly always impossible under the grammar, which a small LM
    trained on the language detects easily.

    Deterministic per seed and idempotent like :func:`~distill.data.synthetic.write_dataset`.
    """
    lo, hi = prompt_words
    if not 1 <= lo <= hi or max_response_words < 2 or not 0 < replace_prob <= 1:
        raise ValueError(f"need 1 <= prompt_words[0] <= prompt_words[1], max_response_words >= 2 and "
                         f"0 < replace_prob <= 1; got {prompt_words}, {max_response_words}, {replace_prob}")
    out = Path(out_dir)
    config = {"format_version": _FORMAT_VERSION, "kind": "preference", "seed": seed, "n_train": n_train,
              "n_eval": n_eval, "prompt_words": [lo, hi], "max_response_words": max_response_words,
              "replace_prob": replace_prob}
    old = existing_meta(out, config)
    if old is not None:
        return old

    out.mkdir(parents=True, exist_ok=True)
    lang = SyntheticLanguage(seed)
    grammatical, splits = 0, {}
    for name, n in (("train", n_train), ("eval", n_eval)):
        # String seeds hash deterministically; one stream per split so n_eval leaves train alone.
        rng = random.Random(f"preference-{seed}-{name}")
        lines = splits[name] = []
        for _ in range(n):
            for _ in range(10_000):
                words = lang.sample_document(rng, rng.randint(1, 3)).split()
                k = rng.randint(lo, hi)
                if 2 <= len(words) - k <= max_response_words:
                    break
            else:
                raise ValueError(f"no 1-3 sentence document fits prompt_words={prompt_words} and "
                                 f"max_response_words={max_response_words}; use shorter prompts")
            chosen, rejected, forced = words[k:], words[k:], rng.randrange(len(words) - k)
            for j, w in enumerate(chosen):
                if j == forced or rng.random() < replace_prob:
                    rejected[j] = rng.choice([v for v in lang.vocab if v != w])
            try:
                grammatical += name == "train" and lang.state_after(words[:k] + rejected) is not None
            except ValueError:
                pass
            lines.append({"prompt": " ".join(words[:k]), "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return write_splits(out, splits, lang, {**config, "rejected_grammatical_fraction": grammatical / max(n_train, 1)})


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m distill.data.preference OUT_DIR [--seed S] [--n-train N] [--n-eval N]``."""
    writer_cli("Write synthetic preference pairs.", lambda a: write_preference_dataset(a.out_dir, seed=a.seed, n_train=a.n_train, n_eval=a.n_eval), argv)


if __name__ == "__main__":
    main()
