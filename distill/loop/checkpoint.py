"""Checkpoints of a run: complete on every rank, or not there at all.

Layout under `<output_dir>/checkpoints/`:

    step_00000040/
        <role>/state/...        DeepSpeed state of each trainable role (weights, optimizer), per rank
        <role>/scheduler.json   our learning-rate scheduler
        <role>/config.json, tokenizer files   so `distill.export` can rebuild the model
        <role>/lora.json        a LoRA role's adapter settings (the state holds base + adapter)
        rng_rank<r>.pt          each rank's torch RNG states (tensors only)
        recipe.yaml             the recipe the run was started with
        trainer_state.json      step, world size, tokens seen; written last
    latest                      name of the newest complete checkpoint

A checkpoint is written into `.partial-step_N/` and renamed to `step_N/` by rank 0 only after every
rank has finished writing, so a crash mid-write leaves the previous checkpoint as `latest`. Frozen
roles are not saved: they are reloaded from their source, which `trainer_state.json` records.

Machines that do not share the run directory (`distill.loop.rundir.RunDisk`) each keep a complete copy of every
checkpoint on their own disk: their ranks' shards, and the files rank 0 would write. The first rank of each
machine renames its copy, and `latest` moves on any machine only once every machine has renamed its copy.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
import yaml

from distill.config.errors import RecipeError
from distill.models.lora import write_spec
from distill.models.tokenizer_files import save_tokenizer
from distill.runtime.compat import deepspeed_checkpoint_classes

STATE_FILE = "trainer_state.json"


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = checkpoint_dir(out)
    try:
        name = (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    if step_of(name) is None:  # it names a directory beside it, nothing else
        return None
    path = root / name
    return path if (path / STATE_FILE).is_file() else None


def step_of(name: str) -> int | None:
    """The step of a checkpoint directory's name (`step_00000040` -> 40), or None for any other name."""
    match = re.fullmatch(r"step_(\d+)", name)
    return int(match.group(1)) if match else None


def save_checkpoint(trainer, step: int, tokens_seen: int) -> Path:
    """Collective: every rank must call it at the same step."""
    acc, root, commits = trainer.accelerator, checkpoint_dir(trainer.out), trainer.disk.commits
    final, partial = root / f"step_{step:08d}", root / f".partial-step_{step:08d}"
    if commits:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    for role in trainer.models.values():
        if not role.trainable:
            continue
        with trainer.manager.use(role.name):
            role.engine.save_checkpoint(str(partial / role.name), tag="state")
        if commits:
            (partial / role.name / "scheduler.json").write_text(json.dumps(role.scheduler.state_dict()))
            role.module.config.save_pretrained(partial / role.name)
            if role.plan.spec.lora is not None:
                write_spec(partial / role.name, role.plan.spec.lora, base=role.plan.spec.from_pretrained)
            save_tokenizer(trainer.tokenizer, partial / role.name)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, partial / f"rng_rank{trainer.rank}.pt")
    (partial / f"python_rng_rank{trainer.rank}.json").write_text(json.dumps(random.getstate()))
    acc.wait_for_everyone()
    if commits:
        frozen = {n: m.plan.spec.from_pretrained or "config" for n, m in trainer.models.items() if not m.trainable}
        state = {"step": step, "world_size": trainer.world_size, "tokens_seen": tokens_seen, "frozen_roles": frozen}
        (partial / "recipe.yaml").write_text(yaml.safe_dump(trainer.recipe.model_dump(mode="json"), sort_keys=False))
        (partial / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    if not trainer.disk.shared:
        acc.wait_for_everyone()  # every machine's copy is complete before any machine's `latest` names it
    if commits:
        tmp = root / ".latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, root / "latest")
        prune_checkpoints(root, step, keep=trainer.recipe.train.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest checkpoints by step number, the one of `step` among them. Any of a later step is
    from a timeline this run has left (it resumed from an earlier one) and goes too."""
    done = sorted((step_of(p.name), p) for p in root.glob("step_*")
                  if step_of(p.name) is not None and (p / STATE_FILE).is_file())
    later, kept = [p for s, p in done if s > step], [p for s, p in done if s <= step]
    for old in later + kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(trainer, path: Path) -> dict:
    """Restore every trainable role, its scheduler and this rank's RNG; returns trainer_state.json."""
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != trainer.world_size:
        raise RecipeError(f"checkpoint {path} was written by {state['world_size']} processes and this run has "
                          f"{trainer.world_size}: resume with launch.num_processes={state['world_size']} "
                          f"(or export it with `python -m distill.export` and start a new run from the export)")
    for role in trainer.models.values():
        if not role.trainable:
            continue
        with trainer.manager.use(role.name), safe_torch_load():
            loaded, _ = role.engine.load_checkpoint(str(path / role.name), tag="state")
        if loaded is None:
            raise RecipeError(f"checkpoint {path} has no state for role `{role.name}`")
        role.scheduler.load_state_dict(json.loads((path / role.name / "scheduler.json").read_text()))
    rng = torch.load(path / f"rng_rank{trainer.rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    py = json.loads((path / f"python_rng_rank{trainer.rank}.json").read_text())
    random.setstate((py[0], tuple(py[1]), py[2]))
    return state


@contextlib.contextmanager
def safe_torch_load():
    """Within the block, every `torch.load` (DeepSpeed's, zero_to_fp32's) reads with `weights_only=True`: tensors,
    containers and the records DeepSpeed pickles (`compat.DEEPSPEED_PICKLED`) only, so a tampered checkpoint file cannot run code. A file holding anything
    else is refused with a RecipeError naming it."""
    classes = deepspeed_checkpoint_classes()
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            parts = [p.strip() for p in str(e).split("\n\n") if p.strip()]
            reason = next((p for p in parts if "GLOBAL" in p or "Unsupported" in p), parts[1] if len(parts) > 1 else "")
            raise RecipeError(f"checkpoint file {f} holds objects other than tensors and DeepSpeed's checkpoint records "
                              f"({reason}); it was not written by distill as it is now, so it is not loaded. Use a run "
                              "directory you trust (docs/reliability.md)") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(classes):
            yield
    finally:
        torch.load = original
