"""Does distillation beat training without the teacher? The student trained on hard labels against
distillation arms, at equal steps, documents and seed, scored against the synthetic language's truth.

    python benchmarks/kd_results.py --size cpu --out runs/kd_results_cpu          # 2 cores: a few minutes
    python benchmarks/kd_results.py --size gpu --teacher runs/gpu_teacher_pretrain/final/model \
        --out runs/kd_results_gpu                                                  # one GPU
    python benchmarks/kd_results.py --size cpu --arms hard gkd gkd_fkl --budgets quarter --seeds 0 1 2

Writes OUT/kd_results.json (every run, and per budget and arm the means over seeds) and
OUT/kd_results.png (held-out CE against training tokens, one line per arm, one panel per budget).

Every arm trains the same student from the same init on the same documents of the synthetic
language, in the same order (`seed`), for the same number of steps, and differs only in its `kd`
section (`ARMS`). The documents are prompt records with an empty prompt and the whole document as
the completion, so offline arms learn every token after `<bos>`, as on plain text, and on-policy
arms sample whole documents from `<bos>`. The budgets: `full` is `steps` optimizer steps of
`micro_batch` documents, one pass over fresh documents; `quarter` is the same steps (and schedule) with
a quarter of the documents in each, so a quarter of the training tokens.

Each final student is scored on the held-out documents (`distill.data.synthetic_eval.score_text`):
cross-entropy (CE), KL(true || student) against the language's exact next-token distribution,
KL(teacher || student), and the probability it puts on impossible tokens; and on 256 of its own
samples (`score_samples`): the share the language can produce. `gap_closed` is
(CE_hard - CE_arm) / (CE_hard - CE_teacher) per seed; `gap_closed_kl_true` the same in KL(true || .).

All runs of one invocation share one process (the trainer API, one after the other), so the
start-up is paid once; every run is `launch.num_processes=1`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SIZES = {
    # The quickstart's student and the shipped teacher (0.06M and 0.34M parameters).
    "cpu": dict(recipe="quickstart", teacher="distill:assets/teacher", micro_batch=32, steps=124, n_eval=200,
                eval_points=8, eval_batches=None, samples=256, overrides=[]),
    # A ~60M student from the ~0.32B teacher of recipes/gpu_teacher_pretrain.yaml, pretrained first if missing.
    "gpu": dict(recipe="gpu_kd_60m_0.3b", teacher="runs/gpu_teacher_pretrain/final/model",
                teacher_recipe="gpu_teacher_pretrain", teacher_data=dict(n_train=170_000, n_eval=512),
                teacher_overrides=[], micro_batch=128, steps=96, n_eval=512, eval_points=8, eval_batches=2,
                samples=512, overrides=[]),
}
# The gpu size's path at toy scale, to check it on a CPU: `--size tiny` (a minute or two).
_TINY = ["vocab_size=64", "hidden_size=32", "intermediate_size=64", "num_hidden_layers=2", "num_attention_heads=2",
         "num_key_value_heads=2", "max_position_embeddings=128"]
SIZES["tiny"] = {**SIZES["gpu"], "teacher": "runs/kd_results_tiny_teacher/final/model", "teacher_data": dict(n_train=2000, n_eval=64),
                 "teacher_overrides": [f"model.config.{c}" for c in _TINY] + [
                     "output_dir=runs/kd_results_tiny_teacher", "data.train=runs/kd_results_tiny_data/train.jsonl",
                     "data.eval=runs/kd_results_tiny_data/eval.jsonl", "data.tokenizer=runs/kd_results_tiny_data/tokenizer",
                     "model.precision=fp32", "data.max_length=128", "train.max_steps=30", "train.eval_every=10",
                     "model.optimizer.lr=3e-3"],
                 "micro_batch": 16, "steps": 8, "n_eval": 64, "samples": 32, "eval_points": 2,
                 "overrides": [f"student.config.{c}" for c in _TINY] + ["student.precision=fp32", "teacher.precision=fp32"]}
SENTENCES = (1, 4)  # sentences per document, as write_dataset draws them
MAX_NEW = 64  # longest sampled document: of 20000 documents of 1-4 sentences the longest had 56 tokens
JSD = ["kd.loss=generalized_jsd", "kd.params={beta: 0.5}"]
ON_POLICY = f"kd.on_policy={{lmbda: 1.0, max_new_tokens: {MAX_NEW}, temperature: 1.0}}"
ARMS = {  # name: the `kd` overrides of the arm
    "hard": ["kd.alpha=1"],  # cross-entropy on the labels only; the teacher is run but unused
    "forward_kl": ["kd.loss=forward_kl", "kd.alpha=0"],
    "mix": ["kd.loss=forward_kl", "kd.alpha=0.5"],  # the quickstart's loss
    "reverse_kl": ["kd.loss=reverse_kl", "kd.alpha=0"],
    "jsd": [*JSD, "kd.alpha=0"],
    # On-policy (GKD), as onpolicy_quickstart.yaml ships it: the student's own samples, JSD(0.5).
    "gkd": [*JSD, "kd.alpha=0", ON_POLICY],
    # The same with forward KL or reverse KL, with half the batches the dataset's, and sampling at T=0.5.
    "gkd_fkl": ["kd.loss=forward_kl", "kd.alpha=0", ON_POLICY],
    "gkd_rkl": ["kd.loss=reverse_kl", "kd.alpha=0", ON_POLICY],
    "gkd_mix": ["kd.loss=forward_kl", "kd.alpha=0", ON_POLICY, "kd.on_policy.lmbda=0.5"],
    "gkd_jsd_mix": [*JSD, "kd.alpha=0", ON_POLICY, "kd.on_policy.lmbda=0.5"],
    "gkd_fkl_t05": ["kd.loss=forward_kl", "kd.alpha=0", ON_POLICY, "kd.on_policy.temperature=0.5"],
}
CACHES = {  # an arm trained from a teacher cache: what `python -m distill.teacher_cache` stores for it (`kd.cache`)
    "cache_top32": {"format": "topk", "k": 32, "values": "sqrt8"},
    "cache_hybrid": {"format": "sampled", "k": 24, "samples": 32, "values": "sqrt12"},
}
ARMS.update({  # offline forward KL from the caches: no teacher loaded; written once per invocation, before the arm
    "cache_top32": ["kd.loss=forward_kl", "kd.alpha=0", "kd.cache.tail=bucket"],
    "cache_hybrid": ["kd.loss=forward_kl", "kd.alpha=0"],
})
DEFAULT_ARMS = ["hard", "forward_kl", "reverse_kl", "jsd", "gkd"]
BUDGETS = {"full": 1, "quarter": 4}  # documents per step divided by


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS)
    p.add_argument("--budgets", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--teacher", help="the teacher's HF directory (default: the size's)")
    p.add_argument("--steps", type=int, help="optimizer steps of every budget (default: the size's)")
    p.add_argument("--samples", type=int, help="documents each student samples to be scored (default: the size's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more recipe overrides, every run")
    p.add_argument("--teacher-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the teacher's pretraining recipe, when the size pretrains one")
    p.add_argument("--out", default="runs/kd_results", help="directory for the runs, the JSON and the plot")
    p.add_argument("--json", help="also write the results here, after every run (default: OUT/kd_results.json only)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-from", metavar="JSON", help="only draw the plot (and print the table) of a results file")
    p.add_argument("--init-gradients", action="store_true",
                   help="only print each loss's gradient norm on a fresh student's logits, at 53 and 32000 logits")
    return p.parse_args(argv)


def write_documents(root: Path, *, n_train: int, n_eval: int) -> dict[str, str]:
    """The synthetic language (seed 0) as prompt records with an empty prompt: the document is the completion."""
    from distill.data.synthetic import write_dataset

    meta = write_dataset(root, seed=0, n_train=n_train, n_eval=n_eval, sentences_per_doc=SENTENCES)
    paths = {"tokenizer": str(root / "tokenizer"), "entropy_per_token": meta["entropy_per_token"]}
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
        path = root / f"docs_{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": "", "completion": r["text"]}) + "\n" for r in rows))
        paths[split], paths[f"{split}_texts"] = str(path), [r["text"] for r in rows]
    return paths


def train(recipe: str, overrides: list[str], log) -> float:
    """One run through the trainer API in this process; its wall time in seconds."""
    from distill_setups import reset_between_modes

    from distill.trainers import load_recipe

    recipe, trainer_cls = load_recipe(recipe, overrides)
    t0 = time.perf_counter()
    try:
        trainer_cls(recipe, log=log).train()
    finally:
        reset_between_modes()
    return time.perf_counter() - t0


def write_teacher_cache(recipe: str, overrides: list[str], settings: dict, where: Path, log) -> float:
    """The teacher cache of `settings` for the runs' data in `where` (kept if it is there already); its wall time."""
    from distill_setups import reset_between_modes

    from distill.trainers.cache_writer import load_writer_recipe, write_cache

    t0 = time.perf_counter()
    sets = [f"kd.cache.{k}={v}" for k, v in settings.items()] + [f"kd.cache.dir={where}", "kd.cache.overwrite=true"]
    try:
        write_cache(load_writer_recipe(recipe, overrides + sets), log=log)
    finally:
        reset_between_modes()
    return time.perf_counter() - t0


