"""Where a frozen role's weights live: the planner's choice, recipe overrides, tuned ZeRO-3 settings."""
import pytest

from distill.config.deepspeed import ZERO2_REDUCE_BUCKET, role_ds_config
from distill.config.errors import RecipeError
from distill.config.recipe import validate_recipe
from distill.config.schema import Role
from distill.plan.placement import GIB, choose_placement, frozen_zero3_settings, layer_params
from distill.plan.planner import format_plan, plan_roles
from distill.trainers.distill import DistillTrainer
from tests.helpers import TINY_LLAMA

TEACHER = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}


@pytest.mark.parametrize("weights_gib,other_gib,device_gib,world,expected", [
    (2.5, 10, 80, 2, "replicated"),   # the 0.3B/1.4B pair on an 80 GB card: 62 GiB left
    (14, 20, 80, 4, "replicated"),    # 7B teacher: 14 <= half of the 52 GiB left
    (20, 40, 80, 4, "sharded"),       # 20 > half of 32 left; a quarter (5) fits
    (140, 20, 80, 4, "sharded"),      # a quarter (35) fits in 52
    (140, 60, 80, 4, "offload"),      # a quarter (35) does not fit in 12
    (20, 40, 80, 1, "offload"),       # one process: sharding saves nothing
])
def test_choice_follows_sizes_and_memory(weights_gib, other_gib, device_gib, world, expected):
    placement, why = choose_placement(weights_bytes=weights_gib * GIB, other_bytes=other_gib * GIB,
                                      device_bytes=device_gib * GIB, world_size=world)
    assert placement == expected, why
    assert f"{weights_gib:.1f} GiB" in why


def test_choice_thresholds_are_exact():
    left = 0.9 * 100 * GIB - 10 * GIB  # what the planner counts on
    at = dict(other_bytes=10 * GIB, device_bytes=100 * GIB, world_size=2)
    assert choose_placement(weights_bytes=0.5 * left, **at)[0] == "replicated"
    assert choose_placement(weights_bytes=0.5 * left + 1, **at)[0] == "sharded"
    assert choose_placement(weights_bytes=2 * left, **at)[0] == "sharded"
    assert choose_placement(weights_bytes=2 * left + 2, **at)[0] == "offload"
    assert choose_placement(weights_bytes=1, other_bytes=0, device_bytes=None, world_size=2)[0] == "sharded"


def _recipe(**teacher):
    raw = {"trainer": "distill", "output_dir": "/tmp/unused", "data": {"train": "unused.jsonl", "max_length": 64},
           "student": {"config": TINY_LLAMA, "deepspeed": "zero2", "precision": "bf16"},
           "teacher": {"config": TEACHER, "deepspeed": "zero3", "precision": "bf16", **teacher},
           "train": {"micro_batch_size": 2}}
    return validate_recipe(raw, DistillTrainer)


@pytest.mark.parametrize("memory_gb,expected,stage", [("80", "replicated", 0), ("0.0011", "sharded", 3), ("0.0008", "offload", 3)])
def test_auto_plan_from_gpu_memory(monkeypatch, memory_gb, expected, stage):
    monkeypatch.setenv("DISTILL_GPU_MEMORY_GB", memory_gb)
    plans = plan_roles(_recipe(), DistillTrainer, world_size=2, vocab_size=100)
    t = plans["teacher"]
    assert (t.placement, t.zero_stage) == (expected, stage), t.placement_reason
    assert (t.offload == "cpu") == (expected == "offload")
    assert plans["student"].placement is None and plans["student"].zero_stage == 2
    text = format_plan(plans, 2)
    assert f"teacher placement {expected}: auto: " in text


