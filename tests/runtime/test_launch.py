"""Where a run's processes compute (`launch.device`), chosen before any process starts or CUDA is touched."""
from __future__ import annotations

import os

import pytest

import distill
import distill.runtime.launch as launch
from distill.cli.train import main
from distill.config.errors import RecipeError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend the machine has N visible GPUs; the environment the choice writes is restored after the test."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(launch.DEVICE_ENV, raising=False)
    return lambda n: monkeypatch.setattr(launch, "visible_gpus", lambda: n)


def test_auto_runs_more_processes_than_gpus_on_the_cpu_and_hides_the_gpus(gpus):
    gpus(1)
    note = launch.place_processes("auto", 2)
    assert note.startswith("cpu: 2 processes and 1 GPU visible") and "launch.num_processes=1" in note
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ[launch.DEVICE_ENV] == note


def test_auto_takes_a_gpu_per_process_when_there_are_enough(gpus):
    gpus(2)
    assert launch.place_processes("auto", 2) == "cuda: one GPU per process (2 processes, 2 GPUs visible)"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_cpu_hides_the_gpus_whatever_their_number(gpus):
    gpus(8)
    assert launch.place_processes("cpu", 1).startswith("cpu: launch.device is cpu (8 GPUs visible")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("have, fix", [(1, "set launch.num_processes=1"), (0, "run it on a machine with a GPU")])
def test_cuda_with_too_few_gpus_is_refused_naming_the_key_the_count_and_the_fix(gpus, have, fix):
    gpus(have)
    with pytest.raises(RecipeError) as e:
        launch.place_processes("cuda", 2)
    said = str(e.value)
    assert "`launch.num_processes` is 2" in said and f"{'no GPU' if not have else '1 GPU'} visible" in said and fix in said
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_gpu_recipe_on_a_machine_without_enough_gpus_stops_before_anything_is_written(gpus, tmp_path, monkeypatch, capsys):
    gpus(1)
    monkeypatch.chdir(tmp_path)
    assert main(["gpu_onpolicy_0.3b_1.4b", "output_dir=run"]) == 2
    err = capsys.readouterr().err
    assert "`launch.device: cuda` needs one GPU per process: `launch.num_processes` is 2, and 1 GPU visible" in err
    assert list(tmp_path.iterdir()) == []  # no synthetic data, no run directory


def test_the_dry_run_shows_the_choice_and_a_refusal_without_hiding_anything(gpus, tmp_path, monkeypatch, capsys):
    gpus(1)
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--dry-run"]) == 0
    assert "device cpu: 2 processes and 1 GPU visible" in capsys.readouterr().out
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert main(["quickstart", "launch.device=cuda", "--dry-run"]) == 0
    assert "device refused on this machine: `launch.device: cuda` needs one GPU per process" in capsys.readouterr().out


def test_distill_run_from_python_refuses_too_few_gpus_before_starting_processes(gpus, tmp_path, monkeypatch):
    gpus(1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="`launch.num_processes` is 2, and 1 GPU visible"):
        distill.run("quickstart", "launch.device=cuda", "output_dir=run")
    assert list(tmp_path.iterdir()) == []
