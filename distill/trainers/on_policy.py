"""On-policy distillation (GKD, arXiv 2306.13649): completions generated during training.

Per micro-batch, with probability `lmbda`, the student samples completions of the batch prompts
and is trained on them, the teacher scoring every token; otherwise the micro-batch keeps the
dataset's completions, or with `seq_kd` the teacher samples them. The draw depends only on the
seed, the step and the micro-batch, so every rank makes the same choice (a ZeRO-3 generator needs
all ranks) and a resumed run makes the same choices as an uninterrupted one.
"""
from __future__ import annotations

import os
import random
import time
from typing import Literal

import torch
from pydantic import Field

from distill.data.loading import pad_id
from distill.data.prompts import with_completions
from distill.recipe import Section
from distill.roles import RoleModel


class OnPolicySpec(Section):
    lmbda: float = Field(1.0, ge=0, le=1)
    """Probability per micro-batch that the student generates the completions it trains on (GKD's lambda)."""
    seq_kd: bool = False
    """Micro-batches the student does not generate get completions sampled from the teacher (sequence-level
    KD) instead of the dataset's."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest completion generated; one that reaches it without eos is kept as it is."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1: all tokens)."""
    generation: Literal["auto", "gather", "synced"] = "auto"
    """How a frozen ZeRO-3 role generates: `gather` its whole weights for each generation (fast, needs the
    memory), `synced` keep them sharded with every rank stepping until the slowest is done, `auto` gathers
    when the weights fit in the free memory of every rank. A trainable ZeRO-3 role always generates synced;
    ZeRO-0/1/2 roles generate directly."""


def completion_source(seed: int, step: int, micro: int, spec: OnPolicySpec) -> str:
    """Who writes micro-batch `micro` of `step`: "student", "teacher" or "data"; the same on every rank."""
    if random.Random(f"on-policy-{seed}-{step}-{micro}").random() < spec.lmbda:
        return "student"
    return "teacher" if spec.seq_kd else "data"


class CompletionSampler:
    """Generates completions for prompt batches with a role, and times it (tokens/s, share of the step)."""

    def __init__(self, spec: OnPolicySpec, tokenizer, *, rank: int, log=print, padding: dict | None = None,
                 key: str = "kd.on_policy"):
        """`key`: where the recipe sets `spec`, for the log line that says how a ZeRO-3 role generates."""
        self.spec, self.rank, self.log, self.key = spec, rank, log, key
        self.padding = padding or {}  # the prompt collator's, so generated batches get its widths
        self.eos = tokenizer.eos_token_id
        self.pad = pad_id(tokenizer)
        sampled = spec.temperature > 0
        self.settings = dict(max_new_tokens=spec.max_new_tokens, do_sample=sampled, pad_token_id=self.pad,
                             eos_token_id=self.eos, bos_token_id=tokenizer.bos_token_id, use_cache=True,
                             # top_k=0: sample from the whole distribution, not generate()'s default top 50
                             **({"temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0} if sampled else {}))
        self._gather: dict[str, bool] = {}
        self._seconds, self._tokens, self._since = 0.0, 0, time.perf_counter()

    def sample(self, model: RoleModel, batch: dict[str, torch.Tensor], *, seed: int) -> dict[str, torch.Tensor]:
        """`batch` with its completions replaced by `model`'s samples (collective when `model` is ZeRO-3).

        `seed` fixes the sampling and leaves the global RNG as it was."""
        completions = self.generate(model, batch["prompt_ids"], batch["prompt_mask"], seed=seed)  # [B, N]
        t0 = time.perf_counter()
        out = with_completions(batch, completions, eos_id=self.eos, pad_id=self.pad, **self.padding)
        self._seconds += time.perf_counter() - t0
        return {**out, "source": model.name}

    def generate(self, model: RoleModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, seed: int) -> torch.Tensor:
        """`model`'s completions [B, N] of left-padded prompts [B, P] (mask [B, P]); rows that end early are padded
        after their eos. Collective when `model` is ZeRO-3; `seed` fixes the sampling and leaves the global RNG
        as it was; the time and tokens count towards `metrics()`."""
        device = prompt_ids.device
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            completions = model.generate(prompt_ids, prompt_mask, gather=self._gathers(model), **self.settings)  # [B, N]
        self._seconds += time.perf_counter() - t0
        ended = completions == self.eos  # [B, N]
        lengths = torch.where(ended.any(-1), ended.int().argmax(-1) + 1, completions.shape[1])  # [B]: up to the eos
        self._tokens += int(lengths.sum())
        return completions

    def _gathers(self, model: RoleModel) -> bool:
        """Whether a ZeRO-3 `model` generates from gathered weights; decided once, by every rank together."""
        if model.plan.zero_stage != 3:
            return False
        if model.name not in self._gather:
            need = model.weight_bytes()
            if model.trainable:
                # Lifting and restoring DeepSpeed's hooks on a ZeRO-3 model that also runs backward
                # corrupts its parameter trace (seen with DeepSpeed 0.19); sharded generation is safe.
                self._gather[model.name] = False
            elif self.spec.generation == "auto":
                fits = int(need * 1.25 < _free_memory(need_device=next(model.module.parameters()).device))
                if torch.distributed.is_initialized():
                    flag = torch.tensor(fits, device=next(model.module.parameters()).device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                    fits = int(flag)
                self._gather[model.name] = bool(fits)
            else:
                self._gather[model.name] = self.spec.generation == "gather"
            if self.rank == 0:
                how = "gathers its weights" if self._gather[model.name] else "stays sharded (synced_gpus)"
                why = "as every trainable ZeRO-3 role" if model.trainable else f"{self.key}.generation: {self.spec.generation}"
                self.log(f"on-policy: {model.name} (ZeRO-3, {need / 2**30:.2f} GiB of weights) {how} to generate [{why}]")
        return self._gather[model.name]

    def metrics(self) -> dict[str, float]:
        """This rank's generation since the last call: tokens/s while generating and share of wall time."""
        now = time.perf_counter()
        out = {"gen_tokens_per_s": self._tokens / max(self._seconds, 1e-9),
               "gen_time_share": self._seconds / max(now - self._since, 1e-9)} if self._seconds else {}
        self._seconds, self._tokens, self._since = 0.0, 0, now
        return out


def _free_memory(need_device: torch.device) -> int:
    if need_device.type == "cuda":
        return torch.cuda.mem_get_info(need_device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
