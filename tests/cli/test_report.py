"""`distill.report`: plots and a summary from a run directory's metrics."""
import json
import subprocess

from distill.cli.report import main, series
from tests.helpers import python


def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0 / s, "kd": 1.0 / s, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0 * s,
             "rewards/accuracy": 0.5 + 0.1 * s} for s in range(1, 5)]
    rows += [{"step": s, "loss": 0.1, "reward": 0.4 + 0.1 * s, "rewards/end_mark": 0.3, "kl": 0.01 * s, "entropy": 2.0,
              "clip_ratio/region_mean": 0.0, "completions/mean_length": 9.0, "gen_time_share": 0.6} for s in (6, 7)]
    rows.append({"step": 4, "eval/ce": 2.5, "eval/kd": 0.1})
    rows.append({"step": 5, "skipped": "non-finite loss"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"before": {"ce": 3.9, "kd": 1.9}, "after": {"ce": 2.5, "kd": 0.1}}))
    return run


def test_report_writes_one_png_per_group_and_a_summary(tmp_path):
    run = _run_dir(tmp_path)
    assert main([str(run)]) == 0
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert pngs == ["eval.png", "loss.png", "lr.png", "policy.png", "rewards.png", "throughput.png"]
    assert all((run / "report" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    summary = (run / "report" / "summary.md").read_text()
    assert "| ce | 3.9000 | 2.5000 |" in summary and "| loss | 7 | 0.1 |" in summary and "| kl | 7 | 0.07 |" in summary


def test_series_keeps_numbers_only():
    data = series([{"step": 1, "loss": 1.0, "skipped": "x", "nan": float("nan")}, {"step": 2, "loss": 0.5}])
    assert data == {"loss": ([1, 2], [1.0, 0.5])}


def test_report_on_a_directory_without_metrics(tmp_path):
    proc = subprocess.run(python("-m", "distill.report", str(tmp_path)), capture_output=True, text=True)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr


def test_panels_put_student_teacher_and_train_curves_together():
    from distill.cli.report import panels

    data = {"ce": None, "kd": None, "eval/ce": None, "eval/teacher_ce": None, "eval/kd": None,
            "eval/sampled/reverse_kl": None, "eval/sampled/teacher_nll": None}
    eval_keys = sorted(k for k in data if k.startswith("eval/"))
    assert dict(panels("eval", eval_keys, data)) == {
        "eval/ce": ["eval/ce", "ce", "eval/teacher_ce"], "eval/kd": ["eval/kd", "kd"],
        "eval/sampled/reverse_kl": ["eval/sampled/reverse_kl"], "eval/sampled/nll": ["eval/sampled/teacher_nll"]}
    assert dict(panels("loss", ["ce", "kd", "loss"], data)) == {"ce": ["ce"], "kd": ["kd"], "loss": ["loss"]}


def test_eval_curves_start_at_the_eval_before_training_and_samples_are_listed(tmp_path):
    from distill.cli.report import read_metrics, with_before

    run = _run_dir(tmp_path)  # an older run: its eval before training only in summary.json
    rows = with_before(run, read_metrics(run))
    assert series(rows)["eval/ce"] == ([0, 4], [3.9, 2.5])
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in [
        {"step": 0, "index": 0, "prompt": "the cat", "completion": "a | b", "eos": False},
        {"step": 4, "index": 0, "prompt": "the cat", "completion": "sleeps .", "eos": True}]))
    assert main([str(run)]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "## Samples" in summary and "Prompt 0: `the cat`" in summary
    assert "| 0 | a \\| b |" in summary and "| 4 | sleeps . `<eos>` |" in summary
    # A run that logged its step-0 eval keeps it as it is.
    logged = [{"step": 0, "eval/ce": 3.8}, {"step": 4, "eval/ce": 2.5}]
    assert with_before(run, logged) == logged


def test_each_roles_lr_and_grad_norm_plot_with_the_optimizer_group():
    from distill.cli.report import GROUPS

    def group(key):
        return [name for name, member in GROUPS.items() if member(key)]

    assert [group(k) for k in ("small/lr", "large/grad_norm", "lr", "grad_norm")] == [["lr"]] * 4
    assert [group(k) for k in ("small/loss", "large/kd", "loss")] == [["loss"]] * 3
    assert group("eval/small/loss") == ["eval"]
