"""What the training loop watches: throughput, stop signals, NaN/Inf steps, and the before/after table."""
from __future__ import annotations

import signal
import time


class NonFiniteLoss(RuntimeError):
    """Too many steps in a row with a NaN/Inf loss; raised on every rank at the same step."""


class Throughput:
    """Tokens seen by the run (all ranks), and the rate since this process started counting."""

    def __init__(self, seen: int = 0):
        self.seen, self._start_seen, self._t0 = seen, seen, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def rate(self) -> float:
        return (self.seen - self._start_seen) / max(self.elapsed(), 1e-9)


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
