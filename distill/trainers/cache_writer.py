"""Writing a teacher cache: the recipe's teacher over its training and eval data, every rank a share of the shards.

The teacher is planned as a frozen role of a training run is (replicated when its weights fit in half the GPU memory,
else ZeRO-3, else offloaded; `teacher.placement` overrides it) and runs on every process the command is launched
on. Shard s of a split is written by rank s % world_size; every rank runs the same number of forwards (a rank with
fewer rows runs forwards of an empty row), so a ZeRO-3 teacher's gathers pair up. A shard whose sidecar exists is
done: a write that was killed, run again with the same recipe, writes the other shards only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.config.errors import RecipeError
from distill.config.presets import shipped_recipes
from distill.config.recipe import read_recipe, validate_recipe
from distill.data.packing import model_inputs
from distill.loop.build import apply_role_options
from distill.loop.preflight import check_data
from distill.losses.logps import logit_transform
from distill.models.build import build_model, check_model_source
from distill.models.tokenizer_files import save_tokenizer
from distill.plan.checks import check_model_files, check_output_dir
from distill.plan.planner import RolePlan, format_plan, plan_role
from distill.plan.tokens import check_packing_attention, check_sizes, load_tokenizer, sample_texts
from distill.runtime.launch import world_info
from distill.runtime.roles import RoleManager
from distill.teacher_cache.codec import Codec
from distill.teacher_cache.store import (
    FORMAT_VERSION,
    SPLITS,
    dataset_fingerprint,
    file_hashes,
    num_shards,
    read_manifest,
    row_hashes,
    shard_done,
    sidecar_path,
    teacher_config_sha256,
    write_manifest,
    write_shard,
)
from distill.trainers.distill import DistillTrainer, kd_data

CHUNK_TOKENS = 2048
"""Predicted tokens whose [tokens, vocab] logits are made and encoded at once."""
OURS = ("manifest.json", "tokenizer", *SPLITS)
IDENTITY = ("format_version", "cache", "teacher", "tokenizer", "data")
"""The manifest's keys a resumed write must find as it would write them (`identity`)."""
"""What a cache directory holds: all `overwrite` deletes there."""


class CacheWriterRoles(DistillTrainer):
    """A distillation recipe as the cache writer reads it: the teacher is the one role built (a `student` block may
    be there, unused) and `kd.cache` says what to store."""

    @classmethod
    def built_roles(cls, recipe) -> list[str]:
        return ["teacher"]

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.kd.cache is None:
            raise RecipeError("`kd.cache` is not set: add what to store, e.g. `kd.cache: {dir: runs/teacher_cache, k: 64}`")
        if recipe.kd.on_policy is not None:
            raise RecipeError("`kd.on_policy` scores completions the student generates during training, which only the "
                              "live teacher can: a cache holds the teacher on the data's text. Set `kd.on_policy: null`")


def load_writer_recipe(path, overrides: list[str] | None = None):
    """A recipe file (or a shipped recipe's name) with overrides, validated as the cache writer reads it."""
    shipped = shipped_recipes()
    if not os.path.exists(path) and str(path) in shipped:
        path = shipped[str(path)]
    return validate_recipe(read_recipe(path, overrides), CacheWriterRoles)


def target_dir(recipe) -> Path:
    return Path(recipe.kd.cache.dir or recipe.output_dir).expanduser()


def plan_teacher(recipe, *, world_size: int, vocab_size: int) -> RolePlan:
    """The teacher's plan, alone on the devices and one forward per micro-batch: a frozen role's placement as
    `distill.plan.planner.plan_roles` decides it."""
    return plan_role(recipe, "teacher", world_size=world_size, vocab_size=vocab_size, grad_accum=1)


def cache_vocab(recipe, plan: RolePlan, tokenizer) -> int:
    """The vocabulary the cache's distributions are over: `kd.cache.vocab_size`, or the teacher's head."""
    teacher = plan.model_config.vocab_size
    vocab = recipe.kd.cache.vocab_size or teacher
    if vocab > teacher:
        raise RecipeError(f"`kd.cache.vocab_size: {vocab}` is more than the teacher's {teacher} logits: lower it, or "
                          "remove it to use all of them")
    if vocab < len(tokenizer):
        raise RecipeError(f"`kd.cache.vocab_size: {vocab}` is less than the tokenizer's {len(tokenizer)} tokens, which "
                          "the data's labels may be: raise it to at least that")
    if recipe.kd.cache.k > vocab:
        raise RecipeError(f"`kd.cache.k: {recipe.kd.cache.k}` is more than the {vocab} tokens of the distributions: "
                          f"set k to at most {vocab} (k: {vocab} stores each distribution whole)")
    return vocab


