"""The run over the steps, as `RoleTrainer.train` drives it: the eval before training, each optimizer step
(`RoleTrainer.train_step`) and its metrics line, checkpoints on schedule and on a stop signal, evaluations, and
the final save, summary and report. Functions of the trainer: they read its public attributes and hooks only.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

import distill.loop.tracking as tracking
from distill.loop.checkpoint import save_checkpoint
from distill.loop.monitor import NonFiniteLoss, StopOnSignal, Throughput, role_metrics
from distill.models.tokenizer_files import auto_tokenizer_note


def run_steps(trainer, start: int, seen: int) -> dict[str, Any]:
    """Steps `start + 1` .. `trainer.total_steps` (`seen` tokens trained on before them), then the final eval, save
    and summary. Returns the history: the evals `before` and `after`, `throughput`, and `stopped_at` when a signal
    stopped the run (its checkpoint saved)."""
    t = trainer.recipe.train
    history = eval_before(trainer)
    batches = trainer.data.train_batches(start_step=start)
    bar = progress_bar(trainer, trainer.total_steps, start)
    meter = Throughput(seen)
    bad_in_a_row = 0
    with StopOnSignal() as stop:
        for step in range(start + 1, trainer.total_steps + 1):
            began = time.perf_counter()
            out = trainer.train_step(step, next(batches), stop_requested=stop.requested)
            meter.step(out["tokens_seen"], time.perf_counter() - began)  # the step's host sync has waited for the device
            bad_in_a_row = 0 if out["finite"] else bad_in_a_row + 1
            log_step(trainer, step, out, meter, bar)
            if bad_in_a_row >= t.max_bad_steps:
                raise NonFiniteLoss(f"{bad_in_a_row} steps in a row ended with a NaN/Inf loss (up to step {step}); "
                                    "lower the learning rate, check the data, or resume from an earlier checkpoint")
            stopping = stop.agree(out["stop_votes"])
            if stopping or step == trainer.total_steps or (t.save_every and step % t.save_every == 0):
                save_checkpoint(trainer, step, meter.seen)
            if stopping:
                bar.close()
                trainer.write_metrics({"step": step, "stopped_by": stop.signal_name})
                if trainer.accelerator.is_main_process:
                    trainer.log(f"{stop.signal_name} received: checkpoint of step {step} saved; continue with --resume")
                return {**history, "stopped_at": step, "throughput": meter.summary()}
            if t.eval_every and step % t.eval_every == 0 and step != trainer.total_steps and trainer.data.eval is not None:
                trainer.write_metrics({"step": step, **{f"eval/{k}": v for k, v in trainer.evaluate().items()}})
                trainer.log_samples(step)
    bar.close()
    if trainer.data.eval is not None:
        history["after"] = trainer.evaluate()
        trainer.write_metrics({"step": trainer.total_steps, **{f"eval/{k}": v for k, v in history["after"].items()}})
        trainer.log_samples(trainer.total_steps)
    trainer.save(trainer.out / "final")
    history["throughput"] = meter.summary()
    if trainer.accelerator.is_main_process:
        (trainer.out / "summary.json").write_text(json.dumps(history, indent=2))
        trainer.report(history)
        tokenizer_notes(trainer, trainer.out / "final")
        board = "tensorboard" in tracking.resolve(trainer.recipe.train.report_to)
        trainer.log(f"run directory: {trainer.out} (metrics.jsonl, summary.json, final/<role>/ in HF format); "
                 f"plots: python -m distill.report {trainer.out}"
                 + (f"; tensorboard --logdir {tracking.logging_dir(trainer.out)}" if board else ""))
    return history


def eval_before(trainer) -> dict[str, Any]:
    """The eval before training, kept in the run directory so a resumed run can still compare."""
    path = trainer.out / "eval_before.json"
    if trainer.data.eval is None:
        return {}
    # Rank 0's file decides for every rank: on machines that do not share the run directory only its holds it.
    kept = broadcast_object_list([json.loads(path.read_text()) if path.exists() else None])[0]
    if kept is not None:
        return {"before": kept}
    before = trainer.evaluate()
    if trainer.accelerator.is_main_process:
        path.write_text(json.dumps(before))
    # Step 0 in metrics.jsonl too, so every eval curve starts where training did.
    trainer.write_metrics({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})
    trainer.log_samples(0)
    return {"before": before}



def log_step(trainer, step: int, out: dict[str, Any], meter: Throughput, bar) -> None:
    if not out["finite"]:
        log_skipped(trainer, step, out)
    elif step % trainer.recipe.train.log_every == 0 or step == trainer.total_steps:
        metrics = {**out["losses"], "step": step, **role_metrics(out["roles"]),
                   "tokens_per_s": meter.window_rate(), "elapsed_s": meter.elapsed(), **meter.take_startup(),
                   **trainer.step_metrics()}
        if torch.cuda.is_available():
            metrics["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        trainer.write_metrics(metrics)
        losses = {k.replace("/", "_"): f"{metrics[k]:.4f}" for k in trainer.loss_keys.values()}
        rate = metrics["tokens_per_s"]
        bar.set_postfix(**losses, **({"tok_s": f"{rate:.0f}"} if rate is not None else {}))
    bar.update(1)


def log_skipped(trainer, step: int, out: dict[str, Any]) -> None:
    """A step whose loss was NaN/Inf: DeepSpeed skipped the update of each role whose loss it was."""
    skipped = [n for n, r in out["roles"].items() if not r["finite"]]
    several = len(out["roles"]) > 1
    trainer.write_metrics({"step": step, "skipped": "non-finite loss", **({"skipped_roles": skipped} if several else {})})
    if trainer.accelerator.is_main_process:
        whose = f" of {', '.join(skipped)}" if several else ""
        trainer.log(f"warning: step {step} had a NaN/Inf loss{whose}; "
                 f"{'their updates were' if len(skipped) > 1 else 'its update was'} skipped")



def tokenizer_notes(trainer, out_dir: Path) -> None:
    """Say where `AutoTokenizer` would load a saved role's tokenizer as another class than the run's."""
    for m in trainer.models.values():
        if m.trainable and (note := auto_tokenizer_note(out_dir / m.name, trainer.tokenizer)):
            trainer.log(f"note: {note}")



def progress_bar(trainer, total: int, initial: int = 0):
    show = trainer.accelerator.is_main_process and trainer.recipe.train.progress
    # Redraw at most every 2 s when the output is a log file rather than a terminal.
    interval = 0.1 if sys.stderr.isatty() else 2.0
    return tqdm(total=total, initial=initial, disable=not show, desc=trainer.name, dynamic_ncols=True, mininterval=interval)
