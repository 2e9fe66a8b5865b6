"""What a user outside the checkout relies on: shipped recipes and files, the public API, the model class a role loads,
and one host synchronisation per training step."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import distill
from distill.config.errors import RecipeError
from distill.config.presets import deepspeed_presets, package_path, resolve_shipped, shipped_recipes
from distill.config.schema import Role
from distill.trainers import load_recipe
from tests.helpers import TINY_LLAMA, check, launch, python


def test_the_trainers_and_roles_import_from_the_top():
    from distill import DistillTrainer, DPOTrainer, GRPOTrainer, LMTrainer, PPOTrainer, RewardTrainer, RoleTrainer

    trainers = (DistillTrainer, DPOTrainer, GRPOTrainer, LMTrainer, PPOTrainer, RewardTrainer)
    assert all(issubclass(c, RoleTrainer) for c in trainers)
    assert {c.name for c in trainers} == {"distill", "dpo", "grpo", "lm", "ppo", "reward"}
    assert distill.Role is Role and distill.load_recipe is load_recipe


def test_shipped_files_are_read_from_the_package_not_the_checkout():
    here = Path(distill.__file__).parent
    assert set(deepspeed_presets()) == {"zero2", "zero3", "zero3_offload"}
    assert all(p.is_relative_to(here) for p in [*deepspeed_presets().values(), *shipped_recipes().values()])
    assert "quickstart" in shipped_recipes()
    teacher = Path(resolve_shipped("distill:assets/teacher"))
    assert teacher == package_path("assets/teacher") and (teacher / "config.json").is_file()
    assert Role(from_pretrained="distill:assets/teacher").from_pretrained == str(teacher)
    with pytest.raises(RecipeError, match="ships no such file"):
        resolve_shipped("distill:assets/nothing")


def test_recipes_list_copy_and_run_by_name_from_another_directory(tmp_path, monkeypatch, capsys):
    from distill.cli import recipes as catalog
    from distill.cli import train

    monkeypatch.chdir(tmp_path)  # no recipes/ or assets/ here
    assert catalog.main([]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in shipped_recipes())
    assert catalog.main(["copy", "quickstart"]) == 0
    assert (tmp_path / "quickstart.yaml").read_bytes() == shipped_recipes()["quickstart"].read_bytes()
    assert catalog.main(["copy", "quickstart"]) == 2 and "--force" in capsys.readouterr().err  # an edited copy stays
    assert catalog.main(["copy", "quickstrat"]) == 2
    for recipe in ("quickstart.yaml", "quickstart"):  # the copy, and the shipped one by name
        assert train.main([recipe, "--dry-run"]) == 0
        assert "teacher  frozen" in capsys.readouterr().out
    recipe, trainer = load_recipe("quickstart")
    assert trainer is distill.DistillTrainer and Path(recipe.teacher.from_pretrained) == package_path("assets/teacher")
    # The console entry point dispatches to the same command.
    listed = subprocess.run(python("-m", "distill", "recipes"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "quickstart" in listed.stdout


def test_a_role_loads_the_model_class_it_declares():
    from transformers import AutoConfig

    from distill.models.build import build_model, count_params

    cfg = {k: v for k, v in TINY_LLAMA.items()}
    lm = Role(config=cfg)
    scorer = Role(config={**cfg, "num_labels": 1, "pad_token_id": 0}, model_class="sequence_classification")
    config = AutoConfig.for_model(**{**cfg, "vocab_size": 50})
    lm_model = build_model(lm, config)
    scorer_model = build_model(scorer, AutoConfig.for_model(**{**cfg, "vocab_size": 50, "num_labels": 1, "pad_token_id": 0}))
    assert type(lm_model).__name__ == "LlamaForCausalLM"
    assert type(scorer_model).__name__ == "LlamaForSequenceClassification"
    ids = torch.tensor([[3, 4, 5]])
    assert scorer_model(input_ids=ids).logits.shape == (1, 1)  # one score per sequence
    assert count_params(config, "sequence_classification") < count_params(config, "causal_lm")  # a 1-row head
    critic = build_model(Role(config=cfg, model_class="token_classification"),
                         AutoConfig.for_model(**{**cfg, "vocab_size": 50, "num_labels": 1}))
    assert type(critic).__name__ == "LlamaForTokenClassification"
    assert critic(input_ids=ids).logits.shape == (1, 3, 1)  # one value per token
    with pytest.raises(ValueError, match="model_class"):
        Role(config=cfg, model_class="value_head")


@pytest.mark.multiprocess
def test_a_training_step_waits_on_the_host_once(assets, tmp_path):
    """On each of 2 ranks, a step of distill's code converts a tensor to a Python value once (the step's all-reduce)."""
    prefix = tmp_path / "sync"
    check(launch("tests.scripts.host_sync_check", str(assets["root"]), str(prefix)))
    ranks = [json.loads((tmp_path / f"sync.rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2 and len(r["syncs"]) == 1, r["syncs"]
        assert r["step"]["finite"] and r["step"]["stop_votes"] == 0 and r["step"]["tokens_seen"] > 0
        assert set(r["losses"]) == {"loss", "ce", "kd"}
    assert ranks[0]["losses"] == ranks[1]["losses"]  # global sums: every rank reports the same step
