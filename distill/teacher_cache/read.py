"""Reading a teacher cache in a training run: a cache that does not fit the recipe is refused by name before any
model loads, and each batch gets its rows' records laid on its predicted positions.

Rows are found by their index in the run's dataset (`data.train` / `data.eval` tokenised and packed as the recipe
says), the order the writer wrote them in: the same data, tokenizer and data settings give the same rows, which
`check_rows` proves by the rows' fingerprint, and every row read is checked against the hash the writer stored.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from distill.config.errors import RecipeError
from distill.losses.sparse_kd import SPARSE_KD_LOSSES
from distill.models.tokenizer_files import tokenizer_difference
from distill.plan.tokens import sample_texts
from distill.teacher_cache.store import (
    FORMAT_VERSION,
    CacheReader,
    dataset_fingerprint,
    file_hashes,
    num_shards,
    read_manifest,
    row_hashes,
    shard_done,
    teacher_config_sha256,
)

ROW_COLUMNS = {"train": "_cache_train_row", "eval": "_cache_eval_row"}
"""The column each split's rows carry their index in, to find their records."""
SETTING_KEYS = {"max_length": "data.max_length", "packing": "data.packing", "append_eos": "data.append_eos",
                "text_field": "data.text_field", "train_split": "data.train_split", "eval_split": "data.eval_split",
                "dataset_config": "data.dataset_config", "revision": "data.revision"}


def cache_dir(recipe) -> Path:
    d = recipe.kd.cache.dir
    if d is None:
        raise RecipeError("`kd.cache.dir`: name the teacher cache to train from (the directory "
                          "`python -m distill.teacher_cache` wrote)")
    return Path(d).expanduser()


def complete_manifest(recipe) -> dict:
    """The manifest of `kd.cache.dir`, refused unless the cache is complete and of a format this version reads."""
    root = cache_dir(recipe)
    m = read_manifest(root)
    if m is None:
        raise RecipeError(f"`kd.cache.dir`: {root} holds no teacher cache (no manifest.json): write it first with "
                          "`python -m distill.teacher_cache RECIPE`, the recipe of its teacher and data")
    if m.get("format_version") != FORMAT_VERSION:
        raise RecipeError(f"`kd.cache.dir`: {root} is a cache of format {m.get('format_version')}; this version of "
                          f"distill reads format {FORMAT_VERSION}: write it again")
    if not m.get("complete"):
        rows = m["cache"]["rows_per_shard"]
        todo = [(s, num_shards(m["data"][s]["rows"], rows)) for s in m["layout"]]
        done = sum(shard_done(root, s, i) for s, n in todo for i in range(n))
        raise RecipeError(f"`kd.cache.dir`: {root} is unfinished ({done} of {sum(n for _, n in todo)} shards written): "
                          f"finish it by running its writer again, `{m.get('command', 'python -m distill.teacher_cache RECIPE')}`")
    return m


