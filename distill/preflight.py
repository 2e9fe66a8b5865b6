"""Everything a run checks before it loads a weight.

Called once by the launching process (so a bad recipe fails once, not once per rank) and again by
each rank. Every failure is a RecipeError naming the recipe key and the fix. The file-level checks
(output directory, model files, data lines, vocabulary sizes) are in distill/checks.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from distill.checkpoint import latest_checkpoint
from distill.checks import check_checkpoint_shapes, check_jsonl, check_model_files, check_output_dir
from distill.data.loading import ensure_synthetic
from distill.data.packing import PACKING_ATTENTION
from distill.data.text import load_dataset_source, looks_like_path
from distill.errors import RecipeError
from distill.launch import launched, world_info
from distill.models import check_model_source, load_model_config
from distill.plan import plan_roles
from distill.recipe import Role
from distill.rundir import check_resume_identity, clear_run, holds_run, lock_run_dir
from distill.tokenizer_files import PROBE_TEXTS, tokenizer_difference
from distill.tracking import check_installed


def preflight(recipe, trainer_cls, *, world_size: int, dry_run: bool = False, owner: bool | None = None):
    """Every check that needs no process and no weights: output dir, trackers, data paths, tokenizer, role plans.

    Outside a dry run, the process that owns the run directory (`owner`; by default the launching one, or rank 0
    under an outside launcher; one per machine where machines do not share it) then takes its lock and deletes an
    earlier run there (`overwrite`)."""
    out = Path(recipe.output_dir)
    check_output_dir(out)
    ckpt = latest_checkpoint(out) if recipe.resume else None
    if recipe.resume is True and ckpt is None:
        raise RecipeError(f"`resume: true`: {recipe.output_dir} has no complete checkpoint; start without --resume "
                          "(or set `resume: auto` to resume only when there is one)")
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        written = state["world_size"]
        if written != world_size:
            raise RecipeError(f"`resume`: {ckpt} was written by {written} processes, this run has {world_size}: "
                              f"set launch.num_processes={written} (or export it and start a new run from the export)")
        check_resume_identity(ckpt, recipe)
        last = recipe.train.max_steps
        if last is not None and state["step"] > last:  # with `epochs`, the trainer checks once the data is counted
            raise RecipeError(f"`resume`: {ckpt} is at step {state['step']}, past this run's last step "
                              f"(train.max_steps={last}): export it (`python -m distill.export`), or resume with more steps")
    check_installed(recipe.train.report_to)
    check_data(recipe, trainer_cls, dry_run=dry_run)
    for name in trainer_cls.roles:  # before the tokenizer, which defaults to a role's directory
        check_model_source(name, getattr(recipe, name))
    for name in trainer_cls.built_roles(recipe):
        check_model_files(name, getattr(recipe, name))
    tokenizer = load_tokenizer(recipe, trainer_cls.roles)
    if recipe.data.packing:
        check_packing_attention({n: getattr(recipe, n) for n in trainer_cls.built_roles(recipe)}, len(tokenizer))
    plans = plan_roles(recipe, trainer_cls, world_size=world_size, vocab_size=len(tokenizer))
    check_sizes(recipe, plans, tokenizer)
    trainer_cls.check_plans(recipe, plans)  # first: it may set keys of a plan's config (a new head's outputs)
    if ckpt is not None:
        check_checkpoint_shapes(ckpt, plans)
    if not dry_run and (owner if owner is not None else world_info()[0] == 0):
        lock_run_dir(out)  # only now: a run refused above leaves no trace
        if ckpt is None and holds_run(out):
            if not (recipe.overwrite or recipe.resume == "auto"):
                raise RecipeError(f"`output_dir`: {out} already holds a run; continue it with --resume, choose another "
                                  "output_dir, or set overwrite=true (which deletes it)")
            gone = clear_run(out)  # every check passed: only now is the earlier run deleted
            print(f"distill: overwrite: deleted the earlier run in {out} ({', '.join(gone)})")
    return tokenizer, plans


def reads_run_tokens(spec: Role) -> bool:
    """Whether a role reads the run's token ids: a causal LM, or a trainable sequence classifier (a reward model in
    training). A frozen classifier (GRPO's reward role) may bring its own tokenizer: its trainer gives it text."""
    return spec.model_class == "causal_lm" or spec.trainable


def check_data(recipe, trainer_cls, *, dry_run: bool = False) -> None:
    """The synthetic data written if the recipe asks for it (`data.synthetic_seed`), and `data.train` / `data.eval`
    there; their lines parse (once per run)."""
    ensure_synthetic(recipe, trainer_cls.write_synthetic)
    d = recipe.data
    for key, path in (("data.train", d.train), ("data.eval", d.eval)):
        if path and looks_like_path(path) and not Path(path).expanduser().exists():
            raise RecipeError(f"`{key}`: `{path}` does not exist: point it at your data, or set `data.synthetic_seed: 0` "
                              f"to have the `{recipe.trainer}` trainer write its synthetic data to {Path(path).parent} "
                              "(only when that directory does not exist)")
        if dry_run or not launched():  # once per run: the ranks read the data through `datasets`, which says it too
            check_jsonl(key, path)


def load_tokenizer(recipe, roles: dict[str, Role]):
    """The data tokenizer; every pretrained role that reads the run's tokens (`reads_run_tokens`) and ships a
    tokenizer must tokenize sample texts as it does."""
    readers = [n for n in roles if reads_run_tokens(getattr(recipe, n))]
    sources = [getattr(recipe, n).from_pretrained for n in readers if getattr(recipe, n).from_pretrained]
    # A local model directory without tokenizer files (a student saved from a config) is passed over.
    shipped = [s for s in sources if not looks_like_path(s) or _has_tokenizer(s)]
    path = recipe.data.tokenizer or (shipped or sources or [None])[0]
    if path is None:
        raise RecipeError("`data.tokenizer`: no role is loaded from_pretrained, so name a tokenizer directory")
    key = "data.tokenizer" if recipe.data.tokenizer else next(f"{n}.from_pretrained" for n in roles
                                                            if getattr(recipe, n).from_pretrained == path)
    if looks_like_path(path) and not Path(path).exists():
        raise RecipeError(f"`{key}`: `{path}` does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"`{key}`: no tokenizer could be loaded from `{path}` ({e.__class__.__name__}); "
                          "set `data.tokenizer` to a tokenizer directory") from None
    for name in readers:
        src = getattr(recipe, name).from_pretrained
        if src and src != path and _has_tokenizer(src):
            other = AutoTokenizer.from_pretrained(src)
            why = tokenizer_difference(tok, other, sample_texts(recipe.data))
            if why:
                raise RecipeError(
                    f"the tokenizer in `{name}.from_pretrained` ({src}, loaded as {type(other).__name__}) differs from "
                    f"`{key}` ({path}, loaded as {type(tok).__name__}): {why}. Roles must share one tokenizer (token ids "
                    "are compared position by position). transformers chooses the tokenizer class of some model types "
                    "(qwen2, phi3, ...) from config.json, whatever tokenizer_config.json says: if that directory should "
                    "not carry a tokenizer (a model not trained with it yet), delete its tokenizer files; otherwise "
                    "set `data.tokenizer` to the tokenizer the models were trained with")
    return tok


def _has_tokenizer(directory: str) -> bool:
    return any((Path(directory).expanduser() / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def sample_texts(data, limit: int = 32) -> list[str]:
    """`PROBE_TEXTS` and the strings of the first records of `data.train` when it is a local .jsonl file or a
    `datasets.Dataset`."""
    texts = list(PROBE_TEXTS)
    if not isinstance(data.train, str):  # a dataset given from Python
        try:
            ds = load_dataset_source(data.train, split=data.train_split)
        except ValueError:  # said with its key where the data is read
            return texts
        return texts + [s for row in ds.select(range(min(limit, len(ds)))) for s in _strings(row)]
    path = Path(data.train).expanduser()
    if path.suffix.lower() == ".jsonl" and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            for line, _ in zip(f, range(limit)):
                try:
                    texts += _strings(json.loads(line))
                except json.JSONDecodeError:
                    break
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for v in items for s in _strings(v)]


def check_sizes(recipe, plans, tokenizer) -> None:
    """Sizes that pass every other check and then fail on every rank at the first forward (an IndexError deep in
    an embedding): a vocabulary smaller than the tokenizer's, `data.max_length` past a model's positions. Roles that
    read the run's tokens only (`reads_run_tokens`)."""
    n_tokens = len(tokenizer)
    for name, plan in plans.items():
        spec, cfg = plan.spec, plan.model_config
        if not reads_run_tokens(spec):
            continue
        where = f"`{name}.from_pretrained` ({spec.from_pretrained}/config.json)" if spec.from_pretrained else f"`{name}.config`"
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int) and vocab < n_tokens:
            raise RecipeError(f"{where} has vocab_size {vocab}, but the tokenizer has {n_tokens} tokens: ids up to "
                              f"{n_tokens - 1} would index past `{name}`'s embeddings. Use the tokenizer `{name}` was "
                              f"trained with (`data.tokenizer`), or a model with vocab_size >= {n_tokens}")
        positions = getattr(cfg, "max_position_embeddings", None)
        if isinstance(positions, int) and recipe.data.max_length > positions:
            raise RecipeError(f"`data.max_length: {recipe.data.max_length}` is longer than {where} allows "
                              f"(max_position_embeddings {positions}): lower data.max_length to {positions}, or give "
                              f"`{name}` a config with more positions")


def check_packing_attention(roles: dict[str, Any], vocab_size: int | None) -> None:
    """Refuse roles (name -> `Role`) whose attention implementation would let packed documents see each other.

    Read from the model configs alone, before any model is built (a flash-attention model cannot even be
    sized where the kernels are not installed)."""
    for name, spec in roles.items():
        impl = getattr(load_model_config(name, spec, vocab_size), "_attn_implementation", None)
        if impl is not None and impl not in PACKING_ATTENTION:
            where = (f"`{name}.config.attn_implementation: sdpa`" if spec.config is not None else
                     f"`attn_implementation: sdpa` in {spec.from_pretrained}/config.json")
            raise RecipeError(f"`data.packing: true` needs attention that keeps packed documents apart "
                              f"({', '.join(PACKING_ATTENTION)}); `{name}` uses {impl}: set {where}, or `data.packing: false`")
