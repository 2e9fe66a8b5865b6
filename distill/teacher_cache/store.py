"""A teacher cache on disk: a manifest, the tokenizer, and per split shards of records.

    DIR/manifest.json     what was written and from what: teacher, tokenizer, data files with their sha256 and
                          the tokenized rows' fingerprint, the settings, each split's record layout and shards;
                          `complete: true` once every shard is written
    DIR/tokenizer/        the data tokenizer's files, byte for byte
    DIR/train/shard_00000.safetensors + shard_00000.json, ...   (eval/ the same)

Shard s of a split holds rows [s * rows_per_shard, (s + 1) * rows_per_shard) of that split of the run's dataset
(`data.train` or `data.eval` tokenised, and packed with `data.packing`, in dataset order), as safetensors:

    records      uint8 [P, record_bytes]  one record per predicted token (label != -100), row after row,
                                          position after position (distill/teacher_cache/codec.py)
    row_offsets  int64 [rows + 1]         where each row's records start
    row_hash     int64 [rows]             a hash of each row's tokens and labels, checked when it is read

A shard's sidecar `shard_NNNNN.json` (rows, positions, bytes, sha256) is written after the shard; a shard
without one is unfinished and is written again. Every file is written under a temporary name and renamed, so a
killed writer leaves whole files only.

Safetensors rather than Arrow through `datasets`: a record is a fixed number of bytes, which safetensors keeps as
one plain tensor read by slices straight from the file (no pickle, no per-position list offsets, no `datasets`
cache of its own), and a shard is one file that can be copied to another cluster and checked by its sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from distill.config.errors import RecipeError
from distill.data.text import looks_like_path
from distill.teacher_cache.codec import Codec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")


def manifest_path(root: Path) -> Path:
    return Path(root) / MANIFEST


def read_manifest(root: Path) -> dict | None:
    try:
        return json.loads(manifest_path(root).read_text())
    except FileNotFoundError:
        return None


def write_atomic(path: Path, data: bytes) -> None:
    """`data` as `path`, whole or not at all: written beside it under a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: dict) -> None:
    write_atomic(manifest_path(root), (json.dumps(manifest, indent=1) + "\n").encode())


def shard_path(root: Path, split: str, shard: int) -> Path:
    return Path(root) / split / f"shard_{shard:05d}.safetensors"


def sidecar_path(root: Path, split: str, shard: int) -> Path:
    return shard_path(root, split, shard).with_suffix(".json")


def shard_done(root: Path, split: str, shard: int) -> bool:
    return sidecar_path(root, split, shard).is_file()