def check_cache(recipe, student_vocab: int | None) -> dict:
    """Everything about `kd.cache` that needs no data: the cache is complete, stores what the recipe asks (its
    explicit `kd.cache` settings, `kd.top_k`, a loss and temperature it can serve), over a vocabulary the student
    covers, from data files and settings as the recipe's. Returns the manifest."""
    m, kd, spec = complete_manifest(recipe), recipe.kd, recipe.kd.cache
    root, cache = cache_dir(recipe), m["cache"]
    where = f"the cache in {root}"
    for key, want in spec.asked().items():
        if cache[key] != want:
            raise RecipeError(f"`kd.cache.{key}: {want}`: {where} was written with {key}: {cache[key]}; remove the key "
                              f"to train from it as it is, or write a cache with {key}: {want}")
    k, sampled = cache["k"], cache["format"] == "sampled"
    if kd.top_k is not None and kd.top_k > k:
        raise RecipeError(f"`kd.top_k: {kd.top_k}` needs the teacher's {kd.top_k} most likely tokens; {where} stores "
                          f"{k}: lower kd.top_k to at most {k}, or write a cache with kd.cache.k: {kd.top_k}")
    if kd.loss not in SPARSE_KD_LOSSES:
        raise RecipeError(f"`kd.loss: {kd.loss}` has no form for a cached teacher; losses that do: "
                          f"{', '.join(sorted(SPARSE_KD_LOSSES))} (register one with register_sparse_kd_loss)")
    uses_samples = sampled and (kd.top_k is None or kd.top_k > k)
    if uses_samples and (kd.loss != "forward_kl" or kd.temperature != 1.0):
        raise RecipeError(f"{where} holds tokens sampled from the teacher, an unbiased estimate of its distribution at "
                          f"temperature 1 for the forward KL's gradient only; this recipe asks for `kd.loss: {kd.loss}` at "
                          f"`kd.temperature: {kd.temperature}`: use kd.loss: forward_kl and kd.temperature: 1, or "
                          "a `format: topk` cache")
    if spec.tail == "bucket" and kd.temperature != 1.0 and kd.top_k is None and not sampled:
        raise RecipeError("`kd.cache.tail: bucket` needs `kd.temperature: 1`: the tempered mass of the tail is not "
                          "stored; use tail: renormalize, or temperature 1")
    vocab = cache["vocab_size"]
    if student_vocab is not None and student_vocab < vocab:
        raise RecipeError(f"the student has {student_vocab} logits and {where} holds distributions over {vocab} tokens: "
                          f"the live loss would renormalise the teacher over the student's {student_vocab}; write the "
                          f"cache with `kd.cache.vocab_size: {student_vocab}`")
    old = m["data"]["settings"]
    for key, name in SETTING_KEYS.items():
        if old.get(key) != getattr(recipe.data, key):
            raise RecipeError(f"`{name}: {getattr(recipe.data, key)}`: {where} was written from rows made with {key}: "
                              f"{old.get(key)}; set {name}: {old.get(key)} (the same rows), or write a cache from these")
    for split in ("train", "eval"):
        source, written = getattr(recipe.data, split), m["data"].get(split)
        if source is None:
            continue
        if written is None:
            raise RecipeError(f"`data.{split}`: {where} holds no {split} split: write it with `data.{split}` set, or set "
                              f"`data.{split}: null`")
        have = {f["name"]: f["bytes"] for f in file_hashes(source, content=False)}
        want = {f["name"]: f["bytes"] for f in written["files"]}
        if want and have != want:
            diff = next((n for n in sorted(set(have) | set(want)) if have.get(n) != want.get(n)))
            raise RecipeError(f"`data.{split}`: {source} is not the data {where} was written from ({diff}: "
                              f"{want.get(diff, 'absent')} bytes there, {have.get(diff, 'absent')} here); point data.{split} "
                              f"at that data, or write a cache from this")
    t = recipe.teacher
    if t.from_pretrained is not None or t.config is not None:
        if teacher_config_sha256(t) != m["teacher"]["config_sha256"]:
            raise RecipeError(f"`teacher`: this recipe names a teacher ({t.from_pretrained or 'teacher.config'}) whose "
                              f"config is not that of the teacher {where} was written from "
                              f"({m['teacher']['from_pretrained'] or 'a config'}); remove the teacher block (a cached "
                              "teacher is not loaded) or point kd.cache.dir at its cache")
    return m


def check_rows(recipe, tokenizer, data, manifest: dict) -> None:
    """The recipe's tokenizer and tokenized rows are the ones the cache was written from."""
    from transformers import AutoTokenizer


    root = cache_dir(recipe)
    cached = AutoTokenizer.from_pretrained(root / "tokenizer")
    why = tokenizer_difference(cached, tokenizer, sample_texts(recipe.data))
    if why:
        raise RecipeError(f"the data tokenizer differs from the one the cache in {root} was written with "
                          f"({root / 'tokenizer'}): {why}. Set `data.tokenizer: {root / 'tokenizer'}`, or write a "
                          "cache with this tokenizer")
    for split, ds in (("train", data.train), ("eval", data.eval)):
        if ds is None:
            continue
        want = manifest["data"][split]
        if len(ds) == want["rows"] and dataset_fingerprint(ds) == want["fingerprint"]:
            continue
        source = getattr(recipe.data, split)
        files = {f["name"]: f["sha256"] for f in file_hashes(source)}
        changed = [f["name"] for f in want["files"] if files.get(f["name"]) != f["sha256"]]
        cause = (f"the content of {', '.join(changed)} differs (sha256)" if changed else
                 "the files are the same, so their rows are made differently (data settings, or another distill version)")
        raise RecipeError(f"`data.{split}`: its {len(ds)} tokenized rows are not the {want['rows']} the cache in {root} "
                          f"was written from: {cause}. Train on the cache's data, or write a cache from this data")


