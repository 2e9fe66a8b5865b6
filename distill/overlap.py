"""A frozen role's forward beside the trainable role's: a worker thread on a second CUDA stream.

Why: the two forwards of a distillation (or DPO) step do not depend on each other, and a small
trainable model's forward leaves the GPU partly idle: kernel launches, not arithmetic, bound it.
Launched from a second thread (torch releases the GIL inside each op) onto a second stream, the frozen
role's kernels fill those gaps. Only replicated frozen roles run there: their forward holds no
collective, so no two threads ever issue collectives at once, and it reads no DeepSpeed plugin, so
the worker never switches the active one (from another thread, `RoleManager.use` switches nothing
and refuses ZeRO-3 roles).
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")


class Overlap:
    """`run(frozen, trainable)`: both results, the frozen call under no_grad, concurrently when enabled."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self._pool: ThreadPoolExecutor | None = None
        self._stream = None

    def run(self, frozen: Callable[[], T], trainable: Callable[[], U], *, concurrent: bool = True) -> tuple[T, U]:
        if not (self.enabled and concurrent):
            with torch.no_grad():
                first = frozen()
            return first, trainable()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="distill-frozen")
            if self.device.type == "cuda":
                self._stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device) if self._stream is not None else None
        if main is not None:
            self._stream.wait_stream(main)  # the batch was copied to the GPU on the main stream

        def work():
            with torch.no_grad(), torch.cuda.stream(self._stream) if main is not None else contextlib.nullcontext():
                return frozen()

        future = self._pool.submit(work)
        try:
            second = trainable()
        finally:
            first = future.result()  # also when `trainable` raised: never leave the worker running
        if main is not None:
            main.wait_stream(self._stream)
            # Made on the side stream, used on the main one: the allocator must not reuse them early.
            _each_tensor(first, lambda t: t.record_stream(main))
        return first, second

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _each_tensor(x: Any, fn: Callable[[torch.Tensor], None]) -> None:
    if torch.is_tensor(x):
        fn(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _each_tensor(v, fn)
    elif isinstance(x, dict):  # also transformers' ModelOutput
        for v in x.values():
            _each_tensor(v, fn)
