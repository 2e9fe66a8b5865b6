"""A run directory belongs to one run: a lock for the run's life, `overwrite` that clears the earlier run,
and `--resume` that continues only the run whose checkpoint it is.

The lock is an exclusive `flock` on `<output_dir>/.distill.lock`, held by the process that launches the
run (the one that runs the preflight checks) until it exits; the kernel drops it when that process dies,
so a lock left behind by a killed run is no obstacle. The file names the holder (host, pid, command) for
the message another run gets. Processes started by the holder (the ranks of `python -m distill.train`)
find its token in the environment and run under its lock.
"""
from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

import yaml

from distill.config.errors import RecipeError

LOCK_FILE = ".distill.lock"
TOKEN_ENV = "DISTILL_RUN_LOCK"
"""The holder's token, inherited by the processes it starts."""
RUN_ENTRIES = ("recipe.yaml", "metrics.jsonl", "summary.json", "eval_before.json", "reference_logps.safetensors",
               "checkpoints", "final", "tensorboard", "wandb", "report")
"""What a run writes into its directory; `overwrite` deletes exactly these."""
NO_EFFECT = ("output_dir", "overwrite", "resume", "resume_allow", "launch.*", "train.progress", "train.log_every",
             "train.eval_every", "train.eval_batches", "train.save_every", "train.keep_checkpoints", "train.report_to",
             "train.max_bad_steps", "train.overlap_frozen", "*.compile", "*.optimizer.fused")
"""Recipe keys that do not change what a run computes (logging, speed, where it writes); a resume may change
them freely. The world size is checked on its own."""

_held: dict[str, int] = {}  # resolved output_dir -> open descriptor holding its flock, in this process


def _forget_held_locks() -> None:
    # A forked child (a rank `relaunch` forks) shares the descriptors, and with them the flock: kept open, the lock
    # would outlive the launcher that took it. Closing the child's copies leaves the launcher's lock held.
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_held_locks)


def lock_run_dir(out: Path) -> None:
    """Hold the run directory's lock for the life of this process (idempotent), or raise RecipeError naming
    the run that holds it. Creates the directory."""
    key = str(out.resolve())
    if key in _held:
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _read_holder(path)
        if holder.get("token") and holder["token"] == os.environ.get(TOKEN_ENV):
            return  # our own launcher holds it
        raise RecipeError(f"`output_dir`: {out} is in use by another run ({_describe(holder)}); wait for it to end, "
                          "stop it, or choose another output_dir") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"distill: warning: the file system of {out} does not support locks; nothing stops a second run from "
              "writing this run directory at the same time", file=sys.stderr)
        return
    token = uuid.uuid4().hex
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                              "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "command": " ".join(sys.argv)}).encode(), 0)
    _held[key] = fd
    os.environ[TOKEN_ENV] = token


def release_run_dir(out: Path) -> None:
    """Give up the lock taken by `lock_run_dir` in this process, if any."""
    fd = _held.pop(str(out.resolve()), None)
    if fd is None:
        return
    os.ftruncate(fd, 0)  # the token must not vouch for processes started later
    os.close(fd)
    os.environ.pop(TOKEN_ENV, None)


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "its holder wrote no details"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}: {holder.get('command')}"


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in RUN_ENTRIES)


def clear_run(out: Path) -> list[str]:
    """Delete what an earlier run wrote into `out` (RUN_ENTRIES); returns the names deleted."""
    gone = []
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        gone.append(name)
    return gone


# -- resume identity ---------------------------------------------------------------------------
def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _covered(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


def recipe_changes(saved: dict, current: dict, allow: list[str]) -> dict[str, tuple]:
    """Keys whose values differ between a checkpoint's recipe and this one and change the result, minus
    those in `allow`: key -> (checkpoint's value, this recipe's value). `<absent>` marks a missing key; a key
    the checkpoint's recipe lacks and this one leaves null is no change (a key added since, at its default)."""
    a, b = _flat(saved), _flat(current)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>") and not (k not in a and b[k] is None)
            and not _covered(k, NO_EFFECT) and not _covered(k, allow)}


def check_resume_identity(ckpt: Path, recipe) -> None:
    """Refuse to continue the checkpoint of another run: one whose recipe differs in a key that changes the result."""
    current = recipe.model_dump(mode="json")
    known = _flat(current)
    unknown = [p for p in recipe.resume_allow if p != "*" and not any(_covered(k, [p]) for k in known)]
    if unknown:
        raise RecipeError(f"`resume_allow`: {unknown} name no recipe key; write dotted keys such as train.max_steps")
    if "*" in recipe.resume_allow:
        return
    try:
        saved = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"`resume`: {ckpt} has no readable recipe.yaml ({e.__class__.__name__}), so it cannot be "
                          "matched to this run; resume with resume_allow=['*'] if it is this run's") from None
    changes = recipe_changes(saved if isinstance(saved, dict) else {}, current, recipe.resume_allow)
    if changes:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        keys = ",".join(changes)
        raise RecipeError(f"`resume`: {ckpt} belongs to a run whose recipe differs in {len(changes)} key(s) that change "
                          f"the result: {listed}. Resuming would continue that other run. Start a new run instead "
                          f"(another output_dir, or overwrite=true without --resume), or, if the change is deliberate "
                          f"(e.g. more steps), allow it: resume_allow=[{keys}]")


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step`: a resumed run logs the later steps again."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class RunDisk:
    """Whether every process of the run writes the same run directory (one file system all machines share) or
    each machine its own (local disks, no shared file system), and whether this process commits checkpoints.

    Shared: global rank 0 commits each checkpoint for everyone. Local disks: the first rank of each machine
    commits its machine's copy, which holds its own ranks' shards and the files every rank needs, so that
    `--resume` finds a complete checkpoint on each machine's disk."""

    def __init__(self, shared: bool, commits: bool):
        self.shared, self.commits = shared, commits


def probe_run_disk(out: Path) -> RunDisk:
    """Collective, under a started process group of several processes (else one process writes, and commits): each
    rank leaves a file in `out`, and the ranks compare which of them they can all see."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        # No group yet (a script that lets the trainer start it): the machine of rank 0 holds the run directory.
        return RunDisk(shared=True, commits=int(os.environ.get("RANK", 0)) == 0)
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [uuid.uuid4().hex]
    dist.broadcast_object_list(token, src=0)
    out.mkdir(parents=True, exist_ok=True)
    mine = out / f".distill-probe-{token[0]}-{rank}"
    mine.touch()
    dist.barrier()
    seen = sorted(int(p.name.rsplit("-", 1)[1]) for p in out.glob(f".distill-probe-{token[0]}-*"))
    views: list = [None] * world
    dist.all_gather_object(views, seen)
    mine.unlink(missing_ok=True)
    if all(v == list(range(world)) for v in views):
        return RunDisk(shared=True, commits=rank == 0)
    if any(views[s] != v for v in views for s in v):  # some ranks see part of a machine's files: no clear split
        raise RecipeError(f"`output_dir`: the ranks see different parts of {out} ({views}); put it on one file "
                          "system that every machine shares, or on each machine's own disk, the same path on each")
    return RunDisk(shared=False, commits=rank == seen[0])