def attach(recipe, data, tokenizer, manifest: dict):
    """(the data bundle whose batches carry `teacher_records` [B, T, record_bytes] uint8, the reader)."""
    check_rows(recipe, tokenizer, data, manifest)
    reader = CacheReader(cache_dir(recipe), manifest)
    rows = {s: ds.add_column(ROW_COLUMNS[s], np.arange(len(ds), dtype=np.int64))
            for s, ds in (("train", data.train), ("eval", data.eval)) if ds is not None}
    return dataclasses.replace(data, train=rows["train"], eval=rows.get("eval"),
                               collator=CacheCollator(data.collator, reader)), reader


class CacheCollator:
    """The run's collator, plus each example's records from the cache on the batch's predicted positions:
    ``teacher_records`` [B, T, record_bytes] uint8, zero where nothing is predicted. Examples that even out the
    ranks' eval batches carry no row and predict nothing."""

    def __init__(self, inner, reader: CacheReader):
        self.inner, self.reader = inner, reader

    @property
    def padding(self):
        return self.inner.padding

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        keys = [next(((s, int(ex[c])) for s, c in ROW_COLUMNS.items() if ex.get(c) is not None), (None, None))
                for ex in examples]
        batch = self.inner([{k: v for k, v in ex.items() if k not in ROW_COLUMNS.values()} for ex in examples])
        split = next((s for s, _ in keys if s is not None), "eval")  # only eval batches hold rows that even out ranks
        valid = batch["labels"] != -100  # [B, T]
        rows = [self.reader.row(s, row) if s is not None else None for s, row in keys]
        cached = torch.tensor([0 if r is None else r[0].shape[0] for r in rows])  # [B]
        stored = torch.tensor([r[1] if r is not None else 0 for r in rows], dtype=torch.int64)  # [B]
        read = torch.tensor([r is not None for r in rows])
        hashes = row_hashes(batch["input_ids"], batch["attention_mask"], batch["labels"])  # [B]
        wrong = (cached != valid.sum(-1)) | (read & (hashes != stored))
        if wrong.any():
            b = int(wrong.nonzero()[0])
            if keys[b][0] is None:
                raise ValueError("an example without a cache row predicts tokens")
            raise RecipeError(f"row {keys[b][1]} of data.{keys[b][0]} is not the row the teacher cache in "
                              f"{self.reader.root} holds for it ({int(valid[b].sum())} predicted tokens, {int(cached[b])} "
                              "cached): the cache was written from other rows")
        out = torch.zeros(*valid.shape, self.reader.codecs[split].record_bytes, dtype=torch.uint8)  # [B, T, R]
        if read.any():
            out[valid] = torch.cat([r[0] for r in rows if r is not None])  # rows in order, positions in order
        batch["teacher_records"] = out
        return batch


def bytes_per_token(manifest: dict) -> str:
    return ", ".join(f"{s} {v['bytes_per_token']} bytes/token" for s, v in manifest.get("splits", {}).items())


def describe(manifest: dict) -> str:
    """One line: what the cache stores and from what."""
    c = manifest["cache"]
    what = (f"top {c['k']}" if c["format"] == "topk" else f"top {c['k']} + {c['samples']} sampled") + \
           f" of {c['vocab_size']} tokens, values {c['values']}, ids {c['ids']}"
    t = manifest["teacher"]
    return f"teacher cache: {what}; {bytes_per_token(manifest)}; teacher {t['from_pretrained'] or 'from a config'} ({t['precision']})"
