"""Processes: who we are, and starting N of us through accelerate's launcher when asked."""
from __future__ import annotations

import logging
import os
import socket
import sys


def world_info() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    """True inside a process started by accelerate launch, torchrun or deepspeed."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def leave(code: int) -> None:
    """Exit with `code`; a process that started DeepSpeed (`launched()`) skips interpreter finalization.

    Finalization races C++ threads (gloo's, DeepSpeed's) against Python's teardown: now and then a rank
    aborted there with "terminate called without an active exception", after its run had finished and
    written everything, and the launcher reported the whole run as failed. Files are closed by now
    (metrics are appended line by line, trackers finished by the trainer); the streams are flushed here."""
    if not launched():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def single_process_env() -> None:
    """Describe a world of one process, so DeepSpeed can start its process group without a launcher."""
    if launched():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(num_processes: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv` in `num_processes` processes on this node via `accelerate launch`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args([
        "--num_processes", str(num_processes), "--num_machines", "1", "--use_deepspeed",
        "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        "--module", module, *argv,
    ])
    try:
        launch_command(args)
    except SystemExit as e:  # accelerate exits with the failing rank's code
        return int(e.code or 0)
    except Exception as e:  # a rank failed: its traceback is already on stderr
        print(f"distill: launch failed: {e}", file=sys.stderr)
        return 1
    return 0
