"""Plot tokens/s/GPU and peak memory of the distillation benchmark: naive loop against our trainer.

    R=benchmarks/results
    python benchmarks/plot_throughput.py $R/throughput_0.3b_1.4b_compiled_h200x2.json $R/throughput_1b_7b_h200x4.json \
        $R/throughput_1b_7b_compiled_h200x4.json --out docs/img/distill_throughput.png

Reads the JSON that benchmarks/distill_throughput.py writes (one file per launch, all its modes, so the
bars of a panel come from the same machine) and draws, per pair, tokens/s/GPU with
MFU above each bar, and peak memory per rank, grouped by micro-batch.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = [("naive", "naive two-plugin loop"), ("sharded", "ours, teacher ZeRO-3 (tuned)"),
         ("replicated", "ours, teacher replicated")]


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="JSON files of benchmarks/distill_throughput.py")
    p.add_argument("--out", default="distill_throughput.png")
    a = p.parse_args(argv)
    runs = [json.loads(Path(f).read_text()) for f in a.results]
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 7), squeeze=False)
    for col, run in enumerate(runs):
        by = {(r["mode"], r["micro_batch"]): r for r in run["results"]}
        batches = sorted({mb for _, mb in by})
        width = 0.8 / len(MODES)
        for i, (mode, label) in enumerate(MODES):
            xs = [j + (i - (len(MODES) - 1) / 2) * width for j in range(len(batches))]
            rows = [by.get((mode, mb)) for mb in batches]
            tps = [r["tokens_per_s_per_gpu"] if r else 0 for r in rows]
            bars = axes[0][col].bar(xs, tps, width, label=label)
            for bar, r in zip(bars, rows):
                if r:
                    axes[0][col].annotate(f"{100 * r['mfu']:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                          ha="center", va="bottom", fontsize=8)
            axes[1][col].bar(xs, [max(r["peak_mem_gib_per_rank"]) if r else 0 for r in rows], width, label=label)
        title = f"{run['pair']}, {run['world_size']} x {run['device']}, seq {run['seq_len']}"
        if any("compile=true" in o for o in run.get("overrides", [])):
            title += ", ours compiled"  # the naive loop never is
        for row, ylabel in ((0, "tokens/s/GPU (MFU above)"), (1, "peak memory per rank (GiB)")):
            ax = axes[row][col]
            ax.set_xticks(range(len(batches)), [f"micro-batch {mb}" for mb in batches])
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
