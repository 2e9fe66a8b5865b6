"""RoleTrainer: the one training loop every algorithm shares.

An algorithm is a subclass that declares its `roles` and writes `loss_step` (and, for evaluation,
`eval_step`). The loop below owns everything else: data, gradient accumulation, the normalisation
of losses by the valid tokens of the whole accumulated step, logging, evaluation and saving.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml

from distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.data.loading import DataBundle, build_text_data
from distill.plan import format_plan
from distill.preflight import preflight
from distill.recipe import Role, Section
from distill.roles import RoleManager, RoleModel


class RoleTrainer:
    """Subclass, declare `roles`, write `loss_step`; see docs/writing-a-trainer.md."""

    name: ClassVar[str] = ""
    roles: ClassVar[dict[str, Role]] = {}
    """Role name -> defaults; the recipe's block of the same name overrides them."""
    sections: ClassVar[dict[str, type[Section]]] = {}
    """Extra recipe sections this algorithm reads (e.g. `kd`), name -> typed model."""

    # -- the algorithm -----------------------------------------------------------------------
    def loss_step(self, batch: dict[str, torch.Tensor], num_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch, each a sum over its tokens divided by `num_tokens` (the valid
        tokens of the whole accumulated step on all ranks). `loss` is what backward sees."""
        raise NotImplementedError

    def eval_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over the batch's valid tokens, keyed by metric; `tokens` is the count they divide by."""
        n = self.count_tokens(batch)
        losses = self.loss_step(batch, torch.ones_like(n))
        return {**{k: v.detach() for k, v in losses.items()}, "tokens": n}

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The normaliser of one micro-batch (predicted tokens; a preference trainer counts pairs)."""
        return (batch["labels"] != -100).sum()

    @classmethod
    def write_synthetic(cls, out_dir, seed: int) -> None:
        """Write the project's synthetic data for this algorithm (used when `data.synthetic_seed` is set)."""
        from distill.data.synthetic import write_dataset

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

    def build_data(self) -> DataBundle:
        return build_text_data(self.recipe, self.tokenizer, self.rank, self.world_size)

    # -- setup -------------------------------------------------------------------------------
    def __init__(self, recipe, *, log=print):
        self.recipe, self.log = recipe, log
        self.out = Path(recipe.output_dir)
        from distill.launch import world_info

        world = world_info()[1]
        self.tokenizer, self.plans = preflight(recipe, type(self), world_size=world)
        self.manager = RoleManager(self.plans, timeout_s=recipe.launch.timeout_s)
        self.accelerator = self.manager.accelerator
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        if self.world_size != world:
            raise RuntimeError(f"launcher reports {world} processes but accelerate sees {self.world_size}")
        self.device = self.accelerator.device
        if self.accelerator.is_main_process:
            self.log(format_plan(self.plans, self.world_size))
        if not self.accelerator.is_main_process:
            import datasets

            datasets.disable_progress_bars()  # one set of bars per run, not one per rank
        self.data = self.build_data()
        self.data.check()
        self.models: dict[str, RoleModel] = {}
        for name in self.plans:
            torch.manual_seed(recipe.seed)  # per role: two roles built from one config get one init
            self.models[name] = self.manager.build(name, self._load_model, self._make_optimizer)
            setattr(self, name, self.models[name])
        self.trainable = next(m for m in self.models.values() if m.trainable)  # plan_roles checked there is one

    def _load_model(self, plan):
        from transformers import AutoModelForCausalLM

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.spec.precision]
        if plan.spec.from_pretrained:
            model = AutoModelForCausalLM.from_pretrained(plan.spec.from_pretrained, dtype=dtype,
                                                         trust_remote_code=plan.spec.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_config(plan.model_config, dtype=dtype)
        if plan.spec.gradient_checkpointing and plan.spec.trainable:
            model.gradient_checkpointing_enable()
            if plan.spec.lora is not None:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
        if plan.spec.lora is not None:
            from distill.lora import apply_lora

            model = apply_lora(model, plan.spec.lora, plan.name)  # before the optimizer: it sees only the adapter
        return model

    def _make_optimizer(self, plan, model):
        spec, sched = plan.spec.optimizer, plan.spec.scheduler
        params = [p for p in model.parameters() if p.requires_grad]
        if spec.name == "adamw":
            opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
        total, warm, floor = self.total_steps, sched.warmup_steps, sched.min_lr_ratio

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = min(1.0, (step - warm) / max(1, total - warm))
            shape = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[sched.name]
            return floor + (1 - floor) * shape  # constant: shape 1, so the floor does not matter

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    @property
    def total_steps(self) -> int:
        t = self.recipe.train
        return t.max_steps or t.epochs * self.data.steps_per_epoch

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        t = self.recipe.train
        start, seen, ckpt = 0, 0, latest_checkpoint(self.out) if self.recipe.resume else None
        if ckpt is not None:
            state = load_checkpoint(self, ckpt)
            start, seen = state["step"], state["tokens_seen"]
            if self.accelerator.is_main_process:
                self.log(f"resumed from {ckpt} (step {start} of {self.total_steps})")
        self._start_run_dir(fresh=ckpt is None)
        history = self._eval_before()
        batches = self.data.train_batches(start_step=start)
        bar = self._progress(self.total_steps, start)
        meter = Throughput(seen)
        bad_in_a_row = 0
        with StopOnSignal() as stop:
            for step in range(start + 1, self.total_steps + 1):
                finite = self._train_step(step, next(batches), meter, bar)
                bad_in_a_row = 0 if finite else bad_in_a_row + 1
                if bad_in_a_row >= t.max_bad_steps:
                    raise NonFiniteLoss(f"{bad_in_a_row} steps in a row ended with a NaN/Inf loss (up to step {step}); "
                                        "lower the learning rate, check the data, or resume from an earlier checkpoint")
                stopping = stop.agreed(self._all_reduce)
                if stopping or step == self.total_steps or (t.save_every and step % t.save_every == 0):
                    save_checkpoint(self, step, meter.seen)
                if stopping:
                    bar.close()
                    self._write_metrics({"step": step, "stopped_by": stop.signal_name})
                    if self.accelerator.is_main_process:
                        self.log(f"{stop.signal_name} received: checkpoint of step {step} saved; continue with --resume")
                    return {**history, "stopped_at": step}
                if t.eval_every and step % t.eval_every == 0 and step != self.total_steps and self.data.eval is not None:
                    self._write_metrics({"step": step, **{f"eval/{k}": v for k, v in self.evaluate().items()}})
        bar.close()
        if self.data.eval is not None:
            history["after"] = self.evaluate()
            self._write_metrics({"step": self.total_steps, **{f"eval/{k}": v for k, v in history["after"].items()}})
        self.save(self.out / "final")
        if self.accelerator.is_main_process:
            (self.out / "summary.json").write_text(json.dumps(history, indent=2))
            self.report(history)
            self.log(f"run directory: {self.out} (metrics.jsonl, summary.json, final/<role>/ in HF format); "
                     f"plots: python -m distill.report {self.out}")
        return history

    def _eval_before(self) -> dict[str, Any]:
        """The eval before training, kept in the run directory so a resumed run can still compare."""
        path = self.out / "eval_before.json"
        if self.data.eval is None:
            return {}
        if path.exists():
            return {"before": json.loads(path.read_text())}
        before = self.evaluate()
        if self.accelerator.is_main_process:
            path.write_text(json.dumps(before))
        return {"before": before}

    def _train_step(self, step: int, micro_batches: list[dict], meter: "Throughput", bar) -> bool:
        """One optimizer step over `grad_accum` micro-batches, logged every `train.log_every` steps.

        Returns False when a loss was NaN/Inf on any rank: every rank learns it from one all-reduce,
        and DeepSpeed skips the optimizer step because the gradient norm is not finite."""
        micro = [self._to_device(b) for b in micro_batches]
        lr = self.trainable.lr()  # the rate this step uses; the scheduler moves on at its end
        num_tokens = self._all_reduce(sum(self.count_tokens(b) for b in micro))
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            losses = self.loss_step(batch, num_tokens)
            # DeepSpeed averages gradients over ranks; the losses are already global means.
            self.trainable.backward(losses["loss"] * self.world_size, boundary=i == len(micro) - 1)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach().float()
        meter.seen += int(self._all_reduce(sum(b["attention_mask"].sum() for b in micro)))
        finite = int(self._all_reduce(int(not torch.isfinite(totals["loss"])))) == 0
        if not finite:
            self._write_metrics({"step": step, "skipped": "non-finite loss"})
            if self.accelerator.is_main_process:
                self.log(f"warning: step {step} had a NaN/Inf loss; its update was skipped")
            bar.update(1)
            return False
        if step % self.recipe.train.log_every == 0 or step == self.total_steps:
            metrics = {k: float(self._all_reduce(v)) for k, v in totals.items()}
            metrics.update(step=step, lr=lr, grad_norm=self.trainable.grad_norm(), tokens_per_s=meter.rate(),
                           elapsed_s=meter.elapsed())
            if torch.cuda.is_available():
                metrics["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            self._write_metrics(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        bar.update(1)
        return True

    def report(self, history: dict[str, Any]) -> None:
        """Print what the run achieved (main process); `history` holds the eval before and after."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted means over the whole eval set; every rank runs the same number of batches."""
        self.trainable.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in self.data.eval_batches(self.recipe.train.eval_batches):
            for k, v in self.eval_step(self._to_device(batch)).items():
                sums[k] = sums.get(k, 0) + v.double()
        self.trainable.engine.train()
        sums = {k: self._all_reduce(v) for k, v in sums.items()}
        n = sums.pop("tokens").clamp(min=1)
        return {k: float(v / n) for k, v in sums.items()}

    def save(self, out_dir: Path) -> None:
        """Every trainable role in HF format under out_dir/<role>/ (collective call)."""
        for m in self.models.values():
            if m.trainable:
                m.save_pretrained(out_dir / m.name, self.tokenizer)

    # -- helpers -----------------------------------------------------------------------------
    def _all_reduce(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, device=self.device).clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _progress(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        show = self.accelerator.is_main_process and self.recipe.train.progress
        # Redraw at most every 2 s when the output is a log file rather than a terminal.
        interval = 0.1 if sys.stderr.isatty() else 2.0
        return tqdm(total=total, initial=initial, disable=not show, desc=self.name, dynamic_ncols=True, mininterval=interval)

    def _start_run_dir(self, fresh: bool = True) -> None:
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False))
            if fresh:  # a resumed run appends to the metrics it already has
                (self.out / "metrics.jsonl").write_text("")
                (self.out / "eval_before.json").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _write_metrics(self, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")


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
    """Turns SIGTERM/SIGINT into a request to stop after the current step, agreed by every rank."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, all_reduce) -> bool:
        """Collective: true on every rank when a signal reached any rank (one tiny all-reduce a step)."""
        if int(all_reduce(torch.tensor(int(self.signal_name is not None)))) == 0:
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
