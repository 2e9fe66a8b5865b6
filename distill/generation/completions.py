"""On-policy distillation (GKD, arXiv 2306.13649): completions generated during training.

Per micro-batch, with probability `lmbda`, the student samples completions of the batch prompts
and is trained on them, the teacher scoring every token; otherwise the micro-batch keeps the
dataset's completions, or with `seq_kd` the teacher samples them. The draw depends only on the
seed, the step and the micro-batch, so every rank makes the same choice (a ZeRO-3 generator needs
all ranks) and a resumed run makes the same choices as an uninterrupted one.

Generation is one phase per optimizer step and writer: the prompts of all the step's micro-batches that
one role writes are generated together (`distill.generation`), then split back into their micro-batches.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Literal

import torch
from pydantic import Field

from distill.config.schema import Section
from distill.data.loading import pad_id
from distill.data.prompts import with_completions
from distill.generation.generate import (
    MEMORY_MARGIN,
    SamplingSpec,
    generate_completions,
    kv_bytes_per_row,
    resolve_decode,
    sampling_bytes_per_row,
)
from distill.plan.placement import device_memory
from distill.plan.planner import estimate_memory
from distill.runtime.roles import RoleModel


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
    top_k: int | None = Field(None, ge=1)
    """Sample among the k most likely tokens only (null: all tokens). Applied before top_p, as in generate()."""
    min_new_tokens: int = Field(0, ge=0)
    """eos cannot be sampled before this many tokens."""
    generation_batch_size: int | None = Field(None, ge=1)
    """Sequences decoded together per rank. null: all the prompts a role writes in one optimizer step (every
    micro-batch of the accumulation), as far as the KV cache fits in the GPU memory left after the training
    state; a smaller number decodes them in turns (less cache memory, more time)."""
    decode: Literal["auto", "compiled", "graphs", "static", "generate"] = "auto"
    """How tokens are decoded. `compiled`: a static KV cache, the decode step compiled and replayed as CUDA
    graphs; `graphs`: the same, not compiled; `static`: the static-cache loop without graphs; `generate`:
    transformers' generate() (the reference). `auto`: compiled on GPUs, static on CPU; a role that stays
    sharded while generating (ZeRO-3, synced) always uses generate()."""
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
                 max_prompt_length: int | None = None, rows_per_phase: int | None = None, reserve_bytes: int = 0,
                 key: str = "kd.on_policy"):
        """`max_prompt_length`, `rows_per_phase`: the widest prompt of the data and the most prompts of one phase
        (the KV cache is sized for them once); `reserve_bytes`: memory the training step still needs beside the
        KV cache (per GPU); `key`: where the recipe sets `spec`, for the log line that says how a ZeRO-3 role
        generates."""
        self.spec, self.rank, self.log, self.key = spec, rank, log, key
        self.padding = padding or {}  # the prompt collator's, so generated batches get its widths
        self.eos = tokenizer.eos_token_id
        self.pad = pad_id(tokenizer)
        self.max_prompt_length, self.rows_per_phase, self.reserve_bytes = max_prompt_length, rows_per_phase, reserve_bytes
        self._gather: dict[str, bool] = {}
        self._seconds, self._tokens, self._since = 0.0, 0, time.perf_counter()

    @classmethod
    def for_trainer(cls, trainer, spec: OnPolicySpec, *, key: str, padding: dict | None = None) -> "CompletionSampler":
        """A sampler for `trainer`'s run, its KV cache sized once: prompts up to data.max_length - max_new_tokens,
        one phase for every micro-batch of a step, the training step's own memory kept free."""
        r, t = trainer.recipe, trainer.recipe.train
        return cls(spec, trainer.tokenizer, rank=trainer.rank, log=trainer.log, padding=padding, key=key,
                   max_prompt_length=r.data.max_length - spec.max_new_tokens, rows_per_phase=t.micro_batch_size * t.grad_accum,
                   reserve_bytes=training_reserve(trainer.plans, r, trainer.world_size))

    def sampling(self, model: RoleModel) -> SamplingSpec:
        """The recipe's settings; eos: the tokenizer's and every eos id of the role's generation config."""
        s = self.spec
        config_eos = getattr(getattr(model.module, "generation_config", None), "eos_token_id", None)
        config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
        eos = tuple(dict.fromkeys([self.eos, *config_eos]))
        return SamplingSpec(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            top_k=s.top_k or 0, min_new_tokens=s.min_new_tokens, eos_token_ids=eos, pad_token_id=self.pad)

    def sample(self, model: RoleModel, batch: dict[str, torch.Tensor], *, seed: int) -> dict[str, torch.Tensor]:
        """`batch` with its completions replaced by `model`'s samples (collective when `model` is ZeRO-3).

        `seed` fixes the sampling and leaves the global RNG as it was."""
        return self.sample_many(model, [batch], seed=seed)[0]

    def sample_many(self, model: RoleModel, batches: list[dict[str, torch.Tensor]], *, seed: int) -> list[dict[str, torch.Tensor]]:
        """Each batch with its completions replaced by `model`'s samples, all prompts in one generation phase."""
        t0 = time.perf_counter()
        ids, mask = _left_padded([b["prompt_ids"] for b in batches], [b["prompt_mask"] for b in batches], self.pad)
        out = self._complete(model, ids, mask, self.sampling(model), seed=seed)
        rebuilt, row = [], 0
        for batch in batches:
            n = len(batch["prompt_ids"])
            done = with_completions(batch, out.tokens[row:row + n], eos_id=self.eos, pad_id=self.pad,
                                    lengths=out.lengths[row:row + n], **self.padding)
            rebuilt.append({**done, "source": model.name})
            row += n
        self._seconds += time.perf_counter() - t0
        self._tokens += int(out.lengths.sum())
        return rebuilt

    def generate(self, model: RoleModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, seed: int) -> torch.Tensor:
        """`model`'s completions [B, N] of left-padded prompts [B, P] (mask [B, P]); rows that end early are padded
        after their eos (the tokenizer's: what the callers' masks read). Collective when `model` is ZeRO-3; `seed`
        fixes the sampling and leaves the global RNG as it was; the time and tokens count towards `metrics()`."""
        t0 = time.perf_counter()
        sampling = dataclasses.replace(self.sampling(model), eos_token_ids=(self.eos,))
        out = self._complete(model, prompt_ids, prompt_mask, sampling, seed=seed)
        self._seconds += time.perf_counter() - t0
        self._tokens += int(out.lengths.sum())
        return out.tokens

    def _complete(self, model: RoleModel, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingSpec, *, seed: int):
        return generate_completions(model, ids, mask, sampling, seed=seed, batch_size=self.spec.generation_batch_size,
                                    decode=self.spec.decode, gather=self._gathers(model), max_prompt_length=self.max_prompt_length,
                                    expected_rows=self.rows_per_phase, reserve_bytes=self.reserve_bytes,
                                    log=self.log if self.rank == 0 else None)

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


