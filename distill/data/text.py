"""Loading, tokenising and collating text for causal-LM distillation.

Label convention used everywhere in ``distill``: the collator returns labels
that are ALREADY SHIFTED, so ``logits[:, t]`` is compared with ``labels[:, t]``
directly, with no further shift in the loss.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import torch

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_HINT = "To create the synthetic dataset locally, run: python -m distill.data.synthetic DIR"


def _builder_for(path: str) -> str | None:
    return _BUILDERS.get(os.path.splitext(path)[1].lower())


def looks_like_path(source: Any) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator, a
    # relative/absolute/home prefix or a data-file extension is meant locally.
    # (A dataset given as an object is no path.)
    return isinstance(source, str) and (
        source.startswith(("/", ".", "~"))
        or _builder_for(source) is not None
        or source.count("/") >= 2
        or os.sep != "/" and os.sep in source
    )


def _load_files(files: list[str]) -> Any:
    import datasets

    builders = {_builder_for(f) for f in files}
    if len(builders) != 1:
        raise ValueError(f"cannot mix file types in one dataset: {sorted(files)}")
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValueError(f"dataset file {f!r} is empty")
    try:
        return datasets.load_dataset(builders.pop(), data_files={"train": files}, split="train")
    except datasets.exceptions.DatasetGenerationError as e:  # e.g. a line that is not JSON; the cause says where
        raise ValueError(f"{', '.join(files)} cannot be read: {e.__cause__ or e} "
                         "(`python -m distill.train RECIPE --dry-run` names the first bad line of a .jsonl file)") from None


EVAL_SPLITS = ("eval", "validation", "test")
"""The split names an evaluation source is looked up under, in order, when `data.eval_split` is null."""


def load_dataset_source(
    source: str,
    *,
    split: str | None = "train",
    data_files: str | Sequence[str] | dict[str, Any] | None = None,
    hint: str = _HINT,
    config: str | None = None,
    revision: str | None = None,
) -> Any:
    """Load a non-empty ``datasets.Dataset`` of any columns from a file, a directory or a hub id.

    ``source`` may be:

    * a local ``.jsonl``/``.json``/``.parquet``/``.txt`` file (``split`` is ignored);
    * a directory written by ``save_to_disk``: a ``DatasetDict`` gives its ``split``, a single
      ``Dataset`` is used whole;
    * another local directory: files named ``{split}*.{ext}`` in it are loaded (e.g.
      ``DIR/eval.jsonl`` for ``split="eval"``), else ``datasets`` resolves the
      directory layout itself;
    * anything else: a hub dataset id for ``datasets.load_dataset``, with ``config`` (its
      ``name=``) and ``revision``.

    ``split=None`` asks for an evaluation split: the first of :data:`EVAL_SPLITS` the source has,
    and an error, never the train split, when it has none. With ``data_files``, ``source`` is
    passed unchanged as the builder or dataset name: ``load_dataset(source, data_files=data_files, split=split)``.

    Raises:
        FileNotFoundError: ``source`` looks like a path but does not exist (``hint`` says how to make one).
        ValueError: the dataset is empty, has no such split, or a hub dataset cannot be loaded.
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return _given(source, split)
    path = os.path.expanduser(source)
    if data_files is not None:
        ds = datasets.load_dataset(source, data_files=data_files, split=split or EVAL_SPLITS[0])
    elif os.path.isfile(path):
        if _builder_for(path) is None:
            raise ValueError(f"unsupported file type {path!r}; expected one of {sorted(_BUILDERS)}")
        ds = _load_files([path])
    elif os.path.isdir(path):
        ds = _load_dir(path, split)
    elif looks_like_path(source):
        raise FileNotFoundError(f"dataset path {source!r} does not exist. {hint}")
    else:
        ds = _load_hub(source, split, config=config, revision=revision, hint=hint)

    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, source)
    if len(ds) == 0:
        raise ValueError(f"dataset {source!r} (split {split!r}) is empty")
    return ds


def _given(ds: Any, split: str | None) -> Any:
    """A dataset passed as an object (from Python): a `Dataset` as it is, a `DatasetDict`'s split."""
    import datasets

    what = f"the {type(ds).__name__} given"
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, split, what)
    if len(ds) == 0:
        raise ValueError(f"{what} is empty")
    return ds