def num_shards(rows: int, rows_per_shard: int) -> int:
    return -(-rows // rows_per_shard)


def write_shard(root: Path, split: str, shard: int, *, records: torch.Tensor, row_offsets: torch.Tensor,
                row_hash: torch.Tensor, identity: str) -> dict:
    """Write one shard and then its sidecar; returns the sidecar."""
    from safetensors.torch import save

    data = save({"records": records.contiguous(), "row_offsets": row_offsets.contiguous(),
                 "row_hash": row_hash.contiguous()},
                # One key: safetensors writes several in no fixed order, and a shard written again must be the same bytes.
                metadata={"distill.teacher_cache": json.dumps({"split": split, "shard": shard, "identity": identity})})
    write_atomic(shard_path(root, split, shard), data)
    side = {"rows": int(row_hash.numel()), "positions": int(records.shape[0]), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "identity": identity}
    write_atomic(sidecar_path(root, split, shard), json.dumps(side).encode())
    return side


def teacher_config_sha256(spec) -> str:
    """sha256 of a teacher role's config: its config.json, or its `config` block."""
    if spec.from_pretrained is not None:
        path = Path(spec.from_pretrained).expanduser() / "config.json"
        return hashlib.sha256(path.read_bytes() if path.is_file() else b"").hexdigest()
    return hashlib.sha256(json.dumps(spec.config, sort_keys=True).encode()).hexdigest()


_HASH_MODULI = (2**31 - 1, 2**31 - 19)  # primes: every product of two residues fits in int64
_HASH_BASES = (1_000_003, 999_983)
_powers: dict[int, torch.Tensor] = {}


def _hash_powers(n: int) -> torch.Tensor:
    """[2, n] int64: base**i mod modulus, for each of the two (base, modulus)."""
    if n not in _powers:
        rows = []
        for base, mod in zip(_HASH_BASES, _HASH_MODULI):
            x, row = 1, []
            for _ in range(n):
                row.append(x)
                x = x * base % mod
            rows.append(row)
        _powers[n] = torch.tensor(rows, dtype=torch.int64)
    return _powers[n]


def row_hashes(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A 62-bit hash [B] of each collated row [B, T]: its tokens and labels where the attention mask is 1, in order (so
    padding, left or right, and the batch's width do not matter). Two polynomials modulo primes, vectorised: cheap
    enough to check every row a training run reads (not meant to resist anyone forging rows)."""
    keep = attention_mask.bool()
    rank = (keep.long().cumsum(-1) - 1).clamp(min=0)  # [B, T] each kept position's place in its row
    powers = _hash_powers(input_ids.shape[1])  # [2, T]
    value = input_ids.long() * 4099 + labels.long() + 101  # [B, T]; labels may be -100
    out = torch.zeros(input_ids.shape[0], dtype=torch.int64)
    for i, mod in enumerate(_HASH_MODULI):
        term = value.remainder(mod) * powers[i][rank] % mod
        out = out * (1 << 31) + torch.where(keep, term, torch.zeros_like(term)).sum(-1) % mod
    return out


def dataset_fingerprint(ds) -> str:
    """sha256 of a `datasets.Dataset`'s columns (names, row lengths and values), read from its Arrow buffers; the same
    for the same rows however they are chunked."""
    import pyarrow as pa

    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    out = hashlib.sha256()
    for name in sorted(ds.column_names):
        values, lengths = hashlib.sha256(), hashlib.sha256()
        for chunk in ds.data.column(name).chunks:
            while pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                offsets = np.asarray(chunk.offsets)
                lengths.update(np.diff(offsets).astype(np.int64).tobytes())
                chunk = chunk.flatten()
            values.update(np.asarray(chunk.to_numpy(zero_copy_only=False)).tobytes())
        out.update(f"{name}:{ds.features[name]}".encode())
        out.update(values.digest() + lengths.digest())
    out.update(str(len(ds)).encode())
    return out.hexdigest()


def source_files(source: str | None) -> list[Path]:
    """The local files a data source reads: the file, or every file under the directory; [] for a hub name."""

    if source is None:
        return []
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if looks_like_path(source):
        raise RecipeError(f"data source `{source}` does not exist")
    return []


def file_hashes(source: str | None, *, content: bool = True) -> list[dict]:
    """`{name, bytes[, sha256]}` of each file of a data source (names relative to the source)."""
    out = []
    base = Path(source).expanduser() if source else None
    for f in source_files(source):
        entry = {"name": f.name if f == base else str(f.relative_to(base)), "bytes": f.stat().st_size}
        if content:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            entry["sha256"] = h.hexdigest()
        out.append(entry)
    return out


def _map_shard(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard's tensors, `records` mapped from the file (read as rows are asked for), the small ones read whole.
    The safetensors layout: an 8-byte little-endian header length, the JSON header, then the tensors' bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    dtypes = {"U8": np.uint8, "I64": np.int64}

    def tensor(name: str, mode: str = "r"):
        info = header[name]
        a, b = info["data_offsets"]
        return np.memmap(path, dtype=dtypes[info["dtype"]], mode=mode, offset=base + a, shape=tuple(info["shape"]))

    records = tensor("records") if header["records"]["shape"][0] else np.zeros(header["records"]["shape"], np.uint8)
    return records, np.array(tensor("row_offsets")), np.array(tensor("row_hash"))


class CacheReader:
    """The records of a complete cache, row by row, read lazily from its shards."""

    def __init__(self, root: str | os.PathLike, manifest: dict | None = None):
        self.root = Path(root)
        self.manifest = manifest or read_manifest(self.root)
        if self.manifest is None:
            raise RecipeError(f"`kd.cache.dir`: {self.root} holds no teacher cache ({MANIFEST} is missing); write one "
                              f"with `python -m distill.teacher_cache RECIPE`")
        self.codecs = {split: Codec(**layout["codec"]) for split, layout in self.manifest["layout"].items()}
        self.rows_per_shard = self.manifest["cache"]["rows_per_shard"]
        self._open: OrderedDict[tuple[str, int], tuple] = OrderedDict()

    def splits(self) -> list[str]:
        return list(self.manifest["layout"])

    def _shard(self, split: str, shard: int):
        """(records [P, record_bytes] uint8 mapped from the file, row offsets [rows + 1], row hashes [rows])."""
        key = (split, shard)
        if key not in self._open:
            self._open[key] = _map_shard(shard_path(self.root, split, shard))
            if len(self._open) > 64:  # a bounded number of mapped files
                self._open.popitem(last=False)
        self._open.move_to_end(key)
        return self._open[key]

    def row(self, split: str, row: int) -> tuple[torch.Tensor, int]:
        """(records [positions, record_bytes] uint8, row hash) of one row of `split`."""
        shard, i = divmod(row, self.rows_per_shard)
        records, offsets, hashes = self._shard(split, shard)
        return torch.from_numpy(records[offsets[i]:offsets[i + 1]].copy()), int(hashes[i])

    def verify(self) -> list[str]:
        """Every shard's sha256 against the manifest; the files that differ (slow: reads the whole cache)."""
        bad = []
        for split, shards in self.manifest["shards"].items():
            for s, entry in enumerate(shards):
                path = shard_path(self.root, split, s)
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        h.update(block)
                if h.hexdigest() != entry["sha256"]:
                    bad.append(str(path))
        return bad
