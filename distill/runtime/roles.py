"""RoleManager: one DeepSpeed plugin and one Accelerator per role, switched around every call.

accelerate (PR #3097) holds several `DeepSpeedPlugin`s in one `AcceleratorState` and makes one of
them active with `select_deepspeed_plugin(name)`. The active plugin decides two things: the config
`Accelerator.prepare` hands to `deepspeed.initialize`, and the global `HfDeepSpeedConfig` through
which transformers decides whether `from_pretrained` builds the model under `zero.Init` (born
sharded) and whether ZeRO-3 gathers are needed. This module is the only place that switches it.

Each role gets its own `Accelerator`: accelerate ties `backward()` to the first engine an Accelerator
prepares, and each `prepare()` overwrites `Accelerator.deepspeed_config`, which `get_state_dict()`
reads; one Accelerator per role keeps both right by construction.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from distill.models.build import leaf_module_classes
from distill.models.lora import base_model_path, save_lora
from distill.models.tokenizer_files import save_tokenizer
from distill.plan.planner import RolePlan
from distill.runtime.compat import (
    reset_accelerate_state,
    restore_torch_linear,
    select_plugin,
    skip_cpu_shm_op,
    skip_muon_import,
    whole_weights,
)
from distill.runtime.launch import single_process_env


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """`target`'s parameters set to `source`'s of the same names, one at a time, each gathered where ZeRO-3 shards
    it; collective when either is ZeRO-3. Returns `target`."""
    import deepspeed

    have = dict(source.named_parameters())
    for name, p in target.named_parameters():
        q = have[name]
        with deepspeed.zero.GatheredParameters([q]), deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(q.data)
    return target


def forget_roles() -> None:
    """Drop the Accelerator state the last trainer's roles left in this process (the process group stays), so that
    another trainer can be built in it: benchmarks comparing modes, tests running several scenarios per launch."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    reset_accelerate_state()
    unset_hf_deepspeed_config()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def set_leaf_modules(model: torch.nn.Module) -> list[str]:
    """Make ZeRO-3 gather each decoder layer as one unit, for a frozen role.

    DeepSpeed otherwise hooks every submodule and gathers each Linear on its own: per-module hook
    and launch overhead that made a ~1.4B teacher's forward several times slower than the same
    teacher replicated (docs/performance.md). Must run before `deepspeed.initialize` sets the hooks.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = leaf_module_classes(model)
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes


class RoleModel:
    """A prepared model of one role; calling it runs the model with the role's plugin active."""

    def __init__(self, name: str, plan: RolePlan, manager: "RoleManager", engine, accelerator, optimizer=None, scheduler=None):
        self.name, self.plan, self.manager = name, plan, manager
        self.engine, self.accelerator, self.optimizer, self.scheduler = engine, accelerator, optimizer, scheduler

    @property
    def trainable(self) -> bool:
        return self.plan.spec.trainable

    @property
    def module(self) -> torch.nn.Module:
        """The underlying transformers model (partitioned parameters under ZeRO-3)."""
        return self.engine.module

    def __call__(self, *args, **kwargs):
        # transformers builds a KV cache by default, a copy of every layer's keys and values: a frozen
        # role's forward (no_grad) keeps all of them to its end, where it would keep one layer's working
        # set. Generation goes through `generate`, which asks for its own cache.
        if "use_cache" not in kwargs and hasattr(getattr(self.module, "config", None), "use_cache"):
            kwargs["use_cache"] = False
        with self.manager.use(self.name):
            return self.engine(*args, **kwargs)

    def last_hidden(self, **inputs) -> torch.Tensor:
        """The decoder's final (normalised) hidden states [B, T, H], the model asked for logits of one
        position only: for losses that apply the lm_head themselves, chunk by chunk."""
        box: dict = {}

        def hook(module, args, output):
            box["value"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = self.module.get_decoder().register_forward_hook(hook)
        try:
            self(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        return box["value"]

    def backward(self, loss: torch.Tensor, *, boundary: bool) -> None:
        """Backward of one micro-batch; at the accumulation `boundary` the gradients are reduced over ranks,
        ready for `step`.

        We drive the engine rather than `Accelerator.backward`: that one also steps the engine and
        divides by the accumulation count, while our losses are already normalised by the tokens
        of the whole accumulated step.
        """
        with self.manager.use(self.name):
            self.engine.set_gradient_accumulation_boundary(boundary)
            self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """The optimizer step after the boundary's backward (clipped at the role's `grad_clip`; skipped by DeepSpeed
        when the gradient norm is NaN/Inf), then the role's scheduler, unless the step was skipped."""
        with self.manager.use(self.name):
            self.engine.step()
            if self.scheduler is not None and self.engine.was_step_applied():
                self.scheduler.step()

    def grad_norm(self) -> torch.Tensor | float | None:
        """The global gradient norm of the last optimizer step, as DeepSpeed keeps it (a device tensor or a float;
        None when it computes none). Not turned into a Python float here: that would wait on the device."""
        return self.engine.get_global_grad_norm()

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, gather: bool, **settings) -> torch.Tensor:
        """Continuations [B, N] of left-padded prompts [B, P] by transformers' `generate()` with `settings`
        (GenerationConfig fields), in eval mode; collective under ZeRO-3. `distill.generation.generate.generate_completions`
        is the fast path; this is its reference, and the path of a role that stays sharded.

        A ZeRO-3 role either gathers its whole weights once and generates with DeepSpeed's hooks
        lifted (`gather`: fast, needs the memory), or keeps them sharded and generates with
        `synced_gpus`, where every rank runs forwards until the last one is done, so ranks whose
        completions end early still join the gathers of the others.
        """
        from transformers import GenerationConfig

        sharded = self.plan.zero_stage == 3
        synced = sharded and not gather and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        with self.generating(gather=gather):
            # Compiled layers decode uncompiled: every step has another cache length, so it would compile another graph.
            eager = torch.compiler.set_stance("force_eager") if self.plan.compile else contextlib.nullcontext()
            with eager:
                out = self.module.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           generation_config=GenerationConfig(**settings), synced_gpus=synced)
        return out[:, input_ids.shape[1]:]

    @contextlib.contextmanager
    def generating(self, *, gather: bool) -> Iterator[None]:
        """The block runs the model for generation: eval mode, gradient checkpointing off (it turns the KV cache
        off), the role's plugin active, and under ZeRO-3 with `gather` its whole weights gathered once
        (collective) with DeepSpeed's per-module hooks lifted."""
        model, sharded = self.module, self.plan.zero_stage == 3
        if sharded and gather and self.trainable:
            raise ValueError(f"`{self.name}` is trainable under ZeRO-3: it generates sharded (gather=False)")
        was_training, checkpointing = model.training, self.trainable and self.plan.spec.gradient_checkpointing
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        try:
            with self.manager.use(self.name), whole_weights(self.engine) if sharded and gather else contextlib.nullcontext():
                yield
        finally:
            model.train(was_training)
            if checkpointing:
                model.gradient_checkpointing_enable()

    def weight_bytes(self) -> int:
        """Bytes of the role's whole weights (what gathering them for generation holds)."""
        return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in self.module.parameters())

    def gathered(self, params: list[torch.nn.Parameter]):
        """Full copies of `params` for the duration of the block (ZeRO-3), else a no-op."""
        if self.plan.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights (gathered from ZeRO-3 shards) on the main process; collective call."""
        with self.manager.use(self.name):
            return self.accelerator.get_state_dict(self.engine)

    @contextlib.contextmanager
    def without_adapter(self) -> Iterator[None]:
        """Calls inside the block run the base model: the LoRA adapter off, in eval mode (no dropout)."""
        module, training = self.module, self.module.training
        module.eval()
        try:
            with module.disable_adapter():
                yield
        finally:
            module.train(training)

    def save_pretrained(self, out_dir, tokenizer=None) -> None:
        """HF format (safetensors + config [+ tokenizer]) on the main process; every rank must call it.
        A LoRA role is written merged, with its adapter in out_dir/adapter/ (see distill/models/lora.py)."""
        state = self.state_dict()
        if self.accelerator.is_main_process:
            lora = self.plan.spec.lora
            if lora is not None:
                with self.manager.no_plugin():  # the CPU copy that merges must not be built under zero.Init
                    save_lora(out_dir, lora, self.plan.model_config, state, base_model_path(self.plan.spec.from_pretrained))
            else:
                self.accelerator.unwrap_model(self.engine).save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                save_tokenizer(tokenizer, Path(out_dir))
        self.accelerator.wait_for_everyone()


@dataclass
class _Slot:
    plugin: Any
    hf_config: Any = None  # the plugin's HfDeepSpeedConfig, kept alive so the weakref to it holds
    accelerator: Any = None


class RoleManager:
    """Maps each role to its DeepSpeed plugin and Accelerator, and switches between them."""

    def __init__(self, plans: dict[str, RolePlan], *, timeout_s: int = 1800, log_with: list[str] | None = None,
                 logging_dir: str | os.PathLike | None = None):
        """`log_with`: accelerate trackers of the primary Accelerator, writing under `logging_dir`."""
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

        single_process_env()
        ignored = [f for f in os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f]
        if ignored and int(os.environ.get("RANK", 0)) == 0:
            # Each role's DeepSpeed config and precision come from the recipe; accelerate would refuse
            # to build a plugin from a config while its own config file also sets these fields.
            print(f"distill: ignoring DeepSpeed settings of the accelerate config ({', '.join(ignored)}); "
                  "each role's `deepspeed` and `precision` in the recipe decide them")
        self.plans = plans
        self.slots = {
            name: _Slot(DeepSpeedPlugin(hf_ds_config=p.ds_config, zero3_init_flag=p.zero_stage == 3))
            for name, p in plans.items()
        }
        # On CPU, accelerate only starts a multi-process group under DeepSpeed when told the backend.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            skip_cpu_shm_op()
            skip_muon_import()
        handler = InitProcessGroupKwargs(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        names = list(plans)
        project = ProjectConfiguration(logging_dir=str(logging_dir)) if logging_dir else None
        first = Accelerator(deepspeed_plugins={n: self.slots[n].plugin for n in names}, mixed_precision="no",
                            kwargs_handlers=[handler], log_with=log_with or None, project_config=project)
        self.state = first.state
        for i, name in enumerate(names):
            # Later Accelerators share the state (and the plugins) of the first.
            self.slots[name].accelerator = first if i == 0 else Accelerator()
            self.state.select_deepspeed_plugin(name)
            self.slots[name].hf_config = self.slots[name].plugin.dschf
        self._active: str | None = None
        self._owner = threading.get_ident()  # the active plugin is process state; one thread switches it
        self._activate(names[0])

    # -- switching -------------------------------------------------------------------------
    def _activate(self, name: str) -> None:
        """Make `name` the active plugin: what `select_deepspeed_plugin` does, minus its config copy."""
        from transformers.integrations.deepspeed import set_hf_deepspeed_config

        select_plugin({n: slot.plugin for n, slot in self.slots.items()}, name)
        set_hf_deepspeed_config(self.slots[name].hf_config)
        self._active = name

    @property
    def active(self) -> str | None:
        return self._active

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Run the block with `name`'s plugin active; the previous role comes back, even on errors."""
        if name not in self.slots:
            raise KeyError(f"unknown role `{name}`; roles of this run: {list(self.slots)}")
        if threading.get_ident() != self._owner:
            # distill.runtime.overlap's worker: it runs replicated frozen roles only, whose forward reads no plugin.
            if self.plans[name].zero_stage == 3:
                raise RuntimeError(f"`{name}` is ZeRO-3: it must run in the training thread, not alongside another role")
            yield
            return
        previous = self._active
        if previous == name:
            yield
            return
        self._activate(name)
        try:
            yield
        finally:
            self._activate(previous)

    @contextlib.contextmanager
    def no_plugin(self) -> Iterator[None]:
        """Run the block with no DeepSpeed config visible to transformers (plain, local model builds)."""
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        previous = self._active
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self._activate(previous)

    # -- building --------------------------------------------------------------------------
    @property
    def accelerator(self):
        """The primary Accelerator (process info, logging, data helpers)."""
        return next(iter(self.slots.values())).accelerator

    def build(self, name: str, load_model: Callable[[RolePlan], torch.nn.Module],
              make_optimizer: Callable[[RolePlan, torch.nn.Module], tuple[Any, Any]] | None = None) -> RoleModel:
        """Load and prepare one role with its plugin active, so ZeRO-3 roles are born sharded."""
        plan, slot = self.plans[name], self.slots[name]
        with self.use(name):
            model = load_model(plan)
            if plan.spec.trainable:
                model.train()
                optimizer, scheduler = make_optimizer(plan, model)
                # The scheduler stays ours: accelerate's wrapper steps it once per process.
                engine, optimizer = slot.accelerator.prepare(model, optimizer)
            else:
                model.eval().requires_grad_(False)
                optimizer = scheduler = None
                if plan.zero_stage == 3:
                    set_leaf_modules(model)
                engine = slot.accelerator.prepare(model)
                engine.eval()
        if not any(p.spec.trainable and p.zero_stage == 3 for p in self.plans.values()):
            restore_torch_linear()
        return RoleModel(name, plan, self, engine, slot.accelerator, optimizer, scheduler)
