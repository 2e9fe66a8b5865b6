"""`python -m distill.report RUN_DIR`: plots of a run's metrics and a short markdown summary.

Writes RUN_DIR/report/: one PNG per group of metrics found in metrics.jsonl (losses, eval
metrics, DPO and GRPO rewards, GRPO's KL, entropy, clipping and completions, throughput, learning rate) and
summary.md with the before/after evaluation, the last values and the generation samples of each evaluation
(samples.jsonl). Works for any trainer: it plots whatever keys the run logged. Metrics that compare share a
panel: a student's `eval/X` with the teacher's `eval/teacher_X` and the training `X`; the eval curves start at
step 0, the evaluation before training.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

_REWARDS = ("reward", "reward_std", "frac_reward_zero_std")  # GRPO's, beside its per-function rewards/<name>
_POLICY = ("kl", "entropy", "clip_ratio/", "completions/")  # GRPO: how far and how the policy moves, what it writes
_THROUGHPUT = ("tokens_per_s", "max_memory_gb", "gen_tokens_per_s", "gen_time_share")
_STARTUP = ("startup_s", "first_step_s")  # once per launch, in the first log line: not a series to plot
_OPTIMIZER = ("lr", "grad_norm")  # each trainable role's, `<role>/lr` when several train


def _optimizer(k: str) -> bool:
    return k.rpartition("/")[2] in _OPTIMIZER and not k.startswith("eval/")


GROUPS = {
    "loss": lambda k: not k.startswith(("eval/", "rewards/", "logps/") + _POLICY) and not _optimizer(k) and k not in
    ("elapsed_s",) + _THROUGHPUT + _REWARDS + _STARTUP,
    "eval": lambda k: k.startswith("eval/"),
    "rewards": lambda k: k.startswith(("rewards/", "logps/")) or k in _REWARDS,
    "policy": lambda k: k.startswith(_POLICY),
    "throughput": lambda k: k in _THROUGHPUT,
    "lr": _optimizer,
}


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl: is it a distill run directory?")
    return latest_timeline([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def latest_timeline(rows: list[dict]) -> list[dict]:
    """The rows of the run as it went on last: a run resumed at step S logs steps after S again (a run
    directory written before metrics were cut back on resume holds both). A metric logged again at a step
    marks the resume: the earlier rows from that step on are dropped."""
    out: list[dict] = []
    seen: set[tuple] = set()  # (step, metric) pairs logged so far
    for row in rows:
        step = row.get("step", 0)
        pairs = {(step, k) for k in row if k != "step"}
        if pairs & seen:
            out = [r for r in out if r.get("step", 0) < step]
            seen = {(r.get("step", 0), k) for r in out for k in r if k != "step"}
        out.append(row)
        seen |= pairs
    return out


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values), numbers only."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(k, ([], []))
                out[k][0].append(row["step"])
                out[k][1].append(float(v))
    return out


def panels(group: str, keys: list[str], data: dict) -> list[tuple[str, list[str]]]:
    """(title, keys) of each panel of a group: `...teacher_X` beside `...X` (the gap between student and teacher),
    and in the eval group the training series `X` beside `eval/X` (the gap between train and eval)."""
    out: dict[str, list[str]] = {}
    for key in keys:
        head, _, name = key.rpartition("/")
        base = f"{head}/{name.removeprefix('teacher_')}" if head else name.removeprefix("teacher_")
        out.setdefault(base, []).append(key)
    if group == "eval":
        for base, members in out.items():
            train = base.removeprefix("eval/")
            if train in data and train not in members:
                members.append(train)
    return [(base, sorted(members, key=lambda k: (k != base, k))) for base, members in out.items()]


def write_report(run: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, out = series(with_before(run, read_metrics(run))), run / "report"
    out.mkdir(exist_ok=True)
    written = []
    for group, member in GROUPS.items():
        layout = panels(group, sorted(k for k in data if member(k)), data)
        if not layout:
            continue
        fig, axes = plt.subplots(len(layout), 1, figsize=(7, 2.2 * len(layout)), sharex=True, squeeze=False)
        for ax, (title, keys) in zip(axes[:, 0], layout):
            for key in keys:
                steps, values = data[key]
                train = group == "eval" and not key.startswith("eval/")
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                        linestyle="--" if train else "-", alpha=0.6 if train else 1.0,
                        label=f"{key} (train)" if train else key)
            ax.set_ylabel(title, fontsize=8)
            if len(keys) > 1:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{run.name}: {group}")
        fig.tight_layout()
        path = out / f"{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    (out / "summary.md").write_text(_summary(run, data))
    return written + [out / "summary.md"]


def with_before(run: Path, rows: list[dict]) -> list[dict]:
    """Runs that logged no eval line at step 0 (older ones) get the before-training eval of summary.json there."""
    summary = run / "summary.json"
    if any(r.get("step") == 0 and any(k.startswith("eval/") for k in r) for r in rows) or not summary.is_file():
        return rows
    before = json.loads(summary.read_text()).get("before")
    return [{"step": 0, **{f"eval/{k}": v for k, v in before.items()}}] + rows if before else rows


def _summary(run: Path, data: dict) -> str:
    lines = [f"# {run.name}", ""]
    summary = run / "summary.json"
    if summary.is_file():
        h = json.loads(summary.read_text())
        if "before" in h and "after" in h:
            lines += ["| eval metric | before | after |", "|---|---:|---:|"]
            lines += [f"| {k} | {h['before'][k]:.4f} | {h['after'][k]:.4f} |" for k in h["after"] if k in h["before"]]
            lines.append("")
        if t := h.get("throughput"):
            steady = f"{t['steady_tokens_per_s']:,.0f} tokens/s" if t.get("steady_tokens_per_s") else "one step: no steady rate"
            lines += [f"Speed of the last launch: {steady} over its steps after the first; start-up "
                      f"{t['startup_s']:.1f} s (process start to the end of the first step, which took {t['first_step_s']:.2f} s).", ""]
    lines += ["| metric | last step | last value |", "|---|---:|---:|"]
    lines += [f"| {k} | {steps[-1]} | {values[-1]:.6g} |" for k, (steps, values) in sorted(data.items())]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "samples.jsonl").is_file() else []
    if samples:
        lines += ["", "## Samples", "", "Greedy continuations of eval prompts by the trainable role at each evaluation "
                  "(samples.jsonl); `<eos>` where it stopped.", ""]
        for index in sorted({s["index"] for s in samples}):
            rows = [s for s in samples if s["index"] == index]
            lines += [f"Prompt {index}: `{_cell(rows[0]['prompt'])}`", "", "| step | completion |", "|---:|---|"]
            lines += [f"| {s['step']} | {_cell(s['completion'])}{' `<eos>`' if s['eos'] else ''} |" for s in rows]
            lines.append("")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distill report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    try:
        written = write_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"distill report: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
