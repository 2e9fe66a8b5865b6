"""`train.report_to`: accelerate's trackers get the metrics of metrics.jsonl, step for step."""
import json
import math
import os
import subprocess

import pytest
import yaml

from distill.config.errors import RecipeError
from distill.loop import tracking
from distill.trainers import load_recipe
from tests.helpers import check, python, tiny_recipe


def _write(tmp_path, assets, name="run", **sections):
    raw = tiny_recipe(assets, tmp_path / name, **sections)
    # One schedule whether the run is 3 or 5 steps long, and a rate that differs at every step (a warm-up longer than
    # the run): the logged `lr` shows a resumed run that restarted its schedule.
    raw["student"]["scheduler"] = {"name": "constant", "warmup_steps": 1000}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(path, *args, env=None):
    return subprocess.run(python("-m", "distill.train", str(path), *args), capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _plottable(line):
    """What a tracker should get of a metrics.jsonl line, written out here rather than through `tracking.numeric`
    (the filter under test): every number but the step, booleans and NaN/Inf left out."""
    return {k: v for k, v in line.items() if k != "step" and type(v) in (int, float) and math.isfinite(v)}


@pytest.mark.multiprocess
def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = _write(tmp_path, assets, train={"report_to": "tensorboard", "eval_every": 2})
    check(_train(path, "train.max_steps=3"))
    proc = _train(path, "--resume", "train.max_steps=5", "resume_allow=[train.max_steps]")  # the event directory exists now: appended to
    check(proc)
    run = tmp_path / "run"
    assert f"tensorboard --logdir {run / 'tensorboard'}" in proc.stdout
    events = EventAccumulator(str(run / "tensorboard" / tracking.PROJECT), size_guidance={"scalars": 0})
    events.Reload()
    expected: dict[str, list] = {}
    for line in _metrics(run):
        for k, v in _plottable(line).items():
            expected.setdefault(k, []).append((line["step"], v))
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4, 5]
    # Step k (from 1) of the warm-up runs at lr * k / 1001, resumed or not.
    assert [v for _, v in expected["lr"]] == pytest.approx([3e-3 * k / 1001 for k in range(1, 6)], rel=1e-9)
    assert [s for s, _ in expected["eval/ce"]] == [0, 2, 3, 4, 5]  # 0: the eval before training, not repeated on resume
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # events hold float32
    hparams = next((run / "tensorboard" / tracking.PROJECT).glob("*/hparams.yml"))
    config = yaml.safe_load(hparams.read_text())
    assert config["student.optimizer.lr"] == 3e-3 and config["train.report_to"] == "tensorboard"


def test_report_to_none_writes_no_tensorboard_dir(assets, tmp_path):
    path = _write(tmp_path, assets, train={"report_to": "none", "max_steps": 1}, launch={"num_processes": 1},
                  data={"eval": None})
    check(_train(path))
    run = tmp_path / "run"
    assert len(_metrics(run)) == 1 and not (run / "tensorboard").exists() and not (run / "wandb").exists()


def test_unknown_tracker_is_refused_at_validation(assets, tmp_path):
    path = _write(tmp_path, assets)
    for bad in ("tensorbord", "[tensorboard, mlflow]", "[none]"):
        with pytest.raises(RecipeError, match=r"`train\.report_to`.*unknown tracker.*choose auto, none, tensorboard, wandb"):
            load_recipe(path, [f"train.report_to={bad}"])
    recipe, _ = load_recipe(path, ["train.report_to=[wandb, tensorboard, wandb]"])
    assert tracking.resolve(recipe.train.report_to) == ["wandb", "tensorboard"]


def test_auto_follows_the_tensorboard_package(monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda package: False)
    assert tracking.resolve("auto") == [] and tracking.resolve("none") == []
    monkeypatch.setattr(tracking, "installed", lambda package: package == "tensorboard")
    assert tracking.resolve("auto") == ["tensorboard"]


def test_missing_tracker_package_fails_before_any_model_loads(assets, tmp_path, monkeypatch, capsys):
    """Simulated absence (the package may be installed here): the launching process refuses, once."""
    from distill.cli.train import main

    monkeypatch.setattr(tracking, "installed", lambda package: package != "wandb")
    path = _write(tmp_path, assets, train={"report_to": ["tensorboard", "wandb"]})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "`train.report_to`: wandb is requested but the `wandb` package is not installed" in err
    assert "pip install wandb" in err and "train.report_to: none" in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    assert main([str(path), "--dry-run"]) == 2  # the dry run checks it too


def test_numeric_keeps_plottable_values_only():
    line = {"step": 3, "loss": 1.5, "grad_norm": None, "skipped": "non-finite loss", "n": 2, "flag": True,
            "bad": float("nan")}
    assert tracking.numeric(line) == {"loss": 1.5, "n": 2}
    assert tracking.flat_config({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


def _wandb_records(path):
    """The records of a .wandb file: the LevelDB log format (32 KiB blocks of chunks with 7-byte
    headers: crc, length, type) after a 7-byte file header; wandb no longer ships a reader."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a chunk header: the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_holds_the_metrics_of_metrics_jsonl(assets, tmp_path):
    pytest.importorskip("wandb")
    path = _write(tmp_path, assets, train={"report_to": "wandb", "max_steps": 2}, launch={"num_processes": 1})
    check(_train(path, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"}))
    run = tmp_path / "run"
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(log))
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (meta.project, meta.display_name) == (tracking.PROJECT, "run")
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["trainer"] == "distill" and config["train.report_to"] == "wandb"
    logged: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            logged.setdefault(row["_step"], {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    expected: dict[int, dict] = {}
    for line in _metrics(run):  # wandb merges the lines of one step into one row
        expected.setdefault(line["step"], {}).update(_plottable(line))
    assert sorted(expected) == [0, 1, 2] and "eval/ce" in expected[0] and "eval/ce" in expected[2]
    # The generation samples of each evaluation go to wandb as text, beside the numbers.
    samples = {step: row.pop("samples") for step, row in logged.items() if "samples" in row}
    assert sorted(samples) == [0, 2] and all(text.startswith(f"samples at step {s}") for s, text in samples.items())
    assert logged == expected
