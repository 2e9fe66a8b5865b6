"""Input files checked before any weight loads: the output directory, each role's model directory (config.json
parses, weight files whole), JSON-lines data, and a checkpoint's model shapes against the run's. Each failure is
one RecipeError naming the key or file and the fix. Cheap enough for `--dry-run`: headers and configs are read,
no tensor is. (Vocabulary and position sizes against the tokenizer and `data.max_length`:
`distill.plan.tokens.check_sizes`.)
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from distill.config.errors import RecipeError
from distill.data.text import looks_like_path
from distill.models.build import MODEL_CLASSES

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_output_dir(out: Path) -> None:
    """`output_dir` is a directory this process can write, or can be created as one."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == out else f"lies under {probe}, which is a file"
        raise RecipeError(f"`output_dir`: {out} {what}, not a directory: choose another output_dir")
    try:  # permission bits do not tell (root, ACLs, read-only mounts): try it
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = "" if probe == out else f" (its nearest existing parent {probe} is not writable)"
        raise RecipeError(f"`output_dir`: cannot write to {out}{where}: {e.strerror}; choose a writable output_dir") from None


def _local_dir(spec) -> Path | None:
    src = spec.from_pretrained
    if src is None:
        return None
    path = Path(src).expanduser()
    return path if (looks_like_path(src) or path.exists()) else None


def check_model_files(name: str, spec) -> None:
    """A local `from_pretrained` directory: config.json is a JSON object, and its weight files are whole."""
    path = _local_dir(spec)
    if path is None:
        return
    key = f"`{name}.from_pretrained`"
    config = path / "config.json"
    try:
        loaded = json.loads(config.read_text())
    except ValueError as e:
        raise RecipeError(f"{key}: {config} is not valid JSON ({e}); restore it from the model's source") from None
    if not isinstance(loaded, dict):
        raise RecipeError(f"{key}: {config} holds a {type(loaded).__name__}, not a model config; restore it from the model's source")
    found = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not found:
        raise RecipeError(f"{key}: {path} has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
                          "save the model with save_pretrained, or fix the path")
    for shard in _shards(path, found[0], key):
        if shard.suffix == ".safetensors":
            _check_safetensors(shard, key)
        elif not shard.is_file() or shard.stat().st_size == 0:
            raise RecipeError(f"{key}: weight file {shard} is missing or empty; save or download the model again")


def _shards(path: Path, found: str, key: str) -> list[Path]:
    if not found.endswith(".index.json"):
        return [path / found]
    index = path / found
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise RecipeError(f"{key}: {index} is not a valid weight index ({e.__class__.__name__}: {e}); "
                          "save or download the model again") from None
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise RecipeError(f"{key}: {index} lists weight files that are not there: {missing}; save or download the model again")
    return [path / n for n in names]


def _check_safetensors(file: Path, key: str) -> None:
    """The header parses and the file is as long as the header says (a truncated copy is not)."""
    size = file.stat().st_size
    problem = None
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                problem = "its header is cut off"
            else:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end != size:
                    problem = f"it holds {size} bytes where its header describes {8 + n + end}"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        problem = f"its header does not parse ({e.__class__.__name__})"
    if problem:
        raise RecipeError(f"{key}: weight file {file} is truncated or corrupt ({problem}); save or download the model again")


def check_jsonl(key: str, source: str | None) -> None:
    """Every line of a local .jsonl file (or of the .jsonl files of a directory) is one JSON object."""
    if not source or not looks_like_path(source):
        return
    path = Path(source).expanduser()
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path] if path.suffix == ".jsonl" and path.is_file() else []
    for file in files:
        with open(file, "rb") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise RecipeError(f"`{key}`: {file} line {i} is not valid JSON ({e}); fix or delete that line") from None
                if not isinstance(row, dict):
                    raise RecipeError(f"`{key}`: {file} line {i} is a JSON {type(row).__name__}, not an object "
                                      '({"text": ...}); each line must be one record')


def param_shapes(model_config, model_class: str = "causal_lm") -> dict[str, tuple]:
    """Parameter name -> shape of a model built from `model_config` on the meta device (no memory)."""
    with torch.device("meta"):
        model = MODEL_CLASSES[model_class].from_config(model_config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def check_checkpoint_shapes(ckpt: Path, plans) -> None:
    """Each trainable role saved in `ckpt` has the shapes this run's model of that role has."""
    for name, plan in plans.items():
        saved = ckpt / name / "config.json"
        if not plan.spec.trainable or not saved.is_file():
            continue
        try:
            theirs = param_shapes(AutoConfig.from_pretrained(ckpt / name), plan.spec.model_class)
        except (OSError, ValueError) as e:
            raise RecipeError(f"`resume`: {saved} cannot be read ({e.__class__.__name__}); the checkpoint is damaged: "
                              "resume from another one (delete this step) or start afresh") from None
        ours = param_shapes(plan.model_config, plan.spec.model_class)
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            shown = ", ".join(f"{k}: {theirs.get(k)} -> {ours.get(k)}" for k in diff[:3])
            raise RecipeError(f"`resume`: {ckpt} holds a `{name}` of another shape than this run's ({shown}"
                              f"{', ...' if len(diff) > 3 else ''}): resume with the model it was trained with, or start "
                              "a new run (another output_dir, or overwrite=true without --resume)")
