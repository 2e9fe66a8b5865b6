"""The RLHF pipeline's report: the learned reward against the ground truth on held-out prompts, per RL run.

Reads each RL run's metrics.jsonl (distill.report's reader): `eval/rewards/reward_model` (the learned reward) and
`eval/rewards/ground_truth` (the truth) at every evaluation, `kl` and `completions/mean_length` of the training
batches; the reward model's summary.json and the pairs' meta.json. Writes `report/rewards.png`, `report/policy.png`
and `report/summary.md`, whose table it returns.
"""
from __future__ import annotations

import json
from pathlib import Path

from distill.cli.report import read_metrics, series

LEARNED, TRUTH = "rewards/reward_model", "rewards/ground_truth"
GAIN = 0.05
"""A change of the truth smaller than this (its scale is 0 to 1) counts as flat."""


def run_summary(run: Path, logged: list[str] = ()) -> dict:
    """Start and end of the held-out learned reward and truth, the truth's peak, the last KL and the lengths, and of
    each `logged` reward function's held-out mean."""
    data = series(read_metrics(run))
    (steps, learned), (_, truth) = data[f"eval/{LEARNED}"], data[f"eval/{TRUTH}"]
    peak = max(range(len(truth)), key=truth.__getitem__)
    lengths = data["eval/completions/mean_length"][1]
    return {"steps": steps[-1], "learned": (learned[0], learned[-1]), "truth": (truth[0], truth[-1]),
            "truth_peak": (truth[peak], steps[peak]), "learned_at_peak": learned[peak],
            "kl": data["kl"][1][-1] if "kl" in data else None, "length": (lengths[0], lengths[-1]),
            "logged": {name: (v[0], v[-1]) for name in logged if (v := data.get(f"eval/rewards/{name}", (0, []))[1])}}


def verdict(s: dict) -> str:
    """Whether the policy improved by the truth, and whether it games the learned reward (learned up, truth not)."""
    truth_gain = s["truth"][1] - s["truth"][0]
    learned_up = s["learned"][1] > s["learned"][0]
    gamed = learned_up and s["learned"][1] > s["learned_at_peak"] and s["truth_peak"][0] - s["truth"][1] > GAIN
    if truth_gain > GAIN:
        return f"improves by the truth; past step {s['truth_peak'][1]} games the learned reward" if gamed else "improves by the truth"
    if not learned_up:
        return "no gain by either"
    fell = s["truth_peak"][0] - s["truth"][1] > GAIN
    return (f"games the learned reward (learned up, truth down from its peak at step {s['truth_peak'][1]})" if fell
            else "games the learned reward (learned up, truth flat)")


def write_pipeline_report(out: Path, runs: list[str], *, logged: list[str] = ()) -> str:
    """report/rewards.png, report/policy.png and report/summary.md of the RL `runs` under `out`, the held-out means of
    the `logged` reward functions (metric names) in the table; returns the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = out / "report"
    report.mkdir(exist_ok=True)
    data = {name: series(read_metrics(out / name)) for name in runs}
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 2.8 * len(runs)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], runs):
        d, right = data[name], ax.twinx()
        for axis, key, color, label in ((ax, TRUTH, "tab:green", "ground truth"), (right, LEARNED, "tab:blue", "learned reward")):
            axis.plot(*d[f"eval/{key}"], color=color, marker="o", markersize=3, label=f"{label} (held-out)")
            if key in d:
                axis.plot(*d[key], color=color, linestyle="--", alpha=0.4, label=f"{label} (train batches)")
            axis.set_ylabel(label, color=color, fontsize=8)
        for key in logged:  # on the truth's axis: the shipped one, like the truth, is a share from 0 to 1
            if f"eval/rewards/{key}" in d:
                ax.plot(*d[f"eval/rewards/{key}"], color="tab:gray", linestyle=":", marker=".", label=f"{key} (held-out)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{out.name}: learned reward vs ground truth")
    fig.tight_layout()
    fig.savefig(report / "rewards.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(7, 4.4), sharex=True)
    for name in runs:
        if "kl" in data[name]:
            axes[0].plot(*data[name]["kl"], label=name)
        axes[1].plot(*data[name]["eval/completions/mean_length"], marker="o", markersize=3, label=name)
    axes[0].set_ylabel("KL to the reference\n(per token, train)", fontsize=8)
    axes[1].set_ylabel("completion length\n(held-out)", fontsize=8)
    axes[1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "policy.png", dpi=110)
    plt.close(fig)

    table = summary_table(out, runs, logged)
    (report / "summary.md").write_text(table + "\n")
    return table


def summary_table(out: Path, runs: list[str], logged: list[str] = ()) -> str:
    lines = [f"# {out.name}", ""]
    meta_file = out / "pairs" / "meta.json"
    if meta_file.is_file():
        m = json.loads(meta_file.read_text())
        lines += [f"Pairs: {m['train']['pairs']} train ({m['train']['flipped']:.1%} flipped, label noise {m['label_noise']}), "
                  f"{m['eval']['pairs']} eval; the SFT model's mean truth on its samples {m['train']['truth_mean']:.3f}.", ""]
    rm = out / "reward" / "summary.json"
    if rm.is_file():
        h = json.loads(rm.read_text())
        lines += [f"Reward model: eval accuracy against the truth {h['before']['accuracy']:.3f} before training, "
                  f"{h['after']['accuracy']:.3f} after.", ""]
    lines += ["| run | steps | learned reward (held-out) | ground truth (held-out) | truth peak (step) | KL at end | length | "
              + "".join(f"{name} | " for name in logged) + "verdict |",
              "|---|---:|---|---|---|---:|---|" + "---|" * len(logged) + "---|"]
    for name in runs:
        s = run_summary(out / name, logged)
        kl = "" if s["kl"] is None else f"{s['kl']:.3f}"
        extra = "".join(f"{a:.3f} → {b:.3f} | " if (a, b) != (None, None) else " | "
                        for a, b in (s["logged"].get(n, (None, None)) for n in logged))
        lines.append(f"| {name} | {s['steps']} | {s['learned'][0]:.3f} → {s['learned'][1]:.3f} | {s['truth'][0]:.3f} → "
                     f"{s['truth'][1]:.3f} | {s['truth_peak'][0]:.3f} ({s['truth_peak'][1]}) | {kl} | "
                     f"{s['length'][0]:.1f} → {s['length'][1]:.1f} | {extra}{verdict(s)} |")
    return "\n".join(lines)
