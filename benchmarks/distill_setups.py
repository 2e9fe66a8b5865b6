"""The two setups `distill_throughput.py` compares: the naive two-plugin loop and DistillTrainer's step.

Each has `step(batch)` (what the throughput pass times), `phases(batch, tick)` (the same calls with
`tick(phase)` after each, for the time split) and `close()`.
"""
from __future__ import annotations

import json
import os

import torch

LLAMA = dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
PAIRS = {  # name: (student, teacher) configs
    "0.3b-1.4b": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=16),
                  dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)),
    "1b-7b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=16),
              dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)),
    # 0.3b-1.4b's layers at width 64: the same modules, parameters and kernel launches, almost no
    # arithmetic. On CPU its step time is the host-side cost (Python, dispatch, DeepSpeed's hooks).
    "0.3b-1.4b-skeleton": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=20, num_attention_heads=4, num_key_value_heads=4),
                           dict(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=4)),
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
             dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
}


def model_configs(a) -> tuple[dict, dict]:
    extra = dict(vocab_size=a.vocab, max_position_embeddings=max(a.seq_len, 64))
    return tuple({**LLAMA, **c, **extra} for c in PAIRS[a.pair])


def reset_between_modes():
    """Drop the previous mode's Accelerator state (the process group stays) and free its memory."""
    from distill.runtime.roles import forget_roles

    forget_roles()


def kd_loss(logits, teacher_logits, labels, num_tokens):
    """0.5 CE + 0.5 forward KL, fp32, summed over valid tokens / num_tokens (DistillTrainer's loss)."""
    from distill.losses import cross_entropy, get_kd_loss

    ce = cross_entropy(logits, labels, num_valid_tokens=num_tokens)
    kd = get_kd_loss("forward_kl")(logits, teacher_logits, labels, num_valid_tokens=num_tokens)
    return 0.5 * ce + 0.5 * kd


def make_batches(a, mb: int, n: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(a.seed + 1000 * mb + int(os.environ.get("RANK", 0)))
    out = []
    for _ in range(n):
        ids = torch.randint(0, a.vocab, (mb, a.seq_len), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)})
    return out


def recipe_for(a, mode: str, mb: int, extra: dict | None = None):
    """The DistillTrainer recipe of a mode (teacher placement), `extra` merged in before it is validated."""
    from distill.config.presets import deepspeed_presets
    from distill.config.recipe import deep_merge, parse_overrides, validate_recipe
    from distill.trainers.distill import DistillTrainer

    s, t = model_configs(a)
    presets = deepspeed_presets()
    s_ds = json.loads(presets["zero2"].read_text())
    s_ds["zero_optimization"].update(a.student_zero)
    if mode == "naive":  # what accelerate derives for `auto` from the hidden size
        s_ds["zero_optimization"]["reduce_bucket_size"] = s["hidden_size"] ** 2
    if mode in ("naive", "sharded_untuned"):
        # What accelerate/HF derive from the hidden size, and DeepSpeed's default live-parameter limits.
        h = t["hidden_size"]
        zero = json.loads(presets["zero3"].read_text())
        zero["zero_optimization"].update(reduce_bucket_size=h * h, stage3_prefetch_bucket_size=int(0.9 * h * h),
                                         stage3_param_persistence_threshold=10 * h, stage3_max_live_parameters=10**9,
                                         stage3_max_reuse_distance=10**9)
        t_ds, placement = zero, "sharded"
    else:
        t_ds, placement = json.loads(presets["zero3"].read_text()), mode.split("_")[0]
        t_ds["zero_optimization"].update(a.teacher_zero)
    raw = {"trainer": "distill", "output_dir": "/tmp/distill_throughput", "seed": a.seed,
           "student": {"config": s, "deepspeed": s_ds, "precision": a.dtype, "optimizer": {"lr": 1e-4}},
           "teacher": {"config": t, "deepspeed": t_ds, "precision": a.dtype, "placement": placement},
           "kd": {"loss": "forward_kl", "alpha": 0.5},
           "data": {"train": "unused.jsonl", "max_length": a.seq_len},
           "train": {"micro_batch_size": mb, "max_steps": 10**6, "log_every": 10**6, "progress": False}}
    # Plain layers unless a step asks (--set student.compile=true): a result must not move with the
    # trainer's default. Accelerate's documented pattern, the naive loop, compiles nothing.
    raw["student"]["compile"] = raw["teacher"]["compile"] = False
    if mode != "naive":
        raw = deep_merge(raw, parse_overrides(a.set))
    return validate_recipe(deep_merge(raw, extra or {}), DistillTrainer)