def _load_dir(path: str, split: str | None) -> Any:
    import datasets

    saved = [os.path.isfile(os.path.join(path, f)) for f in (datasets.config.DATASETDICT_JSON_FILENAME,
                                                             datasets.config.DATASET_STATE_JSON_FILENAME,
                                                             datasets.config.DATASET_INFO_FILENAME)]
    if saved[0] or saved[1] and saved[2]:
        return datasets.load_from_disk(path)  # a Dataset, or a DatasetDict whose split is picked after
    for name in EVAL_SPLITS if split is None else (split,):
        files = sorted({f for ext in _BUILDERS for f in glob.glob(os.path.join(glob.escape(path), f"{name}*{ext}"))})
        if files:
            return _load_files(files)
    # No such files: `datasets` infers the splits from the layout (e.g. `dev.jsonl` -> validation).
    try:
        return datasets.load_dataset(path) if split is None else datasets.load_dataset(path, split=split)
    except ValueError as err:
        raise ValueError(f"{path!r}: no files named {'/'.join(EVAL_SPLITS) if split is None else split}*.jsonl (or "
                         f".json, .parquet, .txt), and `datasets` reads no such split from it ({err})") from None


def _load_hub(source: str, split: str | None, *, config: str | None, revision: str | None, hint: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, name=config, revision=revision, split=split)
    except Exception as err:
        what = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE:
            why = ("offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and not in the local cache: load it once "
                   "with network access, or give a local path")
        else:
            why = "check the name, `data.dataset_config`, `data.train_split`/`data.eval_split` and `data.revision`"
        if "/" in source:  # "data/train" may have been meant as a relative path: say both.
            raise FileNotFoundError(f"{source!r} is not an existing local path, and loading it as a hub dataset "
                                    f"failed ({what}): {why}. {hint}") from None
        raise ValueError(f"cannot load the hub dataset {source!r} ({what}): {why}") from None


def _pick_split(dd: Any, split: str | None, source: str) -> Any:
    """One split of a DatasetDict: `split`, or with None the first evaluation split."""
    if split is not None:
        if split not in dd:
            raise ValueError(f"{source!r} has no split {split!r}; its splits: {list(dd)}")
        return dd[split]
    for name in EVAL_SPLITS:
        if name in dd:
            return dd[name]
    raise ValueError(f"{source!r} has no evaluation split ({', '.join(EVAL_SPLITS)}); its splits: {list(dd)}. "
                     "Set `data.eval_split` to the one to evaluate on")


