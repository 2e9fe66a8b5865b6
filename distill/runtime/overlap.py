"""A frozen role's forward beside the trainable role's: a worker thread on a second CUDA stream.

Why: the two forwards of a distillation (or DPO) step do not depend on each other, and a small
trainable model's forward leaves the GPU partly idle: kernel launches, not arithmetic, bound it.
Launched from a second thread (torch releases the GIL inside each op) onto a second stream, the frozen
role's kernels fill those gaps. Only replicated frozen roles run there: their forward holds no
collective, so no two threads ever issue collectives at once, and it reads no DeepSpeed plugin, so
the worker never switches the active one (from another thread, `RoleManager.use` switches nothing
and refuses ZeRO-3 roles).

With compiled layers (distill/models/compile.py), torch refuses a compiled call from one thread while the other
traces a new graph ("Detected that you are using FX to symbolically trace a dynamo-optimized function";
on 2 GPUs, a batch without padding after a padded one of the same shape did it). So the two calls run under torch's
`fail_on_recompile` stance: a call that meets a batch it has no graph for stops at once, and runs again
after the other has finished, alone, where it compiles. Its partial forward is dropped; a compiled role is
never ZeRO-3, so no gather was left half done.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")
_NEW_GRAPH = object()  # a call that stopped because it needs a graph not compiled yet


class Overlap:
    """`run(frozen, trainable)`: both results, the frozen call under no_grad, concurrently when enabled.

    `compiled`: some role compiles its layers. Then `run`'s `on_compile(which)` is told when the `"frozen"`
    or the `"trainable"` call needed a new graph and so ran again alone."""

    def __init__(self, device: torch.device, enabled: bool, *, compiled: bool = False):
        self.device, self.enabled, self.compiled = device, enabled, compiled
        self._pool: ThreadPoolExecutor | None = None
        self._stream = None

    def run(self, frozen: Callable[[], T], trainable: Callable[[], U], *, concurrent: bool = True,
            on_compile: Callable[[str], None] = lambda which: None) -> tuple[T, U]:
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

        with torch.compiler.set_stance("fail_on_recompile") if self.compiled else contextlib.nullcontext():
            future = self._pool.submit(work)
            try:
                second = self._unless_new_graph(trainable)
            finally:
                wait([future])  # also when `trainable` raised: never leave the worker running
            first = self._unless_new_graph(future.result)
        if main is not None:
            main.wait_stream(self._stream)
            # Made on the side stream, used on the main one: the allocator must not reuse them early.
            _each_tensor(first, lambda t: t.record_stream(main))
        if first is _NEW_GRAPH:
            on_compile("frozen")
            with torch.no_grad():
                first = frozen()
        if second is _NEW_GRAPH:
            on_compile("trainable")
            second = trainable()
        return first, second

    def _unless_new_graph(self, call: Callable[[], T]) -> T | object:
        try:
            return call()
        except RuntimeError as e:
            if self.compiled and "stance is 'fail_on_recompile'" in str(e):
                return _NEW_GRAPH
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def compile_reporter(log: Callable[[str], None], rank: int, frozen: str, trainable: str) -> Callable[[str], None]:
    """`Overlap.run`'s `on_compile`: says on rank 0 which role's layers met a batch they had no graph for (a slow
    step), `frozen` or `trainable` by name."""
    def said(which: str) -> None:
        if rank == 0:
            role, mode = (frozen, "no grad") if which == "frozen" else (trainable, "training" if torch.is_grad_enabled() else "no grad")
            log(f"compile: the {role}'s layers meet a new batch shape or mask ({mode}); compiling its graph now, the roles in turn")
    return said


def _each_tensor(x: Any, fn: Callable[[torch.Tensor], None]) -> None:
    if torch.is_tensor(x):
        fn(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _each_tensor(v, fn)
    elif isinstance(x, dict):  # also transformers' ModelOutput
        for v in x.values():
            _each_tensor(v, fn)
