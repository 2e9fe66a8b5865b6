"""Processes: who we are, and starting N of us through accelerate's launcher when asked."""
from __future__ import annotations

import logging
import os
import socket
import sys

from distill.config.errors import RecipeError
from distill.runtime.compat import can_fork_ranks, forked_ranks, in_forked_rank


def world_info() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    """True inside a process started by accelerate launch, torchrun or deepspeed."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


START_ENV = "DISTILL_RANK_START"
"""`fork` (default): `relaunch` forks the ranks from the launching process, which has imported the stack already;
`spawn`: each rank starts a fresh interpreter, as `accelerate launch` does. The ranks also start fresh where the
ranks see a GPU or forking is unsafe (another thread running, CUDA started): `compat.can_fork_ranks`."""

_STARTED_PLAIN = not launched()  # read once: a single process sets the launcher's variables when it starts DeepSpeed


def started_plain() -> bool:
    """Whether this process started without a launcher around it (a user's script, `python -m distill.train`); a
    rank `relaunch` forked from such a process did not, though it inherits this module as the process had it."""
    return _STARTED_PLAIN and not in_forked_rank()


EXIT_DIR_ENV = "DISTILL_EXIT_DIR"
"""Set by `relaunch`: each rank leaves its exit status there, for when the launcher does not report it."""


def record_exit(code: int) -> None:
    """Leave this rank's exit status where the launching process reads it (`relaunch`), if it asked."""
    where = os.environ.get(EXIT_DIR_ENV)
    if where and launched():
        try:
            with open(os.path.join(where, f"rank{world_info()[0]}"), "w") as f:
                f.write(str(code))
        except OSError:
            pass


def leave(code: int) -> None:
    """Exit with `code`; a process that started DeepSpeed (`launched()`) skips interpreter finalization.

    Finalization races C++ threads (gloo's, DeepSpeed's) against Python's teardown: now and then a rank
    aborted there with "terminate called without an active exception", after its run had finished and
    written everything, and the launcher reported the whole run as failed. Files are closed by now
    (metrics are appended line by line, trackers finished by the trainer); the streams are flushed here."""
    if not launched():
        sys.exit(code)
    record_exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if in_forked_rank():
        raise SystemExit(code)  # to `compat.run_forked_rank`, which returns to the launcher or exits with the code
    os._exit(code)


DEVICE_ENV = "DISTILL_DEVICE"
"""Where the run's processes compute and why (`place_processes`), handed from the launching process to its ranks."""


def visible_gpus() -> int:
    """GPUs this process may use. torch counts them through NVML where it can, without starting CUDA, so
    `place_processes` can still hide them from this process afterwards."""
    import torch

    return torch.cuda.device_count()


def place_processes(device: str, processes: int, *, apply: bool = True) -> str:
    """Choose where `processes` processes on this machine compute (`launch.device`), hide the GPUs when that is the
    CPU (`apply`), and say so in one line for the roles table. A machine with too few GPUs for `cuda` is refused."""
    if launched() and os.environ.get(DEVICE_ENV):
        return os.environ[DEVICE_ENV]  # chosen by the process that launched this one, which set up the GPUs for it
    gpus = visible_gpus()
    procs = f"{processes} process{'' if processes == 1 else 'es'}"
    seen = ("no GPU" if not gpus else f"{gpus} GPU{'' if gpus == 1 else 's'}") + " visible" + (
        f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})" if "CUDA_VISIBLE_DEVICES" in os.environ else "")
    if device == "cuda" and gpus < processes:
        where = ("`launch.num_processes` is " if not launched() else "this machine's launcher starts ") + str(processes)
        fix = (f"set launch.num_processes={gpus}" if not launched() else f"launch {gpus} processes per machine") if gpus else \
            "run it on a machine with a GPU"
        raise RecipeError(f"`launch.device: cuda` needs one GPU per process: {where}, and {seen}; {fix}, "
                          "or set launch.device=cpu (or auto) to run on the CPU")
    on_gpu = device == "cuda" or (device == "auto" and 0 < processes <= gpus)
    if on_gpu:
        note = f"cuda: one GPU per process ({procs}, {seen})"
    elif not gpus:
        note = f"cpu: {seen}"
    elif device == "cpu":
        note = f"cpu: launch.device is cpu ({seen}, hidden from the run)"
    else:
        note = (f"cpu: {procs} and {seen}, so launch.device auto chose the CPU and hid the GPUs from the run "
                f"(launch.num_processes={gpus} runs on the GPUs; launch.device=cuda refuses to start instead)")
    if apply:
        if not on_gpu and gpus:
            hide_gpus()
        os.environ[DEVICE_ENV] = note
    return note


