"""Reward functions named in a recipe as `module:function` (or given from Python as callables), and how their
outputs are checked.

A reward function is what TRL's `GRPOTrainer` calls one: a plain Python callable

    fn(prompts: list, completions: list, completion_ids: list[list[int]], **columns) -> list[float | None]

called with one entry per completion: the prompt it answers (a string, or the list of chat messages),
the completion (a string, or `[{"role": "assistant", "content": ...}]` for chat prompts), its token ids,
and every other column of the dataset as a keyword argument (one value per completion). It returns one
number per completion; `None` says that the function does not apply to that completion (TRL's
convention: it is left out of the reward, and a completion no function scores gets advantage 0).

Anything else is an error that names the function: an exception inside it, a result of the wrong
length, a value that is not a number, NaN or infinite. `RewardError` carries the message; the
trainer raises it on every rank at once (see `agree_on_error`), so no rank waits for another.
"""
from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from distill.config.errors import RecipeError


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; the message names it and says what to fix."""


@dataclass
class RewardFunction:
    spec: str
    """`module:function`, as the recipe names it (for a callable given from Python, where it was defined)."""
    fn: Callable[..., Any]
    weight: float = 1.0

    @property
    def name(self) -> str:
        """The metric name: the function's own name, as TRL logs it (`rewards/<name>`)."""
        return getattr(self.fn, "__name__", self.spec.rpartition(":")[2])


def load_reward_function(spec: str, *, key: str = "grpo.reward_funcs") -> Callable[..., Any]:
    """The callable `module:attr` (attr may be dotted, e.g. `Class.method`); RecipeError naming `key` otherwise."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise RecipeError(f"`{key}`: `{spec}` is not `module:function`; e.g. `distill.data.reward_task:end_mark`")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise RecipeError(f"`{key}`: cannot import `{module}` for `{spec}` ({e}); the module must be importable from "
                          "the working directory or PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"`{key}`: `{module}` has no `{attr}` (from `{spec}`)")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"`{key}`: `{spec}` is a {type(obj).__name__}, not a function")
    return obj


def callable_name(fn: Callable[..., Any]) -> str:
    """`module:qualname` of a callable, as a recipe written to disk names a reward function given from Python."""
    return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"


def importable(fn: Callable[..., Any]) -> str | None:
    """`module:qualname` when importing it in another process gives this very callable, else None (a lambda, a
    function of `__main__` or of a notebook, a closure, a bound method of an object made at run time)."""
    name = callable_name(fn)
    if name.startswith("__main__:") or "<" in name:
        return None
    try:
        return name if load_reward_function(name) is fn else None
    except RecipeError:
        return None


def load_reward_functions(specs: list[str | Callable[..., Any]], weights: list[float] | None = None, *,
                          key: str = "grpo.reward_funcs") -> list[RewardFunction]:
    """The recipe's reward functions (`module:function` names, or callables given from Python) with their weights
    (default 1 each)."""
    if weights is not None and len(weights) != len(specs):
        raise RecipeError(f"`grpo.reward_weights` has {len(weights)} weights for {len(specs)} reward functions in `{key}`: "
                          "give one weight per function, in the same order")
    out = [RewardFunction(s, load_reward_function(s, key=key), 1.0 if weights is None else float(w)) if isinstance(s, str)
           else RewardFunction(callable_name(s), s, 1.0 if weights is None else float(w))
           for s, w in zip(specs, weights or [None] * len(specs))]
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise RecipeError(f"`{key}`: two reward functions share a name ({names}); their metrics would mix: rename one")
    return out


def call_reward_function(rf: RewardFunction, prompts: list, completions: list, completion_ids: list[list[int]],
                         columns: dict[str, list]) -> torch.Tensor:
    """One float per completion [N] (NaN where it returned None), or RewardError naming the function."""
    n = len(completions)
    try:
        out = rf.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as e:  # noqa: BLE001  (any error of user code becomes one message naming it)
        raise RewardError(f"reward function `{rf.spec}` raised {type(e).__name__}: {e}") from e
    try:
        values = list(out)
    except TypeError:
        raise RewardError(f"reward function `{rf.spec}` returned a {type(out).__name__}; it must return a list with "
                          f"one number per completion ({n} here)") from None
    if len(values) != n:
        raise RewardError(f"reward function `{rf.spec}` returned {len(values)} values for {n} completions; it must "
                          "return one number per completion (None where it does not apply)")
    rewards = []
    for i, v in enumerate(values):
        if v is None:
            rewards.append(math.nan)
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"reward function `{rf.spec}` returned {v!r} for completion {i}; rewards are numbers "
                              "(or None where the function does not apply)")
        if not math.isfinite(v):
            raise RewardError(f"reward function `{rf.spec}` returned {v} for completion {i} "
                              f"(completion: {_short(completions[i])}); return a finite number, or None to leave it unscored")
        rewards.append(float(v))
    return torch.tensor(rewards, dtype=torch.float32)


def weighted_reward(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """per_function [N, F] (NaN: not applicable), weights [F] -> [N]: the weighted sum of the values that
    apply, NaN where none does (TRL's `sum_then_normalize`)."""
    total = torch.nansum(per_function * weights, dim=1)  # [N]
    return torch.where(torch.isnan(per_function).all(dim=1), torch.full_like(total, math.nan), total)


def agree_on_error(error: str | None, world_size: int, device: torch.device) -> None:
    """Raise RewardError on every rank when any rank has an `error`, naming the first rank that had one.

    Called by every rank at the same point (collectives). A rank that raised alone would leave the
    others in their next collective until the timeout; this way all of them stop with one message.
    One all-reduce of a flag when no rank failed; the messages travel only when one did."""
    if world_size == 1:
        if error is not None:
            raise RewardError(error)
        return
    flag = torch.tensor(int(error is not None), device=device)
    dist.all_reduce(flag)
    if not int(flag):
        return
    messages: list[Any] = [None] * world_size
    dist.all_gather_object(messages, error)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    rank, message = failed[0]
    others = f" (and on rank {', '.join(str(r) for r, _ in failed[1:])})" if len(failed) > 1 else ""
    raise RewardError(f"on rank {rank}{others}: {message}")


def _short(completion: Any, limit: int = 80) -> str:
    text = completion if isinstance(completion, str) else str(completion)
    return repr(text if len(text) <= limit else text[:limit] + "...")
