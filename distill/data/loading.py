"""From a recipe's `data:` section to per-rank batches.

Training batches: a seeded `DistributedSampler` per epoch, so each rank sees a disjoint slice and
every rank gets the same number of micro-batches. Evaluation batches: each rank takes every
world-th example and the shorter ranks are padded with examples that predict nothing, so every rank
runs the same number of forwards (a ZeRO-3 role hangs otherwise) and no example counts twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from distill.config.errors import RecipeError
from distill.data.packing import PackedCollator, pack_dataset, padding_fraction
from distill.data.text import CausalCollator, load_text_dataset, looks_like_path, tokenize_dataset

WIDTHS = 8
"""Sequence lengths a batch is padded to when a role compiles: multiples of `data.max_length / WIDTHS`. More
widths pad less (at most `max_length / WIDTHS` tokens a row past the longest) but compile more graphs."""


@dataclass
class DataBundle:
    train: object  # datasets.Dataset with `input_ids`
    eval: object | None
    collator: object
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int
    pad_id: int
    grad_accum: int = 1
    pad_example: dict | None = None
    """An example that predicts nothing, to even out the ranks' eval batches; default: two pad tokens."""

    def check(self) -> None:
        """Refuse data that cannot make one optimizer step, or an empty eval set (every trainer's data)."""
        if self.steps_per_epoch == 0:
            raise RecipeError(f"`data.train` has {len(self.train)} examples, fewer than one optimizer step needs "
                              f"({self.micro_batch_size} x {self.grad_accum} x {self.world_size} processes): "
                              "lower train.micro_batch_size or train.grad_accum, or add data")
        if self.eval is not None and len(self.eval) == 0:
            raise RecipeError("`data.eval` has no examples left after tokenisation: fix the file or set `data.eval: null`")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train) // (self.micro_batch_size * self.world_size * self.grad_accum)

    def train_batches(self, *, start_step: int = 0) -> Iterator[list[dict]]:
        """Endless lists of `grad_accum` micro-batches, epoch after epoch, from optimizer step `start_step`."""
        per_epoch, grad_accum = self.steps_per_epoch, self.grad_accum
        epoch, skip = divmod(start_step, per_epoch)
        while True:
            sampler = DistributedSampler(self.train, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                         seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            # A resumed run starts mid-epoch: drop the sequences of the steps already taken, unread.
            order = list(sampler)[skip * grad_accum * self.micro_batch_size:]
            # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
            # run's dropout masks would differ from an uninterrupted one's.
            loader = DataLoader(Subset(self.train, order), batch_size=self.micro_batch_size, collate_fn=self.collator,
                                drop_last=True, generator=torch.Generator().manual_seed(self.seed + epoch))
            it = iter(loader)
            for _ in range(per_epoch - skip):
                yield [next(it) for _ in range(grad_accum)]
            epoch, skip = epoch + 1, 0

    def eval_batches(self, limit: int | None = None, split: str = "eval") -> Iterator[dict]:
        """Batches of `split` in order, every rank the same number of them; `limit` caps batches per rank."""
        data = getattr(self, split)
        n = len(data)
        per_rank = -(-n // self.world_size)
        if limit is not None:
            per_rank = min(per_rank, limit * self.micro_batch_size)
        mine = [data[i] for i in range(self.rank, n, self.world_size)][:per_rank]
        dummy = self.pad_example or {"input_ids": [self.pad_id, self.pad_id], "prompt_length": 2}
        mine += [dummy] * (per_rank - len(mine))
        for i in range(0, per_rank, self.micro_batch_size):
            yield self.collator(mine[i:i + self.micro_batch_size])


def ensure_synthetic(recipe, writer) -> Path | None:
    """Write the recipe's synthetic data with `writer(dir, seed=..., recipe=...)` when `data.synthetic_seed` is set
    and the directory of `data.train` does not exist yet; returns the directory written, or None.

    Files are never written over: when `data.train` (and `data.eval`) exist they are used as they are, whoever
    wrote them, and a directory that exists without them is refused. The data is written into a temporary
    directory beside the target and renamed into place, so the target is complete or absent. Every process of a
    run calls this; a lock makes the first one on a machine write and the others find the finished files.
    """
    d = recipe.data
    if d.synthetic_seed is None or not looks_like_path(d.train):
        return None
    train, evals = Path(d.train).expanduser(), Path(d.eval).expanduser() if d.eval else None
    if train.exists() and (evals is None or evals.exists()):
        return None
    target = train.parent
    for key, path, name in (("data.train", train, "train.jsonl"), ("data.eval", evals, "eval.jsonl")):
        if path is not None and path != target / name:
            raise RecipeError(f"`data.synthetic_seed` writes the synthetic data as {target / 'train.jsonl'}, "
                              f"{target / 'eval.jsonl'} and {target / 'tokenizer'}/; `{key}: {path}` is not there: "
                              f"set `{key}: {target / name}`, or remove `data.synthetic_seed` and give existing files")
    key = hashlib.sha1(str(target.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"distill-synthetic-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and any(target.iterdir()):
            if train.exists() and (evals is None or evals.exists()):
                return None  # another process of this run has just written it
            held = sorted(p.name for p in target.iterdir())[:6]
            raise RecipeError(f"`data.synthetic_seed` writes synthetic data only into a directory that does not exist "
                              f"yet; `{target}` exists (holding {', '.join(held)}) without "
                              f"{'the files named by data.train/data.eval' if evals else 'data.train'}: point "
                              "data.train/data.eval at your files and remove data.synthetic_seed, or name a new directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{socket.gethostname()}-{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            writer(tmp, seed=d.synthetic_seed, recipe=recipe)
            if target.exists():
                target.rmdir()  # empty, checked above
            try:
                os.rename(tmp, target)
            except OSError:
                if not train.exists():  # not another machine's copy that won the race (shared file systems)
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: wrote the synthetic data (data.synthetic_seed: {d.synthetic_seed}) to {target}/")
    return target


def pad_id(tokenizer) -> int:
    """The padding token, or eos for tokenizers without one (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def source_options(data, key: str) -> dict:
    """How `data.<key>` is read: its split (None for `eval`: the first evaluation split it has), the hub config
    and revision; keyword arguments of the `load_*_dataset` functions."""
    return {"split": data.train_split if key == "train" else data.eval_split, "config": data.dataset_config,
            "revision": data.revision}


def tokenized_splits(data, tokenize) -> Iterator[tuple[str, object, dict]]:
    """`(key, dataset, stats)` of `data.train` and, when set, `data.eval`, each through
    `tokenize(source, options)` (options: `source_options`); a missing or malformed source becomes a
    RecipeError naming its key."""
    for key, source in (("train", data.train), ("eval", data.eval)):
        if source is None:
            continue
        try:
            ds, stats = tokenize(source, source_options(data, key))
        except (FileNotFoundError, ValueError) as e:
            raise RecipeError(f"`data.{key}`: {e}") from None
        yield key, ds, stats


def build_text_data(recipe, tokenizer, rank: int, world_size: int, *, compiled: bool = False) -> DataBundle:
    d = recipe.data
    if d.append_eos and tokenizer.eos_token_id is None and rank == 0:
        print("data: the tokenizer has no eos token, so texts end without one (data.append_eos has nothing to append)")
    splits = {"eval": None}
    for key, ds, stats in tokenized_splits(d, lambda src, opts: tokenize_dataset(
            load_text_dataset(src, text_field=d.text_field, **opts), tokenizer, max_length=d.max_length,
            text_field=d.text_field, append_eos=d.append_eos and tokenizer.eos_token_id is not None)):
        splits[key] = ds
        if key == "train" and rank == 0 and stats.get("truncated"):
            print(f"data: {stats['truncated']} of {stats['n']} training texts truncated to data.max_length={d.max_length} tokens")
    pad = pad_id(tokenizer)
    if not d.packing:
        collator = CausalCollator(pad, **collator_padding(d.max_length, compiled))
        return DataBundle(splits["train"], splits["eval"], collator, recipe.train.micro_batch_size,
                          rank, world_size, recipe.seed, pad, grad_accum=recipe.train.grad_accum)
    for key in [k for k, ds in splits.items() if ds is not None]:
        lengths = [len(ids) for ids in splits[key]["input_ids"]]
        splits[key], stats = pack_dataset(splits[key], d.max_length)
        if rank == 0:
            print(f"data.{key}: packed {stats['documents']} documents into {stats['rows']} rows of {d.max_length} tokens: "
                  f"{padding_fraction([stats['tokens']], stats['rows'] * d.max_length):.1%} padding "
                  f"(one document per row: {padding_fraction(lengths, d.max_length):.1%})")
    # A one-token row predicts nothing: it evens out the ranks' eval batches.
    return DataBundle(splits["train"], splits["eval"], PackedCollator(pad, d.max_length), recipe.train.micro_batch_size,
                      rank, world_size, recipe.seed, pad, grad_accum=recipe.train.grad_accum,
                      pad_example={"input_ids": [pad], "position_ids": [0]})


def collator_padding(max_length: int, compiled: bool) -> dict[str, int]:
    """The `pad_to_multiple_of` and `max_length` of a run's collators: multiples of 8 when no role compiles;
    else `WIDTHS` widths, the last `max_length`, so that a compiled layer sees few shapes."""
    if not compiled:
        return {"pad_to_multiple_of": 8, "max_length": max_length}
    step = -(-max_length // WIDTHS)
    return {"pad_to_multiple_of": max(8, -(-step // 8) * 8), "max_length": max_length}