def _left_padded(ids: list[torch.Tensor], masks: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batches [B_i, P_i] -> one [sum B_i, max P_i] (and its mask)."""
    width = max(x.shape[1] for x in ids)
    grow = lambda x, value: torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)  # noqa: E731
    return torch.cat([grow(x, pad) for x in ids]), torch.cat([grow(m, 0) for m in masks])


def _free_memory(need_device: torch.device) -> int:
    if need_device.type == "cuda":
        return torch.cuda.mem_get_info(need_device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def training_reserve(plans, recipe, world_size: int) -> int:
    """Bytes per GPU the training step allocates beside weights and optimizer state (activations, logits,
    gradients; `distill.plan.planner.estimate_memory`): kept free of KV caches, which live across steps."""
    mem = dict(world_size=world_size, micro_batch_size=recipe.train.micro_batch_size, seq_len=recipe.data.max_length)
    return int(sum(e["activations"] + e["logits"] + e["gradients"] for e in (estimate_memory(p, **mem) for p in plans.values())))


def generation_plan(recipe, plans, world_size: int, spec: OnPolicySpec, writers: list[str]) -> list[str]:
    """The plan's lines on generation: per writing role (`writers`), the decode mode and the KV cache a phase
    needs against the memory the training state leaves (all estimates, from the configs)."""
    op, t = spec, recipe.train
    device = device_memory()
    mem = dict(world_size=world_size, micro_batch_size=t.micro_batch_size, seq_len=recipe.data.max_length)
    state = sum(sum(estimate_memory(p, **mem).values()) for p in plans.values())
    rows = op.generation_batch_size or t.micro_batch_size * t.grad_accum
    per_phase = f"{rows} sequences per phase" + ("" if op.generation_batch_size else
                                                 f" ({t.micro_batch_size} x {t.grad_accum} micro-batches)")
    lines = []
    for name in writers:
        plan = plans[name]
        sharded = plan.zero_stage == 3 and (plan.spec.trainable or op.generation == "synced")
        mode, why = resolve_decode(op.decode, device=torch.device("cuda" if device else "cpu"), sharded=sharded,
                                   config=plan.model_config, length=recipe.data.max_length)
        per_row = (kv_bytes_per_row(plan.model_config, recipe.data.max_length, 4 if plan.spec.precision == "fp32" else 2)
                   + sampling_bytes_per_row(plan.model_config.vocab_size))
        line = (f"generation ({name}): {mode} decode ({why}); KV cache and sampling {per_row / 2**20:.1f} MiB per sequence "
                f"of {recipe.data.max_length} tokens; {per_phase}: {rows * per_row / 2**30:.2f} GiB")
        if mode == "generate":
            line = f"generation ({name}): generate() ({why}); {per_phase}"
        elif device:
            room = device * (1 - MEMORY_MARGIN) - state
            fit = max(0, int(room // per_row))
            line += (f"; the GPU's {device / 2**30:.1f} GiB less the training state (~{state / 2**30:.1f} GiB) hold "
                     f"~{fit} sequences" + ("" if fit >= rows else f": phases decode {fit} at a time"))
        lines.append(line)
    return lines
