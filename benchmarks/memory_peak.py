"""What is alive at a run's peak of allocated GPU memory, and where each piece was allocated.

A CUDA memory snapshot (torch.cuda.memory._record_memory_history, then _snapshot or _dump_snapshot)
holds every allocation and free in order, with its Python stack. Replaying them gives the moment of
the peak (`torch.cuda.max_memory_allocated`'s moment, if recording started before the first
allocation) and the allocations alive then, grouped by stream and by where they were made:

    python benchmarks/memory_peak.py SNAPSHOT.pickle [--device 0] [--top 30]

`benchmarks/dpo.py --memory-snapshot DIR` writes such a summary for each side and rank.
"""
from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

# Frames from these files say who asked for the memory; torch's own frames say only how.
CALLERS = ("/distill/", "/trl/", "/benchmarks/", "/transformers/", "/deepspeed/", "/accelerate/", "/peft/")


def peak_allocations(trace: list[dict]) -> tuple[int, int, list[dict]]:
    """(peak bytes, index of the event that reached it, the alloc events alive then) of one device's trace.

    Counts as torch's allocated-bytes statistic does: up at `alloc`, down at `free_requested` (a block
    used by another stream is handed back later, at `free_completed`, but stops counting at once).
    Allocations made before recording started are not in the trace, so not counted."""
    live: dict[int, dict] = {}
    now = peak = 0
    at = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            now += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            now -= live.pop(e["addr"])["size"]
        else:
            continue
        if now > peak:
            peak, at = now, i
    if at < 0:
        return 0, -1, []
    alive: dict[int, dict] = {}
    for e in trace[:at + 1]:
        if e["action"] == "alloc":
            alive[e["addr"]] = e
        elif e["action"] == "free_requested":
            alive.pop(e["addr"], None)
    return peak, at, list(alive.values())


def site(frames: list[dict], depth: int = 2) -> str:
    """The innermost `depth` frames of code outside torch itself: `file:line function` joined by ' < '."""
    picked = [f for f in frames if any(c in f["filename"] for c in CALLERS)][:depth]
    if not picked:
        picked = frames[:1]
    return " < ".join(f"{_short(f['filename'])}:{f['line']} {f['name']}" for f in picked) or "(no stack)"


def _short(path: str) -> str:
    for c in CALLERS:
        if c in path:
            return c.strip("/") + "/" + path.split(c, 1)[1]
    return path.rsplit("/", 1)[-1]


def summarise(snapshot: dict, device: int = 0, top: int = 30, depth: int = 2) -> str:
    """A text table: the peak, its split by stream, and the largest groups of allocations alive at it."""
    trace = snapshot["device_traces"][device]
    peak, at, alive = peak_allocations(trace)
    if at < 0:
        return f"device {device}: no allocation in the trace\n"
    mib = 2**20
    lines = [f"device {device}: peak {peak / mib:.1f} MiB allocated at event {at} of {len(trace)} "
             f"({len(alive)} allocations alive)"]
    by_stream: dict[int, int] = defaultdict(int)
    for e in alive:
        by_stream[e["stream"]] += e["size"]
    lines.append("by stream: " + ", ".join(f"{s}: {b / mib:.1f} MiB" for s, b in sorted(by_stream.items())))
    groups: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
    for e in alive:
        g = groups[(e["stream"], site(e.get("frames", []), depth))]
        g[0] += e["size"]
        g[1] += 1
    lines.append(f"{'MiB':>9} {'count':>6} {'stream':>8}  allocated at")
    for (stream, where), (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / mib:9.1f} {n:6d} {stream:>8}  {where}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshot", help="a pickle from torch.cuda.memory._dump_snapshot")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--top", type=int, default=30, help="groups listed")
    p.add_argument("--depth", type=int, default=2, help="frames outside torch that name a group")
    a = p.parse_args(argv)
    with open(a.snapshot, "rb") as f:
        print(summarise(pickle.load(f), a.device, a.top, a.depth), end="")


if __name__ == "__main__":
    main()