def load_fn(device):
    def load(plan):
        from transformers import AutoModelForCausalLM

        from distill.loop.build import apply_role_options

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan.spec.precision]
        if plan.zero_stage == 3:  # built under zero.Init (the role's plugin is active): born sharded
            model = AutoModelForCausalLM.from_config(plan.model_config, dtype=dtype)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(plan.model_config, dtype=dtype)
        return apply_role_options(plan, model)  # checkpointing and compiled layers, as the trainer's loader
    return load


# -- the two setups ---------------------------------------------------------------------------
class Naive:
    """One Accelerator, two DeepSpeedPlugins, switched with select_deepspeed_plugin."""

    def __init__(self, a, plans, device):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        from distill.runtime.compat import skip_cpu_shm_op
        from distill.runtime.launch import single_process_env

        single_process_env()
        if device.type == "cpu":
            skip_cpu_shm_op()
        plugins = {n: DeepSpeedPlugin(hf_ds_config=p.ds_config, zero3_init_flag=p.zero_stage == 3) for n, p in plans.items()}
        kw = InitProcessGroupKwargs(backend="nccl" if device.type == "cuda" else "gloo")
        self.acc = acc = Accelerator(deepspeed_plugins=plugins, mixed_precision="no", kwargs_handlers=[kw])
        self.world = acc.num_processes
        load = load_fn(device)
        torch.manual_seed(a.seed)
        acc.state.select_deepspeed_plugin("student")
        student = load(plans["student"])
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        self.student, self.opt = acc.prepare(student, opt)
        acc.state.select_deepspeed_plugin("teacher")
        torch.manual_seed(a.seed)
        teacher = load(plans["teacher"]).eval().requires_grad_(False)
        self.teacher = acc.prepare(teacher)
        self.teacher.eval()
        acc.state.select_deepspeed_plugin("student")

    def step(self, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        n = (batch["labels"] != -100).sum()
        self.acc.state.select_deepspeed_plugin("teacher")
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits  # [B, T, V]
        self.acc.state.select_deepspeed_plugin("student")
        loss = kd_loss(self.student(**inputs).logits, t_logits, batch["labels"], n)
        self.acc.backward(loss)
        self.opt.step()
        self.opt.zero_grad()

    def phases(self, batch, tick):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        n = (batch["labels"] != -100).sum()
        tick(None)
        self.acc.state.select_deepspeed_plugin("teacher")
        tick("role_switch")
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits
        tick("teacher_forward")
        self.acc.state.select_deepspeed_plugin("student")
        tick("role_switch")
        logits = self.student(**inputs).logits
        tick("student_forward")
        loss = kd_loss(logits, t_logits, batch["labels"], n)
        tick("loss")
        self.student.backward(loss)  # what accelerator.backward runs, split from the step it also takes
        tick("backward")
        self.student.step()
        tick("optimizer")

    def close(self):
        for e in (self.student, self.teacher):
            e.destroy()  # removes ZeRO-3 hooks, frees its buffers
        del self.student, self.teacher, self.opt, self.acc


class Ours:
    """DistillTrainer's step on RoleManager roles, without data files (batches come from the benchmark)."""

    def __init__(self, a, plans, recipe, device, mode):
        import distill.runtime.roles
        from distill.trainers.distill import DistillTrainer

        class Bench(DistillTrainer):  # the trainer through its public hooks: models built on the device, no data files
            def build_data(self):
                return _NoData()

            def load_model(self, plan):
                return load_fn(device)(plan)

        keep = distill.runtime.roles.set_leaf_modules
        if mode in ("sharded_untuned", "sharded_noleaf"):
            distill.runtime.roles.set_leaf_modules = lambda model: []  # the ablation: each module gathered on its own
        try:
            self.t = Bench(recipe, plans=plans)
        finally:
            distill.runtime.roles.set_leaf_modules = keep
        self.manager, self.world, self.n = self.t.manager, self.t.world_size, 0

    def step(self, batch):
        self.n += 1
        self.t.train_step(self.n, [batch])

    def phases(self, batch, tick):
        t, m = self.t, self.manager
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        n = t.all_reduce((batch["labels"] != -100).sum())
        tick(None)
        with m.use("teacher"):
            tick("role_switch")
            with torch.no_grad():
                t_logits = t.teacher.engine(**inputs).logits
            tick("teacher_forward")
        tick("role_switch")
        logits = t.student(**inputs).logits
        tick("student_forward")
        loss = kd_loss(logits, t_logits, batch["labels"], n)
        tick("loss")
        eng = t.student.engine
        eng.set_gradient_accumulation_boundary(True)
        eng.backward(loss * t.world_size, scale_wrt_gas=False)
        tick("backward")
        eng.step()
        tick("optimizer")

    def close(self):
        self.t.close()
        for m in self.t.models.values():
            m.engine.destroy()
        del self.t, self.manager


class _NoData:
    """The data of a trainer fed by the benchmark: an epoch longer than any run, nothing to evaluate."""

    steps_per_epoch, eval = 10**9, None

    def check(self): ...