def use_compile_cache(where: str | None) -> None:
    """Point torch's compile caches at `where` (`launch.compile_cache`) for this process and the ones it starts,
    unless TORCHINDUCTOR_CACHE_DIR is set already. torch reads it at each compile, so this precedes the first one."""
    if where is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser(where))


def hide_gpus() -> None:
    """Make CUDA invisible to this process and the processes it starts."""
    import torch

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if not torch.cuda.is_available():
        return
    # CUDA had been started in this process before the variable was set: only a fresh interpreter sees it. A
    # `distill.train` process starts afresh (exec keeps the process id, so an outside launcher still watches the
    # same rank); any other program (a notebook, your script) is told, not replaced.
    argv = sys.orig_argv
    if not any(a == "-m" and b == "distill.train" for a, b in zip(argv, argv[1:])):
        raise RecipeError("`launch.device`: the run is to use the CPU, but CUDA already started in this process; "
                          "start it with CUDA_VISIBLE_DEVICES= set, or set launch.device=cuda")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def single_process_env() -> None:
    """Describe a world of one process, so DeepSpeed can start its process group without a launcher."""
    if launched():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now: the rendezvous port of a launch on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(num_processes: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` in `num_processes` processes on this node via `accelerate launch`.

    Returns the run's exit status: that of the rank that failed first (128 + N for a rank killed by signal N),
    or, when this process was signalled (SIGTERM, Ctrl-C) and passed the signal on, that of the ranks, which
    stop after a checkpoint with 0."""
    import contextlib
    import shutil
    import signal
    import tempfile

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args([
        "--num_processes", str(num_processes), "--num_machines", "1", "--use_deepspeed",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        "--module", module, *argv,
    ])
    exits = tempfile.mkdtemp(prefix="distill-exit-")
    os.environ[EXIT_DIR_ENV] = exits
    fork = os.environ.get(START_ENV, "fork") != "spawn" and can_fork_ranks()
    if fork:
        print(f"distill: {num_processes} ranks forked from this process, which has imported the stack "
              f"({START_ENV}=spawn starts fresh interpreters)", file=sys.stderr)
    try:
        with forked_ranks() if fork else contextlib.nullcontext():
            launch_command(args)
    except SystemExit as e:
        code = int(e.code or 0)
        # accelerate >= 1.16 catches the signal this process passed on to the ranks and exits 128 + N (130 for
        # Ctrl-C); the ranks still say how they ended, as with the SignalException that earlier versions let through.
        return _ranks_status(exits, num_processes, code) if code > 128 else code
    except ChildFailedError as e:  # per-rank statuses; accelerate would turn them all into 1
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else
               f"exited with status {code}")
        print(f"distill: the run stopped: rank {rank} {how} first (its message, if it could say one, is above)",
              file=sys.stderr)
        return code
    except SignalException as e:  # this process was signalled and signalled the ranks; they say how they ended
        return _ranks_status(exits, num_processes, 128 + int(e.sigval))
    except Exception as e:
        print(f"distill: launch failed: {e}", file=sys.stderr)
        return 1
    finally:
        os.environ.pop(EXIT_DIR_ENV, None)
        shutil.rmtree(exits, ignore_errors=True)
    return 0


def _ranks_status(exits: str, num_processes: int, signalled: int) -> int:
    """The job's status after this process was signalled and passed the signal on: the first failing rank's, 0
    when every rank left a 0 (each stops after its checkpoint), else `signalled` (some rank said nothing)."""
    codes = {}
    for rank in range(num_processes):
        try:
            with open(os.path.join(exits, f"rank{rank}")) as f:
                codes[rank] = int(f.read())
        except (OSError, ValueError):
            pass
    failed = [c for _, c in sorted(codes.items()) if c != 0]
    if failed:
        return failed[0]
    return 0 if len(codes) == num_processes else signalled
