"""Ranks that fail together: each failing rank says why, and the others stop within seconds.

Under a launcher with several processes, `distill.train` joins the process group before anything else
(`join`), so that a failure anywhere (a recipe or data error on one machine, an exception in one rank) can
be told to every rank through the group's key-value store, which spans the machines: the failing rank
writes its rank, host, exit status and reason there and exits. A watchdog thread in every rank reads the
store every second and ends its rank with the same status when another rank failed, when the store is
gone (the process or machine holding it ended the job), or when the rank's own launcher died (a launcher
killed with SIGKILL cannot stop its ranks itself).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading

import torch
import torch.distributed as dist

from distill.runtime.launch import launched, record_exit, world_info

FAILED_KEY = "distill/failed"
POLL_S = 1.0
"""Seconds between two looks at the store."""
LOST_AFTER = 3
"""Looks in a row without an answer from the store before a rank gives up on the job."""
STORE_GONE = "the job's store (MASTER_ADDR:MASTER_PORT) is gone, so the job ended elsewhere; stopping"


def where() -> str:
    """`distill: rank R (host)` under a launcher with several processes, else `distill`."""
    rank, world = world_info()
    return f"distill: rank {rank} ({socket.gethostname()})" if launched() and world > 1 else "distill"


class Watch:
    """The watchdog of one rank, and its way to tell the others it failed."""

    def __init__(self, store, rank: int):
        self._store, self.rank = store, rank
        self._local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # The launchers that start ranks as their children: torchrun (and accelerate, plain distill) and deepspeed's.
        # A rank started by hand from a shell may outlive that shell on purpose.
        self._parent = os.getppid() if {"TORCHELASTIC_RUN_ID", "CROSS_RANK"} & set(os.environ) else None
        self._stop = threading.Event()
        self._stopping = threading.Lock()  # held while the watchdog ends the rank: `stop` then waits for the exit
        self._thread = threading.Thread(target=self._run, name="distill-watch", daemon=True)
        self._thread.start()

    def publish(self, code: int, reason: str) -> dict | None:
        """Tell every rank this one failed; returns the failure that was told first (this one or another's)."""
        mine = json.dumps({"rank": self.rank, "host": socket.gethostname(), "code": code, "reason": reason})
        try:
            first = self._store.compare_set(FAILED_KEY, "", mine)
        except Exception:  # the store is gone: the launcher is ending the job anyway
            return None
        return json.loads(first.decode() if isinstance(first, bytes) else first)

    def stop(self) -> None:
        """No more watching: this rank ends on its own (after the last collective, or to say why it failed)."""
        with self._stopping:
            self._stop.set()

    def cause(self) -> tuple[int, str] | None:
        """(exit status, why) when this rank must stop for something outside it: another rank failed, its
        launcher is gone, or the store is; None while the job goes on."""
        if self._parent is not None and os.getppid() != self._parent:
            return 1, f"its launcher (pid {self._parent}) is gone; stopping"
        try:
            if not self._store.check([FAILED_KEY]):
                return None
            info = json.loads(self._store.get(FAILED_KEY))
        except Exception:
            return 1, STORE_GONE
        if info["rank"] == self.rank:
            return None
        return int(info["code"]), f"stopping: rank {info['rank']} ({info['host']}) failed (exit status {info['code']})"

    def end(self, code: int, why: str) -> None:
        """Leave now with `code`, saying why once per machine (the failed rank said its own reason)."""
        if self._local_rank == 0:
            print(f"{where()}: {why}", file=sys.stderr, flush=True)
        record_exit(code)
        sys.stdout.flush()
        os._exit(code)

    def _run(self) -> None:
        lost = 0
        while not self._stop.wait(POLL_S):
            found = self.cause()
            if found is None or self._stop.is_set():
                lost = 0
                continue
            lost = lost + 1 if found[1] == STORE_GONE else LOST_AFTER
            if lost >= LOST_AFTER:  # the store may miss a look; a failure or a lost launcher ends the rank at once
                with self._stopping:
                    if not self._stop.is_set():
                        self.end(*found)


def join(timeout_s: int) -> Watch:
    """Start the process group (the one accelerate and DeepSpeed then use) and this rank's watchdog."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Watch(dist.distributed_c10d._get_default_store(), dist.get_rank())


def report_failure(watch: Watch | None, code: int, message: str) -> None:
    """Print this rank's reason (once per distinct reason among failing ranks) and tell the others."""
    if watch is not None:
        watch.stop()  # this rank says its own reason, even when another rank failed first
    first = watch.publish(code, message.splitlines()[0] if message else "") if watch is not None else None
    if first is not None and first["rank"] != watch.rank and first["reason"] == (message.splitlines() or [""])[0]:
        return  # another rank failed first for the same reason and said it
    print(f"{where()}: {message}", file=sys.stderr, flush=True)
