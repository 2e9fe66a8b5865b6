"""LoRA roles: only the adapter trains, what is saved is the trained model, resume and export, DPO without a
second model, and every recipe mistake refused before a model loads."""
import json
import subprocess

import pytest
import torch
import yaml

from tests.helpers import check, launch_scenarios, python, tiny_recipe

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


STUDENT = {"zero2": ["student.deepspeed=zero2"],
           "zero3_checkpointing": ["student.deepspeed=zero3", "student.gradient_checkpointing=true"],
           "zero2_chunked": ["student.deepspeed=zero2", "kd.chunked=true", "kd.chunk_size=16"]}
DPO = {"no_copy": ["dpo.reference=policy_without_adapter"],
       "separate": [],  # the policy's base as a role: reference.from_pretrained, below
       "no_copy_cached": ["dpo.reference=policy_without_adapter", "dpo.precompute_reference=true"],
       "no_copy_zero3": ["dpo.reference=policy_without_adapter", "policy.deepspeed=zero3"]}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Every scenario of tests/scripts/lora_check.py, in one 2-process launch."""
    scenarios = {f"student_{k}": ["distill", *v] for k, v in STUDENT.items()}
    scenarios |= {f"dpo_{k}": ["dpo", *v] for k, v in DPO.items()}
    scenarios["dpo_separate"].append(f"reference.from_pretrained={assets['teacher']}")
    return launch_scenarios("tests.scripts.lora_check", assets["root"], tmp_path_factory.mktemp("lora"), scenarios)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", STUDENT)
def test_lora_student_trains_only_its_adapter_and_saves_the_trained_model(runs, name):
    rec = runs[f"student_{name}"]
    assert rec["trainable_params"] == rec["analytic_lora_params"] == rec["planned_trainable_params"] == 896
    assert rec["base_identical"] and rec["adapter_changed"]
    h = rec["history"]
    assert h["after"]["kd"] < h["before"]["kd"]  # the adapter learned something
    # final/student/ is the merged model (plain transformers), final/student/adapter/ the adapter (peft on the base).
    assert not rec["peft_files_at_top"]
    assert rec["merged_max_diff"] <= 1e-5 * rec["live_logit_scale"]  # merging rounds W + s * B @ A once
    assert rec["adapter_max_diff"] == 0.0


@pytest.fixture(scope="module")
def dpo_runs(runs):
    return {k: runs[f"dpo_{k}"] for k in DPO}


def _train_metrics(rec):
    return [m for m in rec["metrics"] if "rewards/margin" in m]


@pytest.mark.multiprocess
def test_dpo_reference_without_adapter_equals_a_separate_reference(dpo_runs):
    a, b = dpo_runs["no_copy"], dpo_runs["separate"]
    assert a["roles"] == ["policy"] and b["roles"] == ["policy", "reference"]  # no reference model was built
    assert a["held_params"] < b["held_params"]
    ma, mb = _train_metrics(a), _train_metrics(b)
    assert len(ma) == len(mb) == 4 and ma[-1]["rewards/margin"] != 0.0  # the policy moved away from the reference
    for x, y in zip(ma, mb):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    for key in ("loss", "rewards/margin", "rewards/accuracy"):
        assert a["history"]["after"][key] == pytest.approx(b["history"]["after"][key], rel=1e-6, abs=1e-7)


@pytest.mark.multiprocess
def test_dpo_reference_without_adapter_under_zero3(dpo_runs):
    z2, z3 = _train_metrics(dpo_runs["no_copy"]), _train_metrics(dpo_runs["no_copy_zero3"])
    assert dpo_runs["no_copy_zero3"]["base_identical"] and dpo_runs["no_copy_zero3"]["adapter_changed"]
    for x, y in zip(z2, z3):  # the same run, sharded: other reduction orders, float32 rounding
        for key in ("loss", "rewards/margin", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=5e-6), (x["step"], key)


@pytest.mark.multiprocess
def test_dpo_reference_without_adapter_can_be_precomputed(dpo_runs):
    live, cached = _train_metrics(dpo_runs["no_copy"]), _train_metrics(dpo_runs["no_copy_cached"])
    # Other padding widths in the scoring pass: float32 rounding, as in test_dpo's cached-vs-live check.
    for x, y in zip(live, cached):
        for key in ("loss", "rewards/margin", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=5e-6), (x["step"], key)


# -- resume (through the CLI) and export ------------------------------------------------------------
def _recipe(tmp_path, assets, name):
    # A warm-up longer than the run: the rate differs at every step, so a resumed run must restore its schedule.
    raw = tiny_recipe(assets, tmp_path / name, student={"lora": LORA, "scheduler": {"name": "constant", "warmup_steps": 1000}})
    raw["data"]["eval"] = None
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(path, *args):
    return subprocess.run(python("-m", "distill.train", str(path), *args), capture_output=True, text=True, timeout=300)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.multiprocess
def test_lora_resume_equals_uninterrupted_and_export_gives_the_merged_model(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    # The uninterrupted run and the first leg in one launch; the resumed leg in a launch of its own, as a user resumes.
    parts = _recipe(tmp_path, assets, "parts")
    launch_scenarios("tests.scripts.recipe_run", tmp_path, tmp_path / "histories",
                     {"whole": [str(_recipe(tmp_path, assets, "whole")), "train.max_steps=6"],
                      "parts": [str(parts), "train.max_steps=3"]}, timeout=600)
    proc = _train(parts, "--resume", "train.max_steps=6", "resume_allow=[train.max_steps]")
    check(proc)
    assert "resumed from" in proc.stdout
    for f in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = _tensors(tmp_path / "whole" / "final" / "student" / f), _tensors(tmp_path / "parts" / "final" / "student" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    from distill.cli.export import main as export

    out = tmp_path / "export"
    assert export([str(tmp_path / "whole"), str(out)]) == 0
    assert (out / "student" / "adapter" / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final" / "student").eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, saved(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.multiprocess
def test_dpo_lora_quickstart_learns_the_preferences(tmp_path):
    proc = _train("recipes/dpo_lora_quickstart.yaml", f"output_dir={tmp_path}/run", "train.progress=false")
    check(proc)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy without adapter is the reference
    assert summary["after"]["rewards/accuracy"] > 0.8  # held-out pairs; chance is 0.5
    assert "LoRA r=16" in proc.stdout and "\n  reference " not in proc.stdout  # no reference row in the role table


# -- recipe errors, before any model loads ----------------------------------------------------------
def _error(raw, trainer, plan=False) -> str:
    from distill.config.errors import RecipeError
    from distill.config.recipe import validate_recipe
    from distill.loop.preflight import preflight

    with pytest.raises(RecipeError) as e:
        recipe = validate_recipe(raw, trainer)
        if plan:
            preflight(recipe, trainer, world_size=1, dry_run=True)
    return str(e.value)


@pytest.fixture
def raw(assets, tmp_path):
    return tiny_recipe(assets, tmp_path / "run", student={"lora": dict(LORA)})


def test_lora_on_a_frozen_role_is_refused(raw):
    from distill.trainers.distill import DistillTrainer

    raw["teacher"]["lora"] = LORA
    msg = _error(raw, DistillTrainer)
    assert "`teacher`" in msg and "`lora`" in msg and "trainable: true" in msg


@pytest.mark.parametrize("key,value,needle", [("r", 0, "`student.lora.r`"), ("dropout", 1.0, "`student.lora.dropout`"),
                                              ("target_modules", [], "all-linear"), ("rank", 8, "`student.lora.rank`")])
def test_bad_lora_settings_are_refused(raw, key, value, needle):
    from distill.trainers.distill import DistillTrainer

    raw["student"]["lora"][key] = value
    assert needle in _error(raw, DistillTrainer)


def test_chunked_kd_refuses_an_adapter_on_lm_head(raw):
    from distill.trainers.distill import DistillTrainer

    raw["student"]["lora"]["target_modules"] = ["q_proj", "lm_head"]
    raw["kd"]["chunked"] = True
    assert "drop lm_head from `student.lora.target_modules`" in _error(raw, DistillTrainer)


def test_target_modules_that_match_nothing_are_refused_at_plan_time(raw):
    from distill.trainers.distill import DistillTrainer

    raw["student"]["lora"]["target_modules"] = ["q_proj", "query_key_value"]
    msg = _error(raw, DistillTrainer, plan=True)
    assert "`student.lora.target_modules`" in msg and "q_proj" in msg and "gate_proj" in msg  # the model's real names


def test_plan_shows_the_adapter_as_what_trains(raw):
    from distill.config.recipe import validate_recipe
    from distill.loop.preflight import preflight
    from distill.models.build import count_params
    from distill.plan.planner import estimate_memory, format_plan
    from distill.trainers.distill import DistillTrainer

    recipe = validate_recipe(raw, DistillTrainer)
    _, plans = preflight(recipe, DistillTrainer, world_size=1, dry_run=True)
    p = plans["student"]
    assert p.num_trainable == 896 and p.num_params == count_params(p.model_config) + 896  # base + adapter
    text = format_plan(plans, 1)
    assert "LoRA r=4" in text and "0.00M (" in text
    mem = estimate_memory(p, world_size=1, micro_batch_size=1, seq_len=8)
    assert mem["gradients"] == 896 * 4 and mem["optimizer"] == 896 * 8  # fp32 adapter grads, two AdamW moments
    assert mem["weights"] == p.num_params * 4


def test_reference_without_adapter_needs_a_lora_policy(assets, tmp_path):
    from distill.trainers.dpo import DPOTrainer

    raw = {"trainer": "dpo", "output_dir": str(tmp_path), "data": {"train": "x.jsonl"},
           "policy": {"from_pretrained": assets["teacher"]}, "dpo": {"reference": "policy_without_adapter"}}
    msg = _error(raw, DPOTrainer)
    assert "`dpo.reference: policy_without_adapter`" in msg and "policy.lora" in msg
    raw["policy"]["lora"] = LORA
    raw["reference"] = {"config": {"model_type": "llama"}}
    assert "remove the `reference` block" in _error(raw, DPOTrainer)
