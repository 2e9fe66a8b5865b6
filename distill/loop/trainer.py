"""RoleTrainer: the one training loop every algorithm shares.

An algorithm is a subclass that declares its `roles` and writes `loss_step` (and, for evaluation,
`eval_step`). The loop below owns everything else: data, gradient accumulation, the normalisation
of losses by the valid tokens of the whole accumulated step, logging, evaluation and saving.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import importlib

import datasets
from accelerate.utils import broadcast_object_list
import torch
import yaml
from tqdm.auto import tqdm

import distill.tracking as tracking
from distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.compile import compile_layers
from distill.data.loading import DataBundle, build_text_data
from distill.data.synthetic import write_dataset
from distill.launch import DEVICE_ENV, world_info
from distill.lora import apply_lora
from distill.models import build_model
from distill.monitor import NonFiniteLoss, StopOnSignal, Throughput
from distill.overlap import Overlap, compile_reporter
from distill.plan import RolePlan, format_plan
from distill.preflight import preflight
from distill.errors import RecipeError
from distill.presets import shipped_recipes
from distill.recipe import RecipeBase, Role, Section, deep_merge, parse_overrides, read_recipe, validate_recipe
from distill.registry import Registry, UnknownNameError
from distill import samples
from distill.roles import RoleManager, RoleModel, copy_weights
from distill.rundir import probe_run_disk, release_run_dir, truncate_metrics
from distill.tokenizer_files import auto_tokenizer_note


def apply_role_options(plan, model: torch.nn.Module) -> torch.nn.Module:
    """A freshly built model with its role's gradient checkpointing, compiled layers and LoRA adapter, as
    the recipe block asks; before `RoleManager.build` prepares it (and before the optimizer: LoRA leaves
    only the adapter trainable)."""
    if plan.spec.gradient_checkpointing and plan.spec.trainable:
        model.gradient_checkpointing_enable()
        if plan.spec.lora is not None:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    if plan.compile:
        compile_layers(model)
    if plan.spec.lora is not None:
        model = apply_lora(model, plan.spec.lora, plan.name)
    return model


def build_optimizer(spec: Role, model: torch.nn.Module, *, total_steps: int, device: torch.device):
    """The optimizer and learning-rate schedule a trainable role's block asks for (`optimizer`, `scheduler`)."""
    opt_spec, sched = spec.optimizer, spec.scheduler
    params = [p for p in model.parameters() if p.requires_grad]
    fused = opt_spec.fused if opt_spec.fused is not None else device.type == "cuda"
    if opt_spec.name == "adamw":
        opt = torch.optim.AdamW(params, lr=opt_spec.lr, betas=opt_spec.betas, eps=opt_spec.eps,
                                weight_decay=opt_spec.weight_decay, fused=fused)
    else:
        opt = torch.optim.SGD(params, lr=opt_spec.lr, weight_decay=opt_spec.weight_decay, fused=fused)
    warm, floor = sched.warmup_steps, sched.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[sched.name]
        return floor + (1 - floor) * shape  # constant: shape 1, so the floor does not matter

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class RoleTrainer:
    """Subclass, declare `roles`, write `loss_step`; see docs/writing-a-trainer.md."""

    name: ClassVar[str] = ""
    roles: ClassVar[dict[str, Role]] = {}
    """Role name -> defaults; the recipe's block of the same name overrides them."""
    sections: ClassVar[dict[str, type[Section]]] = {}
    """Extra recipe sections this algorithm reads (e.g. `kd`), name -> typed model."""
    supports_packing: ClassVar[bool] = False
    """Whether `data.packing` is allowed: the trainer trains on `build_text_data` batches and calls its models
    with `distill.data.packing.model_inputs(batch)`, so packed documents stay apart."""

    # -- the algorithm -----------------------------------------------------------------------
    def loss_step(self, batch: dict[str, torch.Tensor], num_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch, each a sum over its tokens divided by `num_tokens` (the valid
        tokens of the whole accumulated step on all ranks). Each trainable role's backward sees the key
        `loss_keys` names for it: `loss` when one role trains, `<role>/loss` for each when several do;
        the other keys are logged."""
        raise NotImplementedError

    @property
    def loss_keys(self) -> dict[str, str]:
        """Trainable role -> the key of `loss_step`'s result its backward sees: `loss` when one role trains,
        `<role>/loss` for each when several do. A role's loss must reach no other trainable role's parameters
        (detach what one role's loss takes from another's forward): each role runs its own backward."""
        names = list(self.trainables)
        return {names[0]: "loss"} if len(names) == 1 else {n: f"{n}/loss" for n in names}

    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over the batch's valid tokens, keyed by metric; `tokens` is the count they divide by."""
        n = self.count_tokens(batch)
        losses = self.loss_step(batch, torch.ones_like(n))
        return {**{k: v.detach() for k, v in losses.items()}, "tokens": n}

    def prepare_step(self, step: int, micro_batches: list[dict]) -> list[dict]:
        """The step's micro-batches before they are counted and trained on (e.g. completions
        generated by a role). Called on every rank at every step, so collectives are allowed."""
        return micro_batches

    def step_metrics(self) -> dict[str, float]:
        """Extra metrics for the next metrics line (e.g. generation timings), from this rank."""
        return {}

    def alongside(self, frozen_role: RoleModel, frozen: Callable[[], Any], trainable: Callable[[], Any]) -> tuple[Any, Any]:
        """(frozen(), trainable()): a call into `frozen_role` (under no_grad) and the trainable role's
        forward, concurrently when `train.overlap_frozen` allows it and the frozen role is replicated
        (distill/overlap.py), else one after the other."""
        if "_overlap" not in self.__dict__:
            on = self.recipe.train.overlap_frozen
            if on is None:  # the recipe check refuses an explicit true with checkpointing
                on = self.device.type == "cuda" and not any(m.trainable and m.plan.spec.gradient_checkpointing
                                                            for m in self.models.values())
            self._overlap = Overlap(self.device, on, compiled=self.compiled)
        concurrent = not frozen_role.trainable and frozen_role.plan.zero_stage != 3
        label = self.trainable.name if len(self.trainables) == 1 else "trainable role"
        said = compile_reporter(self.log, self.rank, frozen_role.name, label)
        return self._overlap.run(frozen, trainable, concurrent=concurrent, on_compile=said)

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The normaliser of one micro-batch (predicted tokens; a preference trainer counts pairs)."""
        return (batch["labels"] != -100).sum()

    @classmethod
    def write_synthetic(cls, out_dir, seed: int, recipe=None) -> None:
        """Write the project's synthetic data for this algorithm (used when `data.synthetic_seed` is set)."""
        write_dataset(out_dir, seed=seed)

    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Refuse role setups this algorithm cannot run, before anything is loaded (raise RecipeError)."""

    @classmethod
    def built_roles(cls, recipe) -> list[str]:
        """The roles this run loads; all declared ones unless the recipe makes one unnecessary."""
        return list(cls.roles)

    @classmethod
    def check_plans(cls, recipe, plans) -> None:
        """Like `check_recipe`, once the roles' model configs are known (still before any weight loads)."""

    @classmethod
    def plan_notes(cls, recipe, plans, world_size: int) -> list[str]:
        """Lines this algorithm adds to the printed plan (`--dry-run` and the start of a run), e.g. its generation memory."""
        return []

    @property
    def compiled(self) -> bool:
        """Whether any role compiles its layers; the collators then pad to few widths (distill/compile.py)."""
        return any(p.compile for p in self.plans.values())

    # -- building: override any of these to change how a piece is made -------------------------
    def __init__(self, recipe, *, log: Callable[[str], None] = print, plans: dict[str, RolePlan] | None = None,
                 tokenizer=None):
        """Check the recipe (preflight), start the process group, build the data, then every role.

        `plans` and `tokenizer`: made already (`distill.plan.plan_roles`), e.g. by a benchmark that feeds its
        own batches; preflight is then skipped."""
        self.recipe, self.log = recipe, log
        self.out = Path(recipe.output_dir)
        world = world_info()[1]
        # Which process commits checkpoints: on a run directory that is not shared, one per machine (distill/rundir.py).
        self.disk = probe_run_disk(self.out)
        if plans is None:
            tokenizer, plans = preflight(recipe, type(self), world_size=world, owner=self.disk.commits)
        if not self.disk.shared:  # DeepSpeed then writes each machine's copy of what its local rank 0 would
            for plan in plans.values():
                if plan.spec.trainable:
                    plan.ds_config["checkpoint"] = {"use_node_local_storage": True}
        self.tokenizer, self.plans = tokenizer, plans
        self.manager = RoleManager(self.plans, timeout_s=recipe.launch.timeout_s, log_with=tracking.resolve(recipe.train.report_to),
                                   logging_dir=tracking.logging_dir(self.out))
        self.accelerator = self.manager.accelerator
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        if self.world_size != world:
            raise RuntimeError(f"launcher reports {world} processes but accelerate sees {self.world_size}")
        self.device = self.accelerator.device
        if self.accelerator.is_main_process:
            device = os.environ.get(DEVICE_ENV) or self.device.type  # the choice and its reason, when distill.train made it
            self.log("\n".join([format_plan(self.plans, self.world_size, device), *type(self).plan_notes(recipe, self.plans, self.world_size)]))
        else:
            datasets.disable_progress_bars()  # one set of bars per run, not one per rank
        self.data = self.build_data()
        self.data.check()
        self.models: dict[str, RoleModel] = self.build_roles()
        self.trainables: dict[str, RoleModel] = {n: m for n, m in self.models.items() if m.trainable}
        self.trainable = next(iter(self.trainables.values()))  # the first; plan_roles checked there is one

    @classmethod
    def from_recipe(cls, recipe, *overrides: str, log: Callable[[str], None] = print, **keys) -> "RoleTrainer":
        """This trainer, built from a recipe as `distill.run` takes it (a file, a shipped recipe's name, a mapping;
        `keys` and dotted `overrides` over it: `load_recipe`): checked, data read, roles loaded.
        `.train()` runs it in this process. Called on a subclass, the subclass trains whatever `trainer` the recipe
        names; on `RoleTrainer`, the recipe's trainer."""
        if cls is not RoleTrainer:
            keys["trainer"] = cls
        validated, trainer_cls = load_recipe(recipe, *overrides, **keys)
        return trainer_cls(validated, log=log)

    def build_data(self) -> DataBundle:
        """The run's batches: text from `data.train` / `data.eval` (distill/data/); trainers with other
        records (prompts, preference pairs) return their own bundle."""
        return build_text_data(self.recipe, self.tokenizer, self.rank, self.world_size, compiled=self.compiled)

    def build_roles(self) -> dict[str, RoleModel]:
        """Every planned role, loaded (`load_model`) and prepared with its own DeepSpeed plugin; each is also an
        attribute of the trainer under its name (`self.student`)."""
        models, first = {}, {}
        for name, plan in self.plans.items():
            torch.manual_seed(self.recipe.seed)
            key, load = _init_key(plan.spec), self.load_model
            source = first.setdefault(key, name) if key else name
            if source != name:
                # Two roles built from one config start from one init. The seed alone does not give it: a ZeRO-3
                # role is initialised shard by shard and draws other values than a whole one.
                load = lambda plan, src=models[source]: copy_weights(src.module, self.load_model(plan))  # noqa: E731
            models[name] = self.manager.build(name, load, self.make_optimizer)
            setattr(self, name, models[name])
        return models

    def load_model(self, plan: RolePlan) -> torch.nn.Module:
        """One role's model, built while its plugin is active (a ZeRO-3 role is born sharded): its `model_class`
        from `from_pretrained` or `config`, then checkpointing, compiled layers and LoRA as its block asks."""
        return apply_role_options(plan, build_model(plan.spec, plan.model_config))

    def make_optimizer(self, plan: RolePlan, model: torch.nn.Module):
        """(optimizer, scheduler) of a trainable role, over the parameters that require grad."""
        return build_optimizer(plan.spec, model, total_steps=self.total_steps, device=self.device)

    @property
    def total_steps(self) -> int:
        t = self.recipe.train
        return t.max_steps or t.epochs * self.data.steps_per_epoch

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        start, seen, ckpt = 0, 0, latest_checkpoint(self.out) if self.recipe.resume else None
        if ckpt is not None:
            state = load_checkpoint(self, ckpt)
            start, seen = state["step"], state["tokens_seen"]
            if start > self.total_steps:
                raise RecipeError(f"`resume`: {ckpt} is at step {start}, past this run's last step {self.total_steps}: "
                                  "export it (`python -m distill.export`), or resume with more steps (train.max_steps)")
            if self.accelerator.is_main_process:
                self.log(f"resumed from {ckpt} (step {start} of {self.total_steps})")
        self.start_run_dir(fresh=ckpt is None, step=start)
        tracking.start(self.accelerator, self.recipe, resumed_at=start if ckpt is not None else None)
        try:  # trackers are closed on every way out: the end, a stop signal, an error
            return self._run(start, seen)
        finally:
            tracking.finish(self.accelerator)
            self.close()
            release_run_dir(self.out)

    def close(self) -> None:
        """Stop the thread that runs frozen roles alongside (`alongside`), if one was started."""
        if "_overlap" in self.__dict__:
            self._overlap.close()

    def _run(self, start: int, seen: int) -> dict[str, Any]:
        t = self.recipe.train
        history = self._eval_before()
        batches = self.data.train_batches(start_step=start)
        bar = self._progress(self.total_steps, start)
        meter = Throughput(seen)
        bad_in_a_row = 0
        with StopOnSignal() as stop:
            for step in range(start + 1, self.total_steps + 1):
                began = time.perf_counter()
                out = self.train_step(step, next(batches), stop_requested=stop.requested)
                meter.step(out["tokens_seen"], time.perf_counter() - began)  # the step's host sync has waited for the device
                bad_in_a_row = 0 if out["finite"] else bad_in_a_row + 1
                self._log_step(step, out, meter, bar)
                if bad_in_a_row >= t.max_bad_steps:
                    raise NonFiniteLoss(f"{bad_in_a_row} steps in a row ended with a NaN/Inf loss (up to step {step}); "
                                        "lower the learning rate, check the data, or resume from an earlier checkpoint")
                stopping = stop.agree(out["stop_votes"])
                if stopping or step == self.total_steps or (t.save_every and step % t.save_every == 0):
                    save_checkpoint(self, step, meter.seen)
                if stopping:
                    bar.close()
                    self.write_metrics({"step": step, "stopped_by": stop.signal_name})
                    if self.accelerator.is_main_process:
                        self.log(f"{stop.signal_name} received: checkpoint of step {step} saved; continue with --resume")
                    return {**history, "stopped_at": step, "throughput": meter.summary()}
                if t.eval_every and step % t.eval_every == 0 and step != self.total_steps and self.data.eval is not None:
                    self.write_metrics({"step": step, **{f"eval/{k}": v for k, v in self.evaluate().items()}})
                    self.log_samples(step)
        bar.close()
        if self.data.eval is not None:
            history["after"] = self.evaluate()
            self.write_metrics({"step": self.total_steps, **{f"eval/{k}": v for k, v in history["after"].items()}})
            self.log_samples(self.total_steps)
        self.save(self.out / "final")
        history["throughput"] = meter.summary()
        if self.accelerator.is_main_process:
            (self.out / "summary.json").write_text(json.dumps(history, indent=2))
            self.report(history)
            self._tokenizer_notes(self.out / "final")
            board = "tensorboard" in tracking.resolve(self.recipe.train.report_to)
            self.log(f"run directory: {self.out} (metrics.jsonl, summary.json, final/<role>/ in HF format); "
                     f"plots: python -m distill.report {self.out}"
                     + (f"; tensorboard --logdir {tracking.logging_dir(self.out)}" if board else ""))
        return history

    def _eval_before(self) -> dict[str, Any]:
        """The eval before training, kept in the run directory so a resumed run can still compare."""
        path = self.out / "eval_before.json"
        if self.data.eval is None:
            return {}
        # Rank 0's file decides for every rank: on machines that do not share the run directory only its holds it.
        kept = broadcast_object_list([json.loads(path.read_text()) if path.exists() else None])[0]
        if kept is not None:
            return {"before": kept}
        before = self.evaluate()
        if self.accelerator.is_main_process:
            path.write_text(json.dumps(before))
        # Step 0 in metrics.jsonl too, so every eval curve starts where training did.
        self.write_metrics({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
        self.log_samples(0)
        return {"before": before}

    def train_step(self, step: int, micro_batches: list[dict], *, stop_requested: bool = False) -> dict[str, Any]:
        """One optimizer step of every trainable role over the step's `grad_accum` micro-batches: `prepare_step`,
        then `loss_step` and each role's backward of its loss (`loss_keys`) for each, each role's optimizer step
        at the last.

        Returns the step's results over all ranks: `losses` (each component summed over the micro-batches),
        `roles` (per trainable role: its `lr`, `grad_norm` and `finite`, False when its loss was NaN/Inf on any
        rank: DeepSpeed then skips its update, its gradient norm not being finite), `tokens_seen`, `finite`
        (every role's), `stop_votes` (ranks that were asked to stop), and with one trainable role its `lr` and
        `grad_norm`. All of it comes back in one all-reduce and one wait on the device: the step's only host sync."""
        micro = self.prepare_step(step, [self.to_device(b) for b in micro_batches])
        roles, keys = self.trainables, self.loss_keys
        lrs = {n: role.lr() for n, role in roles.items()}  # the rates this step uses; the schedulers move on at its end
        num_tokens = self.all_reduce(sum(self.count_tokens(b) for b in micro))
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            losses = self.loss_step(batch, num_tokens)
            self._backward(losses, boundary=i == len(micro) - 1)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach().float()
        for role in roles.values():
            role.step()
        norms = [role.grad_norm() for role in roles.values()]  # global already: the same on every rank
        local = torch.stack([sum(b["attention_mask"].sum() for b in micro).to(self.device).float(),
                             torch.tensor(float(stop_requested), device=self.device),
                             *((~torch.isfinite(totals[keys[n]])).float().to(self.device) for n in roles),
                             *(torch.as_tensor(float("nan") if x is None else x, device=self.device).float() for x in norms),
                             *(v.to(self.device) for v in totals.values())])
        seen, votes, *rest = self.all_reduce(local).tolist()
        bad, norm_sums, sums = rest[:len(roles)], rest[len(roles):2 * len(roles)], rest[2 * len(roles):]
        per_role = {n: {"lr": lrs[n], "grad_norm": norm / self.world_size, "finite": b == 0}
                    for n, b, norm in zip(roles, bad, norm_sums)}
        out = {"losses": dict(zip(totals, sums)), "roles": per_role, "tokens_seen": int(seen),
               "finite": not any(bad), "stop_votes": int(votes)}
        if len(roles) == 1:
            out.update({k: v for k, v in next(iter(per_role.values())).items() if k != "finite"})
        return out

    def _backward(self, losses: dict[str, torch.Tensor], *, boundary: bool) -> None:
        """Each trainable role's backward of its loss in one micro-batch's `losses`."""
        keys = self.loss_keys
        missing = [f"`{key}` (of `{name}`)" for name, key in keys.items() if key not in losses]
        if missing:  # before any backward: no role has half a step
            raise ValueError(f"{type(self).__name__}.loss_step returned {sorted(losses)}, without {', '.join(missing)}: "
                             f"return the loss of every trainable role, keyed as `loss_keys` says ({list(keys.values())})")
        for name, key in keys.items():
            # DeepSpeed averages gradients over ranks; the losses are already global means.
            self.trainables[name].backward(losses[key] * self.world_size, boundary=boundary)

    def _log_step(self, step: int, out: dict[str, Any], meter: Throughput, bar) -> None:
        if not out["finite"]:
            self._log_skipped(step, out)
        elif step % self.recipe.train.log_every == 0 or step == self.total_steps:
            metrics = {**out["losses"], "step": step, **role_metrics(out["roles"]),
                       "tokens_per_s": meter.window_rate(), "elapsed_s": meter.elapsed(), **meter.take_startup(),
                       **self.step_metrics()}
            if torch.cuda.is_available():
                metrics["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self.write_metrics(metrics)
            losses = {k.replace("/", "_"): f"{metrics[k]:.4f}" for k in self.loss_keys.values()}
            rate = metrics["tokens_per_s"]
            bar.set_postfix(**losses, **({"tok_s": f"{rate:.0f}"} if rate is not None else {}))
        bar.update(1)

    def _log_skipped(self, step: int, out: dict[str, Any]) -> None:
        """A step whose loss was NaN/Inf: DeepSpeed skipped the update of each role whose loss it was."""
        skipped = [n for n, r in out["roles"].items() if not r["finite"]]
        several = len(out["roles"]) > 1
        self.write_metrics({"step": step, "skipped": "non-finite loss", **({"skipped_roles": skipped} if several else {})})
        if self.accelerator.is_main_process:
            whose = f" of {', '.join(skipped)}" if several else ""
            self.log(f"warning: step {step} had a NaN/Inf loss{whose}; "
                     f"{'their updates were' if len(skipped) > 1 else 'its update was'} skipped")

    def report(self, history: dict[str, Any]) -> None:
        """Print what the run achieved (main process); `history` holds the eval before and after."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted means over the whole eval set; every rank runs the same number of batches.

        `eval_step` returns sums and their normalisers: `tokens`, and `<group>/tokens` for the
        metrics named `<group>/...` (e.g. metrics over sampled completions)."""
        for role in self.trainables.values():
            role.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in self.data.eval_batches(self.recipe.train.eval_batches):
            for k, v in self.eval_step(self.to_device(batch)).items():
                sums[k] = sums.get(k, 0) + v.double()
        for role in self.trainables.values():
            role.engine.train()
        sums = {k: self.all_reduce(v) for k, v in sums.items()}
        counts = {k: sums.pop(k).clamp(min=1) for k in list(sums) if k == "tokens" or k.endswith("/tokens")}

        def count(metric: str) -> torch.Tensor:
            group = metric.rsplit("/", 1)[0] + "/tokens" if "/" in metric else "tokens"
            return counts.get(group, counts.get("tokens"))

        return {k: float(v / count(k)) for k, v in sums.items()}

    def log_samples(self, step: int) -> None:
        """Greedy continuations of the first `train.eval_samples` eval prompts by the first trainable causal LM: printed,
        appended to samples.jsonl and sent to the trackers as text (distill/samples.py). Collective."""
        samples.log_samples(self, step)

    def _tokenizer_notes(self, out_dir: Path) -> None:
        """Say where `AutoTokenizer` would load a saved role's tokenizer as another class than the run's."""
        for m in self.models.values():
            if m.trainable and (note := auto_tokenizer_note(out_dir / m.name, self.tokenizer)):
                self.log(f"note: {note}")

    def save(self, out_dir: Path) -> None:
        """Every trainable role in HF format under out_dir/<role>/ (collective call)."""
        for m in self.models.values():
            if m.trainable:
                m.save_pretrained(out_dir / m.name, self.tokenizer)

    # -- helpers -----------------------------------------------------------------------------
    def all_reduce(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, device=self.device).clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _progress(self, total: int, initial: int = 0):
        show = self.accelerator.is_main_process and self.recipe.train.progress
        # Redraw at most every 2 s when the output is a log file rather than a terminal.
        interval = 0.1 if sys.stderr.isatty() else 2.0
        return tqdm(total=total, initial=initial, disable=not show, desc=self.name, dynamic_ncols=True, mininterval=interval)

    def start_run_dir(self, fresh: bool = True, step: int = 0) -> None:
        """The run directory for a run starting at `step`: its recipe.yaml, and metrics (and samples, trackers) new
        when `fresh`, else cut back to `step` (a resumed run logs later steps again). Every rank waits for it."""
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
            if fresh:
                (self.out / "metrics.jsonl").write_text("")
                (self.out / "samples.jsonl").unlink(missing_ok=True)
                (self.out / "eval_before.json").unlink(missing_ok=True)
                shutil.rmtree(tracking.logging_dir(self.out), ignore_errors=True)  # like metrics.jsonl
            else:  # a resumed run appends to its metrics, from the checkpoint's step on: later lines come again
                truncate_metrics(self.out, step)
        self.accelerator.wait_for_everyone()

    def write_metrics(self, metrics: dict) -> None:
        """One line of metrics.jsonl; its numbers also go to the trackers of `train.report_to`, same step."""
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            values = tracking.numeric(metrics)
            if values and self.accelerator.trackers:
                self.accelerator.log(values, step=metrics["step"])


# -- trainers by name, as recipes select them with `trainer: NAME` ---------------------------------
TRAINERS: Registry = Registry("trainer")


def register_trainer(cls):
    """Class decorator: make a RoleTrainer subclass selectable as `trainer: <cls.name>` in a recipe."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name` to be registered")
    return TRAINERS.register(cls.name, override=True)(cls)  # re-importing a trainer module re-registers it


def get_trainer(name: str) -> type[RoleTrainer]:
    """A registered name (`distill`), or `module:Class` for a trainer in your own importable module."""
    if isinstance(name, str) and ":" in name:
        return _import_trainer(name)
    try:
        return TRAINERS.lookup(name)
    except UnknownNameError as e:
        raise RecipeError(f"`trainer: {name}`: {e}; or give `module:Class` of your own RoleTrainer") from None


def _import_trainer(path: str) -> type[RoleTrainer]:
    module, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RecipeError(f"`trainer: {path}`: cannot import it ({e}); the module must be importable from the "
                          "working directory or PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, RoleTrainer)):
        raise RecipeError(f"`trainer: {path}` is not a RoleTrainer subclass")
    return cls


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


def load_recipe(recipe: str | os.PathLike | Mapping[str, Any] | RecipeBase, *overrides: str | list[str], **keys):
    """A validated recipe and its trainer class; loads no model. Returns (recipe, trainer class).

    `recipe`: a recipe file, a shipped recipe's name (`quickstart`), or the recipe's keys as a mapping (what the
    YAML file would hold; from Python, values may also be objects where the recipe takes them: `trainer` a
    RoleTrainer subclass, `data.train` / `data.eval` a `datasets.Dataset`, reward functions callables) or a
    validated recipe. `keys`: top-level recipe keys merged over it, mappings key by key (`train={"max_steps": 10}`);
    `overrides`: dotted `key.sub=value` strings (or lists of them), as on the command line, applied last."""
    dotted = [o for item in overrides for o in ([item] if isinstance(item, str) else item)]
    if isinstance(recipe, RecipeBase):
        recipe = recipe.model_dump(exclude_unset=True)
    if isinstance(recipe, Mapping):
        raw, where = dict(recipe), "the recipe"
    else:
        shipped = shipped_recipes()
        path = shipped[str(recipe)] if not os.path.exists(recipe) and str(recipe) in shipped else recipe
        raw, where = read_recipe(path), f"recipe `{path}`"
    raw = deep_merge(deep_merge(raw, keys), parse_overrides(dotted))
    if "trainer" not in raw:
        raise RecipeError(f"{where} has no `trainer:` key; add e.g. `trainer: distill`")
    trainer_cls = raw["trainer"] if isinstance(raw["trainer"], type) else get_trainer(raw["trainer"])
    if not issubclass(trainer_cls, RoleTrainer):
        raise RecipeError(f"`trainer: {trainer_cls!r}` is not a RoleTrainer subclass")
    raw["trainer"] = trainer_name(trainer_cls)
    return validate_recipe(raw, trainer_cls), trainer_cls


def trainer_name(cls: type[RoleTrainer]) -> str:
    """How a recipe names a trainer class: its registered name, else `module:Class`."""
    return cls.name if cls.name and TRAINERS.get(cls.name) is cls else f"{cls.__module__}:{cls.__qualname__}"


def _init_key(spec: Role) -> str | None:
    """What makes two random-init roles the same model at step 0 (None: loaded, or adapted by LoRA)."""
    if spec.from_pretrained is not None or spec.config is None or spec.lora is not None:
        return None
    return json.dumps([spec.model_class, spec.config], sort_keys=True, default=str)