def test_without_gpu_auto_keeps_the_teacher_sharded(monkeypatch):
    monkeypatch.delenv("DISTILL_GPU_MEMORY_GB", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    t = plan_roles(_recipe(), DistillTrainer, world_size=2, vocab_size=100)["teacher"]
    assert (t.placement, t.zero_stage) == ("sharded", 3) and "no GPU" in t.placement_reason


@pytest.mark.parametrize("placement,memory_gb,stage,offload", [
    ("sharded", "80", 3, "none"),          # would be replicated by auto
    ("replicated", "0.0008", 0, "none"),   # would be offloaded by auto
    ("offload", "80", 3, "cpu"),
])
def test_recipe_placement_wins_over_the_planner(monkeypatch, placement, memory_gb, stage, offload):
    monkeypatch.setenv("DISTILL_GPU_MEMORY_GB", memory_gb)
    t = plan_roles(_recipe(placement=placement), DistillTrainer, world_size=2, vocab_size=100)["teacher"]
    assert (t.placement, t.zero_stage, t.offload) == (placement, stage, offload)
    assert t.placement_reason == "set by the recipe"


def test_frozen_stage_below_3_and_offload_are_requests_too(monkeypatch):
    monkeypatch.setenv("DISTILL_GPU_MEMORY_GB", "0.0008")  # auto would offload
    assert plan_roles(_recipe(deepspeed=0), DistillTrainer, world_size=2, vocab_size=100)["teacher"].placement == "replicated"
    monkeypatch.setenv("DISTILL_GPU_MEMORY_GB", "80")  # auto would replicate
    t = plan_roles(_recipe(offload="cpu"), DistillTrainer, world_size=2, vocab_size=100)["teacher"]
    assert (t.placement, t.offload) == ("offload", "cpu")


@pytest.mark.parametrize("role,match", [
    (dict(trainable=True, deepspeed=2, placement="replicated"), "remove `placement`"),
    (dict(placement="sharded", offload="cpu"), "placement: offload"),
    (dict(placement="replicated", offload="cpu"), "placement: offload"),
])
def test_impossible_placements_are_refused(role, match):
    with pytest.raises(ValueError, match=match):
        Role(config={}, **role)


def test_placement_errors_name_the_role_key():
    with pytest.raises(RecipeError, match="teacher.placement"):
        _recipe(placement="everywhere")
    with pytest.raises(RecipeError, match="`teacher`.*placement: offload"):
        _recipe(placement="sharded", offload="cpu")


def test_sharded_frozen_role_gets_settings_scaled_to_a_layer(monkeypatch):
    monkeypatch.setenv("DISTILL_GPU_MEMORY_GB", "80")
    plans = plan_roles(_recipe(placement="sharded"), DistillTrainer, world_size=2, vocab_size=100)
    t = plans["teacher"]
    h, L, f, V = TEACHER["hidden_size"], TEACHER["num_hidden_layers"], TEACHER["intermediate_size"], 100
    kv = h // TEACHER["num_attention_heads"] * TEACHER["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h  # q, o; k, v; mlp; two norms
    assert t.num_params == per_layer * L + 2 * V * h + h  # untied embedding and head, final norm
    assert layer_params(t.model_config, t.num_params) == (per_layer * L + h) // L
    z = t.ds_config["zero_optimization"]
    assert z["stage3_prefetch_bucket_size"] == 2 * layer_params(t.model_config, t.num_params)
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 4 * layer_params(t.model_config, t.num_params)
    assert z["stage3_param_persistence_threshold"] == 10 * h
    assert plans["student"].ds_config["zero_optimization"]["reduce_bucket_size"] == ZERO2_REDUCE_BUCKET


def test_explicit_numbers_in_a_config_win_over_tuning():
    ds = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 123, "stage3_max_live_parameters": 456}}
    tuned = frozen_zero3_settings(type("C", (), {"hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 10})(), 1000)
    z = role_ds_config("teacher", Role(config={}, deepspeed=ds), micro_batch_size=1, grad_accum=1, world_size=2,
                       grad_clip=None, hidden_size=8, placement="sharded", frozen_zero3=tuned)["zero_optimization"]
    assert z["stage3_prefetch_bucket_size"] == 123 and z["stage3_max_live_parameters"] == 456
    assert z["stage3_max_reuse_distance"] == tuned["stage3_max_reuse_distance"]  # unset: tuned
    trainable = role_ds_config("s", Role(trainable=True, config={}, deepspeed="zero3"), micro_batch_size=1, grad_accum=1,
                               world_size=2, grad_clip=None, hidden_size=8, frozen_zero3=tuned)["zero_optimization"]
    assert trainable["stage3_max_live_parameters"] == 10**9  # trainable roles keep DeepSpeed's default