def writer_preflight(recipe, *, world_size: int, dry_run: bool = False):
    """Every check before the teacher loads: data, teacher files, tokenizer, sizes, the plan; (tokenizer, plan)."""
    check_output_dir(target_dir(recipe))
    check_data(recipe, CacheWriterRoles, dry_run=dry_run)
    check_model_source("teacher", recipe.teacher)
    check_model_files("teacher", recipe.teacher)
    tokenizer = load_tokenizer(recipe, {"teacher": recipe.teacher})
    if recipe.data.packing:
        check_packing_attention({"teacher": recipe.teacher}, len(tokenizer))
    plan = plan_teacher(recipe, world_size=world_size, vocab_size=len(tokenizer))
    check_sizes(recipe, {"teacher": plan}, tokenizer)
    cache_vocab(recipe, plan, tokenizer)
    return tokenizer, plan


def codecs(recipe, vocab: int, splits) -> dict[str, Codec]:
    c = recipe.kd.cache
    return {split: Codec(c.format, c.k, c.samples, c.values, c.ids, vocab, label=split == "eval") for split in splits}


def data_settings(recipe) -> dict:
    """The `data` keys that decide the rows (the tokenizer is compared on its own)."""
    d = recipe.data
    return {k: getattr(d, k) for k in ("max_length", "packing", "append_eos", "text_field", "train_split", "eval_split",
                                        "dataset_config", "revision")}


def tokenizer_identity(tokenizer, recipe) -> dict:
    ids = [tokenizer(t)["input_ids"] for t in sample_texts(recipe.data)]
    return {"class": type(tokenizer).__name__, "tokens": len(tokenizer),
            "probe_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}


def teacher_identity(recipe, plan: RolePlan) -> dict:
    spec = recipe.teacher
    if spec.from_pretrained is not None:
        root = Path(spec.from_pretrained).expanduser()
        weights = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))]
    else:
        weights = [{"random_init_seed": recipe.seed}]
    return {"from_pretrained": spec.from_pretrained, "config_sha256": teacher_config_sha256(spec),
            "weights": weights, "precision": spec.precision, "vocab_size": plan.model_config.vocab_size}


def identity(recipe, tokenizer, data, plan: RolePlan, vocab: int, *, file_sha256: bool = True) -> dict:
    """What a cache is written from and how: a resumed write must find the same, a training run checks it.
    `file_sha256`: hash the data files' contents too (the process that writes the manifest; the others compare
    without, as a resumed write does: the rows' fingerprint already tells other contents apart)."""
    c = recipe.kd.cache
    splits = {"train": data.train, "eval": data.eval}
    return {
        "format_version": FORMAT_VERSION,
        "cache": {**codecs(recipe, vocab, ["train"])["train"].settings(), "rows_per_shard": c.rows_per_shard,
                  "seed": recipe.seed if c.format == "sampled" else None, "temperature": 1.0},
        "teacher": teacher_identity(recipe, plan),
        "tokenizer": tokenizer_identity(tokenizer, recipe),
        "data": {"settings": data_settings(recipe),
                 **{split: None if ds is None else {
                     "source": getattr(recipe.data, split),
                     "files": file_hashes(getattr(recipe.data, split), content=file_sha256),
                     "rows": len(ds), "fingerprint": dataset_fingerprint(ds)} for split, ds in splits.items()}},
    }


