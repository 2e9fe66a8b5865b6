"""What the training loop watches: throughput, stop signals, NaN/Inf steps, and the before/after table."""
from __future__ import annotations

import math
import signal
import time
from typing import Any

import psutil


class NonFiniteLoss(RuntimeError):
    """Too many steps in a row with a NaN/Inf loss; raised on every rank at the same step."""


class Throughput:
    """Tokens the run trained on (all ranks) and how long its steps took, counted by this launch.

    The first step of a launch pays its start-up (compiling, capturing graphs), and the process's loading
    before it: both are reported apart (`startup`). Rates count the time inside training steps only (not
    evaluation or checkpoints) and leave the launch's first step out: `window_rate` over the steps since it was
    last asked, `steady_rate` over the whole launch."""

    def __init__(self, seen: int = 0):
        self.seen, self.steps = seen, 0
        self._t0 = time.perf_counter()
        self._process_start = psutil.Process().create_time()
        self.startup_s = self.first_step_s = None
        self._startup_logged = False
        self._window = [0, 0.0]  # tokens, seconds since `window_rate` was last asked
        self._steady = [0, 0.0]  # tokens, seconds over the launch's steps after its first

    def elapsed(self) -> float:
        """Seconds since the loop started."""
        return time.perf_counter() - self._t0

    def step(self, tokens: int, seconds: float) -> None:
        """One training step of `tokens` (all ranks) that took `seconds`."""
        self.seen += tokens
        self.steps += 1
        if self.steps == 1:
            self.first_step_s, self.startup_s = seconds, time.time() - self._process_start
            return
        for acc in (self._window, self._steady):
            acc[0] += tokens
            acc[1] += seconds

    def window_rate(self) -> float | None:
        """Tokens/s over the steps since the last call; None when only the launch's first step ran since (its time
        is start-up, in `take_startup`)."""
        tokens, seconds = self._window
        self._window = [0, 0.0]
        return tokens / seconds if seconds > 0 else None

    def steady_rate(self) -> float | None:
        """Tokens/s over the launch's steps after its first; None when it ran one step."""
        tokens, seconds = self._steady
        return tokens / seconds if seconds > 0 else None

    def take_startup(self) -> dict[str, float]:
        """For the launch's first log line (then {}): seconds from the process's start to the end of its first step
        (loading, compiling, capturing), and that step alone."""
        if self._startup_logged or not self.steps:
            return {}
        self._startup_logged = True
        return {"startup_s": self.startup_s, "first_step_s": self.first_step_s}

    def summary(self) -> dict[str, float | int | None]:
        return {"startup_s": self.startup_s, "first_step_s": self.first_step_s, "steady_tokens_per_s": self.steady_rate(), "steps": self.steps,
                "train_s": self.first_step_s + self._steady[1] if self.steps else 0.0}


class StopOnSignal:
    """Turns SIGTERM/SIGINT into a request to stop after the current step, agreed by every rank through the
    step's one all-reduce (`RoleTrainer.train_step`)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """A signal reached this rank; the trainer votes with it in the step's all-reduce."""
        return self.signal_name is not None

    def agree(self, votes: int) -> bool:
        """True on every rank when `votes` (the ranks a signal reached, summed over all) is not 0."""
        if votes == 0:
            return False
        self.signal_name = self.signal_name or "a signal to another rank"
        return True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def before_after_table(history: dict, rows: list[tuple[str, str]]) -> str:
    """A small aligned table of eval metrics before and after training: rows are (label, metric key)."""
    b, a = history["before"], history["after"]
    cells = [("", "before", "after")] + [(label, f"{b[k]:.4f}", f"{a[k]:.4f}") for label, k in rows]
    w = [max(len(r[i]) for r in cells) for i in range(3)]
    return "\n".join("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in cells)


def role_metrics(roles: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The metrics of `train_step`'s `roles`: `lr` and `grad_norm` with one trainable role, `<role>/lr` and
    `<role>/grad_norm` with several (a norm that is not finite is logged as null)."""
    prefix = len(roles) > 1
    out: dict[str, float | None] = {}
    for name, r in roles.items():
        key = f"{name}/" if prefix else ""
        out[f"{key}lr"] = r["lr"]
        out[f"{key}grad_norm"] = r["grad_norm"] if math.isfinite(r["grad_norm"]) else None
    return out