def init_gradients(vocab: int, language: int = 53, rows: int = 256, seed: int = 0) -> dict[str, float]:
    """Norm of each divergence's gradient on a fresh student's logits: a head of `vocab` logits near 0
    (random init) against a trained teacher's, whose mass is on the first `language` ids.

    By the chain rule through the softmax, d/dz_v = q_v * (g_v - sum_u q_u g_u) with g = dD/dq: every token's
    push is weighted by the student's own probability q_v, except for forward KL, whose g_v = -p_v / q_v cancels
    it (d/dz = q - p). A fresh head gives each token q_v = 1/vocab."""
    import torch

    from distill.losses import cross_entropy, get_kd_loss

    g = torch.Generator().manual_seed(seed)
    teacher = torch.full((rows, vocab), -30.0)
    teacher[:, :language] = 2 * torch.randn(rows, language, generator=g)
    labels = torch.randint(0, language, (rows,), generator=g)
    out = {}
    for name, params in (("hard", None), ("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.5})):
        student = (0.02 * torch.randn(rows, vocab, generator=g)).requires_grad_()
        if params is None:
            loss = cross_entropy(student, labels)
        else:
            loss = get_kd_loss("generalized_jsd" if name == "jsd" else name)(student, teacher, labels, **params)
        loss.backward()
        out[name] = float(student.grad.norm())
    return out


def pretrain_teacher(size: dict, teacher_path: str) -> dict:
    """Train the size's teacher with its recipe (data first) unless `teacher_path` holds one already."""
    from distill.data.synthetic import write_dataset
    from distill.trainers import load_recipe

    if (Path(teacher_path) / "config.json").exists():
        return {"recipe": None, "note": "found, not trained by this run"}
    if Path(teacher_path).parts[-2:] != ("final", "model"):
        raise SystemExit(f"--teacher {teacher_path}: no model there; to train one, give a path ending in final/model")
    overrides = [*size["teacher_overrides"], f"output_dir={Path(teacher_path).parent.parent}"]
    recipe, _ = load_recipe(size["teacher_recipe"], overrides)
    t0 = time.perf_counter()
    write_dataset(Path(recipe.data.train).parent, seed=0, sentences_per_doc=SENTENCES, **size["teacher_data"])
    wall = train(size["teacher_recipe"], overrides, log=print)
    rows = [json.loads(line) for line in (Path(recipe.output_dir) / "metrics.jsonl").read_text().splitlines() if line]
    return {"recipe": size["teacher_recipe"], "overrides": overrides, "steps": recipe.train.max_steps,
            "train_wall_s": wall, "wall_s_with_data": time.perf_counter() - t0,
            "tokens": max((r["tokens_per_s"] * r["elapsed_s"] for r in rows if "tokens_per_s" in r), default=0.0),
            "eval_loss": [[r["step"], r["eval/loss"]] for r in rows if "eval/loss" in r]}


def load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config.presets import resolve_shipped

    model = AutoModelForCausalLM.from_pretrained(resolve_shipped(path))
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def scores(model, teacher, data, tokenizer, lang, n_samples: int, seed: int) -> dict:
    from distill.data.synthetic_eval import score_samples, score_text

    out = score_text(model, data["eval_texts"], tokenizer, lang, sentences_per_doc=SENTENCES, teacher=teacher)
    samples = score_samples(model, tokenizer, lang, sentences_per_doc=SENTENCES, n=n_samples, max_new_tokens=MAX_NEW,
                            seed=seed)
    return {**out, **{f"samples_{k}": v for k, v in samples.items()}}


def curve(run_dir: Path) -> list[list[float]]:
    """[step, tokens trained on, eval CE] at each evaluation of a run, from its metrics.jsonl. On-policy
    steps count the tokens they sampled, offline ones the data's."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seen = {r["step"]: r["tokens_per_s"] * r["elapsed_s"] for r in rows if "tokens_per_s" in r}
    before = json.loads((run_dir / "summary.json").read_text()).get("before", {})
    points = [[0, 0.0, before["ce"]]] if "ce" in before else []
    return points + [[r["step"], seen.get(r["step"], float("nan")), r["eval/ce"]] for r in rows if "eval/ce" in r]


def summarise(runs: list[dict]) -> dict:
    """Per budget and arm: means (and spread) over seeds, and the share of the hard-label-to-teacher gap closed
    (None where the hard-label student is already past the teacher)."""
    out: dict = {}
    hard = {(r["budget"], r["seed"]): r["eval"] for r in runs if r["arm"] == "hard"}
    for budget in dict.fromkeys(r["budget"] for r in runs):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            mine = [r for r in runs if r["budget"] == budget and r["arm"] == arm]
            if not mine:
                continue
            row = {"seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"], "micro_batch": mine[0]["micro_batch"],
                   "documents": mine[0]["documents"]}
            for key in ("ce", "kl_true", "kl_teacher", "outside_mass", "samples_valid", "samples_offpath",
                        "samples_true_nll"):
                vals = [r["eval"][key] for r in mine]
                row[key] = statistics.fmean(vals)
                row[f"{key}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row["train_tokens"] = statistics.fmean(r["train_tokens"] for r in mine)
            row["data_tokens"] = mine[0]["data_tokens"]
            row["wall_s"] = statistics.fmean(r["wall_s"] for r in mine)
            for key, name in (("ce", "gap_closed"), ("kl_true", "gap_closed_kl_true")):
                gaps = []
                for r in mine:
                    h = hard.get((budget, r["seed"]))
                    if h is not None and h[key] > h[f"teacher_{key}"]:  # no gap once hard labels pass the teacher
                        gaps.append((h[key] - r["eval"][key]) / (h[key] - h[f"teacher_{key}"]))
                row[name] = statistics.fmean(gaps) if gaps else None
            out.setdefault(budget, {})[arm] = row
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(result["summary"])
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.2), squeeze=False)
    teacher_ce = result["teacher"]["ce"]
    for ax, budget in zip(axes[0], budgets):
        for arm in result["summary"][budget]:
            runs = [r for r in result["runs"] if r["budget"] == budget and r["arm"] == arm]
            pts = runs[0]["curve"]  # the first seed's curve; the legend has the mean over seeds
            row = result["summary"][budget][arm]
            gap = row["gap_closed"]
            label = f"{arm}: {row['ce']:.4f}" + ("" if arm == "hard" or gap is None else
                                                 f", gap closed {gap:.0%}" if gap >= 0 else ", worse than hard labels")
            # x: the data's tokens at that step, the same for every arm (an on-policy step trains on as
            # many documents, sampled)
            per_step = runs[0]["micro_batch"] * result["data_tokens_per_document"]
            ax.plot([p[0] * per_step / 1e3 for p in pts[1:]], [p[2] for p in pts[1:]],
                    marker="o", ms=3, label=label)
        ax.axhline(teacher_ce, color="black", ls="--", lw=1, label=f"teacher: {teacher_ce:.4f}")
        ax.axhline(result["language"]["eval_entropy"], color="grey", ls=":", lw=1,
                   label=f"true entropy: {result['language']['eval_entropy']:.4f}")
        # Zoomed on the last stretch, where the arms differ; the legend has every arm's final CE.
        ax.set_ylim(result["language"]["eval_entropy"] - 0.01, teacher_ce + 0.25)
        ax.set_xlabel("training tokens of the data (thousands)")
        ax.set_ylabel("held-out CE (nats/token)")
        some = next(iter(result["summary"][budget].values()))
        ax.set_title(f"{result['size']} size, {budget} budget: {some['steps']} steps of {some['micro_batch']} documents")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    seeds = sorted({r["seed"] for r in result["runs"]})
    fig.suptitle(f"student {result['runs'][0]['student_params'] / 1e6:.2f}M from teacher {result['teacher']['params'] / 1e6:.2f}M"
                 f" parameters; {result['device']}; commit {result['commit']}"
                 + (f"; curves: seed {seeds[0]}, legend: mean over seeds {seeds}" if len(seeds) > 1 else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.init_gradients:
        grads = {v: init_gradients(v) for v in (53, 32000)}
        for v, g in grads.items():
            print(f"{v:>6} logits: " + "  ".join(f"{k} {x:.2e} (forward_kl / it: {g['forward_kl'] / x:.1f})" for k, x in g.items()))
        return grads
    if a.plot_from:
        result = json.loads(Path(a.plot_from).read_text())
        print(table(result))
        plot(result, Path(a.out) if a.out.endswith(".png") else Path(a.plot_from).with_suffix(".png"))
        return result
    import torch
    from transformers import AutoTokenizer

    from distill.data.synthetic import SyntheticLanguage

    size = {**SIZES[a.size], **({"samples": a.samples} if a.samples else {})}
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # CPU sizes are tiny models: one thread is the fastest and the steadiest
    steps, mb = a.steps or size["steps"], size["micro_batch"]
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = write_documents(out / "data", n_train=steps * mb, n_eval=size["n_eval"])
    tokenizer = AutoTokenizer.from_pretrained(data["tokenizer"])
    lang = SyntheticLanguage(0)
    teacher_path = a.teacher or size["teacher"]
    size = {**size, "teacher_overrides": [*size.get("teacher_overrides", []), *a.teacher_set]}
    pretrained = pretrain_teacher(size, teacher_path) if size.get("teacher_recipe") else None
    teacher = load(teacher_path)
    eval_entropy = -statistics.fmean(  # the true conditional entropy, token-weighted, at the eval positions
        [sum(p * math.log(p) for p in d.values())
         for t in data["eval_texts"] for d in lang.next_token_distributions(t.split(), SENTENCES)])
    result = {
        "size": a.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": _commit(), "command": "python benchmarks/kd_results.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "language": {"entropy_per_token": data["entropy_per_token"], "eval_entropy": eval_entropy,
                     "eval_documents": size["n_eval"]},
        "teacher": {"path": teacher_path, "params": sum(p.numel() for p in teacher.parameters()), "pretrain": pretrained},
        "micro_batch": mb, "runs": [], "summary": {},
        "data_tokens_per_document": statistics.fmean(len(t.split()) + 2 for t in data["train_texts"]),
    }
    base = [f"output_dir={out}/RUN", "overwrite=true", "launch.num_processes=1", f"teacher.from_pretrained={teacher_path}",
            f"data.train={data['train']}", f"data.eval={data['eval']}", f"data.tokenizer={data['tokenizer']}",
            "data.synthetic_seed=null", "data.max_length=128", "train.grad_accum=1",
            "train.progress=false", "train.report_to=none", f"train.eval_batches={size['eval_batches'] or 'null'}",
            *size["overrides"], *a.set]
    t_scores = scores(teacher, None, data, tokenizer, lang, size["samples"], seed=0)
    result["teacher"].update(t_scores)
    path = out / "kd_results.json"
    for p in {path, Path(a.json or path)}:
        p.write_text(json.dumps(result, indent=1))
    for budget in a.budgets:
        n, mb_b = steps, mb // BUDGETS[budget]
        every = max(1, n // size["eval_points"])
        for seed in a.seeds:
            for arm in a.arms:
                name = f"{budget}_{arm}_s{seed}"
                run_dir = out / name
                overrides = [o.replace("RUN", name) for o in base] + [
                    f"seed={seed}", f"train.max_steps={n}", f"train.micro_batch_size={mb_b}",
                    f"train.eval_every={every}", f"train.log_every={every}",
                    *ARMS[arm]]
                print(f"== {name}: {' '.join(ARMS[arm])}", flush=True)
                try:
                    if arm in CACHES:  # written once for every budget and seed: the rows do not depend on them
                        where = out / f"teacher_{arm}"
                        secs = write_teacher_cache(size["recipe"], [o.replace("RUN", name) for o in base], CACHES[arm],
                                                   where, log=print)
                        result.setdefault("caches", {}).setdefault(arm, {"settings": CACHES[arm], "write_s": secs})
                        overrides.append(f"kd.cache.dir={where}")
                    wall = train(size["recipe"], overrides, log=print)
                    student = load(str(run_dir / "final" / "student"))
                    ev = scores(student, teacher, data, tokenizer, lang, size["samples"], seed=seed)
                except Exception as e:  # one arm's failure is a result too; the other arms still run
                    traceback.print_exc()
                    result.setdefault("failed", []).append({"run": name, "error": repr(e)})
                    continue
                pts = curve(run_dir)
                logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "elapsed_s" in x]
                if arm in CACHES:
                    manifest = json.loads((out / f"teacher_{arm}" / "manifest.json").read_text())
                    result["caches"][arm]["bytes_per_token"] = manifest["splits"]["train"]["bytes_per_token"]
                result["runs"].append({"arm": arm, "budget": budget, "seed": seed, "steps": n, "micro_batch": mb_b,
                                       "documents": n * mb_b, "kd": ARMS[arm], "wall_s": wall,
                                       "train_s": logged[-1]["elapsed_s"], "train_tokens": pts[-1][1],
                                       "data_tokens": n * mb_b * result["data_tokens_per_document"], "eval": ev,
                                       "curve": pts, "student_params": sum(p.numel() for p in student.parameters())})
                print(f"   CE {ev['ce']:.4f}  KL(true||s) {ev['kl_true']:.4f}  KL(t||s) {ev['kl_teacher']:.4f}  "
                      f"valid samples {ev['samples_valid']:.2f}  {wall:.0f} s", flush=True)
                del student
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer states: not needed here
                result["summary"] = summarise(result["runs"])
                for p in {path, Path(a.json or path)}:  # after every run: a cut-short job keeps what ran
                    p.write_text(json.dumps(result, indent=1))
    for p in {path, Path(a.json or path)}:
        p.write_text(json.dumps(result, indent=1))
    print(table(result))
    if not a.no_plot:
        plot(result, out / "kd_results.png")
    return result


def table(result: dict) -> str:
    lines = ["| budget | arm | steps | CE | KL(true‖s) | KL(teacher‖s) | gap closed (CE) | gap closed (KL true) "
             "| valid samples | off-path sampled tokens | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for budget, arms in result["summary"].items():
        for arm, r in arms.items():
            gap = lambda v: "" if v is None or arm == "hard" else f"{v:.0%}"  # noqa: E731
            lines.append(f"| {budget} | {arm} | {r['steps']} | {r['ce']:.4f} | {r['kl_true']:.4f} | {r['kl_teacher']:.4f} | "
                         f"{gap(r['gap_closed'])} | {gap(r['gap_closed_kl_true'])} | {r['samples_valid']:.2f} | "
                         f"{r['samples_offpath']:.3f} | {r['wall_s']:.0f} |")
    t = result["teacher"]
    lines.append(f"| | teacher | | {t['ce']:.4f} | {t['kl_true']:.4f} | | | | {t['samples_valid']:.2f} | "
                 f"{t['samples_offpath']:.3f} | |")
    return "\n".join(lines)


def _commit() -> str:
    if os.environ.get("DISTILL_COMMIT"):  # a copy of the tree (no .git of its own) says which commit it is
        return os.environ["DISTILL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