def first_difference(a, b, where: str = "") -> str | None:
    """`key: A -> B` for the first key (dotted) where two JSON values differ, or None. Paths (`source`,
    `from_pretrained`) are not compared: a cache may move, and may be resumed from another machine."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in ("source", "from_pretrained"):
                continue
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if a != b:
        show = lambda v: (s if len(s := json.dumps(v)) <= 80 else s[:77] + "...")  # noqa: E731
        return f"{where}: {show(a)} -> {show(b)}"
    return None


@torch.no_grad()
def teacher_records(teacher, batch: dict, codec: Codec, *, generator: torch.Generator | None = None,
                    chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """The records [P, record_bytes] uint8 of a batch's predicted tokens (label != -100), row after row, position after
    position. The logits are made from the final hidden states chunk by chunk (the head gathered once under ZeRO-3), or
    taken from the model's own forward where it changes them after the head (softcapping, scaling)."""
    inputs = model_inputs(batch)
    valid = batch["labels"] != -100  # [B, T]
    labels = batch["labels"][valid]  # [P]
    vocab = codec.vocab_size
    if logit_transform(teacher.plan.model_config):
        logits = teacher(**inputs).logits[valid]  # [P, V_t]
        head = None
    else:
        hidden = teacher.last_hidden(**inputs)[valid]  # [P, H]
        head = teacher.module.get_output_embeddings()
    out = []
    params = [] if head is None else [p for p in (head.weight, getattr(head, "bias", None)) if p is not None]
    with teacher.gathered(params):
        for a in range(0, max(labels.shape[0], 1), chunk_tokens):
            b = min(a + chunk_tokens, labels.shape[0])
            if b <= a:
                break
            rows = logits[a:b] if head is None else F.linear(hidden[a:b], head.weight, getattr(head, "bias", None))
            logp = rows[:, :vocab].float().log_softmax(-1)  # [c, V]
            out.append(codec.encode(logp, labels[a:b], generator=generator))
    return torch.cat(out) if out else torch.zeros(0, codec.record_bytes, dtype=torch.uint8, device=labels.device)


def command_line() -> str:
    import sys

    return " ".join(["python -m distill.teacher_cache", *sys.argv[1:]])


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def verdict(recipe, manifest: dict, target: Path) -> str:
    """What to do with `target`: `write` (nothing there, or a cache to overwrite), `resume` (an unfinished cache of
    this identity), `done` (a complete one); a cache of another identity without `overwrite` is refused."""
    old = read_manifest(target)
    if old is None:
        return "write"
    # Without the data files' sha256, which one process computes (`identity`): the rows' fingerprint tells contents apart.
    why = first_difference(_without("sha256", {k: old.get(k) for k in IDENTITY}),
                           _without("sha256", {k: manifest[k] for k in IDENTITY}))
    if why is None:
        return "done" if old.get("complete") else "resume"
    if not recipe.kd.cache.overwrite:
        raise RecipeError(f"`kd.cache.dir`: {target} holds a teacher cache written from other settings or data "
                          f"({why}); choose another directory, or set kd.cache.overwrite=true to delete it and write "
                          "this one")
    return "write"


def start_dir(target: Path, manifest: dict, tokenizer) -> None:
    """A fresh cache directory: an earlier cache's files deleted, the tokenizer and the unfinished manifest written."""
    for name in OURS:
        path = target / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, target / "tokenizer")
    write_manifest(target, manifest)