def load_text_dataset(
    source: str,
    *,
    split: str | None = "train",
    text_field: str = "text",
    data_files: str | Sequence[str] | dict[str, Any] | None = None,
    config: str | None = None,
    revision: str | None = None,
) -> Any:
    """Load a text dataset (see :func:`load_dataset_source`) and check its ``text_field`` holds strings.

    Raises:
        FileNotFoundError: ``source`` looks like a path but does not exist.
        ValueError: the dataset is empty, or has no ``text_field`` column, or
            that column is not a string column.
    """
    ds = load_dataset_source(source, split=split, data_files=data_files, config=config, revision=revision)
    if text_field not in ds.column_names:
        raise ValueError(
            f"dataset {source!r} has no field {text_field!r}; available columns: {ds.column_names}"
        )
    dtype = getattr(ds.features[text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise ValueError(f"field {text_field!r} of {source!r} must hold strings, got {ds.features[text_field]}")
    return ds


def tokenize_dataset(
    ds: Any,
    tokenizer: Any,
    *,
    max_length: int,
    text_field: str = "text",
    num_proc: int | None = None,
    append_eos: bool = False,
) -> tuple[Any, dict[str, int]]:
    """Tokenise ``ds[text_field]`` into an ``input_ids`` column, truncated to ``max_length``.

    The tokenizer's own special tokens are added (the synthetic tokenizer adds
    ``<bos>``/``<eos>``). ``append_eos`` adds ``eos_token_id`` when the
    tokenizer did not, so document ends are learned with e.g. GPT-2-style
    tokenizers. All original columns are dropped.

    Returns ``(dataset, stats)`` with stats ``{"n", "truncated", "tokens",
    "max_tokens"}``: example count, examples cut to ``max_length``, tokens kept
    and the longest untruncated length seen.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to leave a target, got {max_length}")
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("append_eos=True but the tokenizer has no eos_token_id")

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids_list = tokenizer(batch[text_field], add_special_tokens=True)["input_ids"]
        if append_eos:
            ids_list = [ids if ids[-1:] == [eos] else ids + [eos] for ids in ids_list]
        return {
            "input_ids": [ids[:max_length] for ids in ids_list],
            "_n_tokens": [len(ids) for ids in ids_list],
        }

    out = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                 desc="tokenize")
    # Counted after map so it stays correct with num_proc workers.
    lengths = out["_n_tokens"]
    stats = {
        "n": len(lengths),
        "truncated": sum(n > max_length for n in lengths),
        "tokens": sum(min(n, max_length) for n in lengths),
        "max_tokens": max(lengths, default=0),
    }
    return out.remove_columns("_n_tokens"), stats


class CausalCollator:
    """Right-pad examples and build ALREADY-SHIFTED labels.

    Output (all ``torch.long``):

    * ``input_ids`` [B, T]: right-padded with ``pad_token_id``;
    * ``attention_mask`` [B, T]: 1 on real tokens, 0 on padding;
    * ``labels`` [B, T]: ``labels[b, t] = input_ids[b, t + 1]``, so the model's
      ``logits[:, t]`` is compared with ``labels[:, t]`` with NO further shift.
      ``ignore_index`` at the last real position, on padding and wherever the
      next token is masked out by the example.

    Each example is a dict with ``input_ids`` and optionally (combined with AND):

    * ``prompt_length`` (int): the first ``prompt_length`` tokens are prompt and
      are never predicted;
    * ``loss_mask`` (list of 0/1 aligned with ``input_ids``): only tokens with 1
      are predicted;
    * ``labels`` (UNshifted, aligned with ``input_ids``, HF convention): tokens
      whose label is ``ignore_index`` are not predicted; the other values are
      used as targets.

    ``T`` is the longest example, rounded up to ``pad_to_multiple_of`` but never past
    ``max_length``; with ``fixed_length`` every batch is exactly that long, so all ranks
    run equal-shaped work. ``max_length`` (and ``fixed_length``) truncate.
    """

    def __init__(
        self,
        pad_token_id: int | None,
        *,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        fixed_length: int | None = None,
        ignore_index: int = -100,
    ) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
        for name, v in (("pad_to_multiple_of", pad_to_multiple_of), ("max_length", max_length),
                        ("fixed_length", fixed_length)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if fixed_length is not None and pad_to_multiple_of and fixed_length % pad_to_multiple_of:
            raise ValueError(
                f"fixed_length={fixed_length} is not a multiple of pad_to_multiple_of={pad_to_multiple_of}"
            )
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.fixed_length = fixed_length
        limits = [v for v in (max_length, fixed_length) if v is not None]
        self.max_length = min(limits) if limits else None
        self.ignore_index = ignore_index

    @staticmethod
    def as_list(x: Any) -> list[int]:
        return x.tolist() if isinstance(x, torch.Tensor) else list(x)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        seqs = [self.as_list(ex["input_ids"])[: self.max_length] for ex in examples]
        if self.fixed_length is not None:
            width = self.fixed_length
        else:
            width = max(len(s) for s in seqs)
            m = self.pad_to_multiple_of
            if m:
                width = max(m, -(-width // m) * m)
                if self.max_length is not None:
                    width = min(width, self.max_length)
        batch = len(seqs)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((batch, width), dtype=torch.long)  # [B, T]
        labels = torch.full((batch, width), self.ignore_index, dtype=torch.long)  # [B, T]
        for b, (ex, seq) in enumerate(zip(examples, seqs)):
            n = len(seq)
            if n == 0:
                continue
            ids = torch.tensor(seq, dtype=torch.long)  # [n]
            input_ids[b, :n] = ids
            attention_mask[b, :n] = 1
            # Targets per token (unshifted), then shifted left by one.
            target = ids.clone()  # [n]
            if ex.get("labels") is not None:
                target = torch.tensor(self.as_list(ex["labels"])[:n], dtype=torch.long)
                if target.numel() != n:
                    raise ValueError(f"example {b}: labels has {target.numel()} entries, input_ids {n}")
            if ex.get("loss_mask") is not None:
                mask = torch.tensor(self.as_list(ex["loss_mask"])[:n], dtype=torch.bool)
                if mask.numel() != n:
                    raise ValueError(f"example {b}: loss_mask has {mask.numel()} entries, input_ids {n}")
                target[~mask] = self.ignore_index
            if ex.get("prompt_length") is not None:
                target[: int(ex["prompt_length"])] = self.ignore_index
            labels[b, : n - 1] = target[1:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_dataloader(
    ds: Any,
    collator: CausalCollator,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` whose shuffle order depends only on ``seed``.

    Sharding across ranks is left to ``accelerate.prepare``.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=collator,
        generator=generator,
        num_workers=num_workers,
    )