def write_cache(recipe, *, log=print) -> dict:
    """Write the recipe's teacher cache on every process of the launch; returns the finished manifest. Everything is
    checked, the data tokenised and the cache directory judged (`verdict`) before the teacher loads."""

    t0 = time.perf_counter()
    rank, world = world_info()
    say = log if rank == 0 else (lambda *_: None)
    tokenizer, plan = writer_preflight(recipe, world_size=world)
    data = kd_data(recipe, tokenizer, rank, world, compiled=plan.compile, log=say)
    splits = {s: ds for s, ds in (("train", data.train), ("eval", data.eval)) if ds is not None}
    vocab = cache_vocab(recipe, plan, tokenizer)
    layouts = codecs(recipe, vocab, splits)
    target = target_dir(recipe)
    key = identity(recipe, tokenizer, data, plan, vocab, file_sha256=rank == 0)
    manifest = {**key, "complete": False, "command": command_line(), "layout": {
        s: {"codec": c.settings(), "record_bytes": c.record_bytes, "fields": c.fields} for s, c in layouts.items()}}
    todo = verdict(recipe, manifest, target)  # every rank judges the same files alike
    if todo == "done":
        say(f"teacher cache: {target} is complete already, written from this recipe's teacher and data; nothing to do")
        return read_manifest(target)
    if rank == 0:
        if todo == "write":
            start_dir(target, manifest, tokenizer)
        else:
            say(f"teacher cache: resuming the unfinished cache in {target}")

    manager = RoleManager({"teacher": plan}, timeout_s=recipe.launch.timeout_s)
    acc = manager.accelerator
    acc.wait_for_everyone()  # the directory is ready
    say(format_plan({"teacher": plan}, world))
    torch.manual_seed(recipe.seed)
    teacher = manager.build("teacher", lambda p: apply_role_options(p, build_model(p.spec, p.model_config)))
    device = acc.device
    dummy = data.pad_example or {"input_ids": [data.pad_id, data.pad_id], "prompt_length": 2}
    # The same on every rank (only rank 0 hashed the files), so a shard is the same bytes whichever rank writes it.
    identity_hash = hashlib.sha256(json.dumps(_without("sha256", key), sort_keys=True).encode()).hexdigest()[:16]
    tokens = 0
    for split, ds in splits.items():
        codec, rows = layouts[split], recipe.kd.cache.rows_per_shard
        shards = [s for s in range(num_shards(len(ds), rows)) if s % world == rank and not shard_done(target, split, s)]
        work = [(s, list(range(a, min(a + data.micro_batch_size, (s + 1) * rows, len(ds)))))
                for s in shards for a in range(s * rows, min((s + 1) * rows, len(ds)), data.micro_batch_size)]
        steps = int(_all_max(len(work), device, world))
        say(f"teacher cache: {split}: {num_shards(len(ds), rows)} shards of {rows} rows, "
            f"{sum(not shard_done(target, split, s) for s in range(num_shards(len(ds), rows)))} to write")
        pending: dict[int, list] = {}
        for i in range(steps):
            s, members = work[i] if i < len(work) else (None, [])
            batch = data.collator([ds[r] for r in members] or [dummy])
            gen = None
            if codec.format == "sampled":
                gen = torch.Generator(device=device).manual_seed(_seed(recipe.seed, split, members[0] if members else -1))
            records = teacher_records(teacher, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()},
                                      codec, generator=gen).cpu()
            if s is None:
                continue
            counts = (batch["labels"] != -100).sum(-1).tolist()
            hashes = row_hashes(batch["input_ids"], batch["attention_mask"], batch["labels"]).tolist()
            pending.setdefault(s, []).append((records, counts, hashes))
            tokens += records.shape[0]
            if i + 1 == len(work) or work[i + 1][0] != s:
                _flush(target, split, s, pending.pop(s), identity_hash)
                say(f"teacher cache: {split} shard {s} written ({time.perf_counter() - t0:.0f} s)")
    acc.wait_for_everyone()
    total = int(_all_max(tokens, device, world, op="sum"))
    if rank == 0:
        manifest = finish(target, splits, recipe, world, plan, seconds=time.perf_counter() - t0, tokens_this_run=total)
        say(f"teacher cache: {target} complete: " + ", ".join(
            f"{s} {m['positions']} tokens, {m['bytes_per_token']:.1f} bytes/token" for s, m in manifest["splits"].items()))
    acc.wait_for_everyone()
    return read_manifest(target)


def _without(name: str, value):
    """A JSON value with every `name` key removed."""
    if isinstance(value, dict):
        return {k: _without(name, v) for k, v in value.items() if k != name}
    if isinstance(value, list):
        return [_without(name, v) for v in value]
    return value


def _flush(target: Path, split: str, shard: int, parts: list, identity_hash: str) -> None:
    records = torch.cat([p[0] for p in parts])
    counts = [c for p in parts for c in p[1]]
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    hashes = torch.tensor([h for p in parts for h in p[2]], dtype=torch.int64)
    write_shard(target, split, shard, records=records, row_offsets=offsets, row_hash=hashes, identity=identity_hash)


def _all_max(x: int, device, world: int, op: str = "max") -> int:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return int(t.item())


def finish(target: Path, splits: dict, recipe, world: int, plan: RolePlan, *, seconds: float, tokens_this_run: int) -> dict:
    """Rank 0, once every shard is written: the manifest with the shards' sidecars, marked complete."""
    manifest = read_manifest(target)
    rows = recipe.kd.cache.rows_per_shard
    manifest["shards"], manifest["splits"] = {}, {}
    for split, ds in splits.items():
        entries = []
        for s in range(num_shards(len(ds), rows)):
            path = sidecar_path(target, split, s)
            if not path.is_file():
                raise RuntimeError(f"teacher cache: {split} shard {s} is missing after every rank finished")
            entries.append(json.loads(path.read_text()))
        positions = sum(e["positions"] for e in entries)
        record = manifest["layout"][split]["record_bytes"]
        manifest["shards"][split] = entries
        manifest["splits"][split] = {"rows": len(ds), "positions": positions, "bytes": sum(e["bytes"] for e in entries),
                                     "bytes_per_token": record}
    manifest.update(complete=True, world_size=world, placement=plan.placement, seconds_last_run=round(seconds, 3),
                    tokens_last_run=tokens_this_run, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_manifest(target, manifest)
    return manifest
