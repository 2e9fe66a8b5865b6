"""Recipes: every shipped one validates; every bad one fails before any model loads, naming key and fix."""
import re
from pathlib import Path

import pytest
import yaml

from distill.config.deepspeed import role_ds_config
from distill.config.errors import RecipeError
from distill.config.presets import resolve_deepspeed
from distill.config.recipe import parse_overrides, validate_recipe
from distill.config.schema import Role
from distill.loop.trainer import RoleTrainer
from distill.plan.planner import plan_roles
from distill.trainers import load_recipe
from distill.trainers.distill import DistillTrainer
from tests.helpers import python, tiny_recipe

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_and_documents_its_launch(path):
    recipe, trainer = load_recipe(path)
    assert recipe.trainer == trainer.name
    head = path.read_text().splitlines()[:8]
    assert any("python -m distill.train" in line or "accelerate launch" in line for line in head if line.startswith("#"))


def _error(raw, trainer=DistillTrainer) -> str:
    with pytest.raises(RecipeError) as e:
        validate_recipe(raw, trainer)
    return str(e.value)


@pytest.fixture
def raw(assets, tmp_path):
    return tiny_recipe(assets, tmp_path / "run")


def test_unknown_top_level_key_names_nearest_role(raw):
    raw["techer"] = raw.pop("teacher")
    msg = _error(raw)
    assert "unknown key `techer`" in msg and "did you mean `teacher`" in msg


def test_unknown_nested_key_names_nearest(raw):
    raw["train"]["max_step"] = 3
    assert "did you mean `train.max_steps`" in _error(raw)
    raw["train"].pop("max_step")
    raw["student"]["optimizer"]["learning_rate"] = 1.0
    assert "unknown key `student.optimizer.learning_rate`" in _error(raw)


def test_wrong_type_names_key_and_value(raw):
    raw["train"]["micro_batch_size"] = "eight"
    msg = _error(raw)
    assert "`train.micro_batch_size`" in msg and "'eight'" in msg


def test_frozen_role_with_optimizer_is_refused(raw):
    raw["teacher"]["optimizer"] = {"lr": 1e-3}
    msg = _error(raw)
    assert "`teacher`" in msg and "frozen role has no optimizer" in msg and "trainable: true" in msg


@pytest.mark.parametrize("stage", [4, -1])
def test_zero_stage_that_does_not_exist(raw, stage):
    raw["teacher"]["deepspeed"] = stage
    assert f"ZeRO stage {stage} does not exist" in _error(raw)


def test_unknown_deepspeed_config_name(raw):
    raw["teacher"]["deepspeed"] = "zero4"
    msg = _error(raw)
    assert "zero4" in msg and "zero3_offload" in msg


def test_missing_model_source(raw):
    raw["student"].pop("config")
    assert "student.from_pretrained" in _error(raw)


def test_missing_teacher_directory_is_caught_before_loading(raw, tmp_path):
    raw["teacher"]["from_pretrained"] = str(tmp_path / "nope")
    recipe = validate_recipe(raw, DistillTrainer)
    with pytest.raises(RecipeError, match="not a model directory.*teacher_pretrain"):
        plan_roles(recipe, DistillTrainer, world_size=1, vocab_size=53)


def test_unknown_kd_loss_names_nearest(raw):
    raw["kd"]["loss"] = "reverse_kll"
    msg = _error(raw)
    assert "`kd.loss`" in msg and "reverse_kl" in msg


def test_chunked_loss_with_zero3_student_is_refused(raw):
    raw["kd"]["chunked"] = True
    raw["student"]["deepspeed"] = "zero3"
    assert "student.deepspeed: zero2" in _error(raw)


def test_unknown_trainer_and_missing_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump({"trainer": "distil", "output_dir": "x", "data": {"train": "x"}}))
    with pytest.raises(RecipeError, match="Did you mean 'distill'"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist.*quickstart"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_parse_and_apply(tmp_path):
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(RecipeError, match="key.sub=value"):
        parse_overrides(["train.max_steps"])
    recipe, _ = load_recipe(RECIPES[0].parent / "quickstart.yaml", ["train.max_steps=7", "kd.loss=tvd"])
    assert recipe.train.max_steps == 7 and recipe.kd.loss == "tvd"


def test_an_override_can_replace_or_empty_a_mapping():
    onpolicy = RECIPES[0].parent / "onpolicy_quickstart.yaml"  # kd: generalized_jsd with params {beta: 0.5}
    # Switching the loss family: the old loss's params must go, not be merged into.
    recipe, _ = load_recipe(onpolicy, ["kd.loss=skew_forward_kl", "kd.params={alpha: 0.2}"])
    assert recipe.kd.params == {"alpha": 0.2}
    for empty in ("kd.params={}", "kd.params=null"):
        recipe, _ = load_recipe(onpolicy, ["kd.loss=forward_kl", empty])
        assert recipe.kd.params == {}, empty
    # A dotted key still sets inside the mapping; a whole mapping replaces the role's model config.
    recipe, _ = load_recipe(onpolicy, ["kd.params.beta=0.3"])
    assert recipe.kd.params == {"beta": 0.3}
    recipe, _ = load_recipe(onpolicy, ["student.config={model_type: llama, hidden_size: 32, intermediate_size: 64, "
                                       "num_hidden_layers: 1, num_attention_heads: 4}"])
    assert recipe.student.config == {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 4}


def test_size_mismatches_are_refused_in_preflight_and_the_dry_run(raw, tmp_path, capsys):
    """Both passed preflight and crashed every rank at the first forward with an IndexError."""
    from distill.cli.train import main
    from distill.loop.preflight import preflight
    from tests.helpers import tiny_model_dir

    small = tiny_model_dir(tmp_path / "small_vocab", "llama", 20)  # the synthetic tokenizer has 53 tokens
    bad = {**raw, "teacher": {**raw["teacher"], "from_pretrained": str(small)},
           "data": {**raw["data"], "tokenizer": raw["teacher"]["from_pretrained"]}}
    with pytest.raises(RecipeError, match=r"teacher.from_pretrained.*vocab_size 20.*tokenizer has 53 tokens"):
        preflight(validate_recipe(bad, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)
    long = {**raw, "data": {**raw["data"], "max_length": 65}}  # TINY_LLAMA has 64 positions
    with pytest.raises(RecipeError, match=r"`data.max_length: 65` is longer than `student.config` allows.*64"):
        preflight(validate_recipe(long, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)
    for r, needle in ((bad, "vocab_size 20"), (long, "max_position_embeddings 64")):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
        assert main([str(tmp_path / "r.yaml"), "--dry-run"]) == 2
        assert needle in capsys.readouterr().err


def test_role_deepspeed_config_per_role():
    kw = dict(micro_batch_size=4, grad_accum=2, world_size=2, grad_clip=1.0, hidden_size=64)
    student = role_ds_config("student", Role(trainable=True, config={}, deepspeed="zero2", precision="bf16"), **kw)
    teacher = role_ds_config("teacher", Role(config={}, deepspeed="zero3", precision="fp32"), **kw)
    assert student["bf16"]["enabled"] and not teacher["bf16"]["enabled"]  # precision is per role
    assert student["train_batch_size"] == 16 and student["gradient_accumulation_steps"] == 2
    assert teacher["gradient_accumulation_steps"] == 1 and "gradient_clipping" not in teacher
    assert teacher["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    frozen2 = role_ds_config("ref", Role(config={}, deepspeed=2), **kw)
    assert frozen2["zero_optimization"]["stage"] == 0  # nothing to partition below ZeRO-3 when frozen
    off = role_ds_config("teacher", Role(config={}, deepspeed="zero3_offload"), **kw)
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu" and "offload_optimizer" not in off["zero_optimization"]


@pytest.mark.parametrize("spec,match", [
    (dict(deepspeed=2, offload="cpu"), "needs ZeRO-3"),
    (dict(trainable=True, deepspeed=0), "trainable at ZeRO-0"),
    (dict(deepspeed={"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, precision="fp32"), "precision: bf16"),
    (dict(deepspeed={"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, trainable=True), "needs ZeRO-3"),
    (dict(deepspeed={"zero_optimization": {"stage": 2, "round_robin_gradients": "auto"}}, trainable=True), "auto"),
])
def test_impossible_deepspeed_setups(spec, match):
    with pytest.raises(RecipeError, match=match):
        role_ds_config("teacher", Role(config={}, **spec), micro_batch_size=1, grad_accum=1, world_size=1, grad_clip=None, hidden_size=8)


def test_shipped_deepspeed_configs_resolve():
    assert resolve_deepspeed("zero2")["zero_optimization"]["stage"] == 2
    assert resolve_deepspeed("zero3")["zero_optimization"]["stage"] == 3
    assert resolve_deepspeed("zero3_offload")["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_kd_params_are_checked_at_load(raw):
    raw["kd"].update(loss="generalized_jsd", params={"beta": 1.5})
    assert "`kd.params`" in _error(raw) and "generalized_jsd" in _error(raw)
    raw["kd"]["params"] = {"alpha": 0.1}
    assert "do not fit" in _error(raw)


def test_each_trainable_role_gets_its_own_clipping_and_accumulation(raw):
    """Any number of roles may train; each one's DeepSpeed config clips at its own `grad_clip` (0: none), else at
    `train.grad_clip`. A frozen role has no `grad_clip`."""
    raw["teacher"].update(trainable=True)
    raw["student"]["grad_clip"] = 0.3
    raw["train"].update(grad_clip=0.7, grad_accum=3)
    plans = plan_roles(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1, vocab_size=53)
    assert list(plans) == ["student", "teacher"]  # trainable roles in the order the trainer declares them
    assert [(p.ds_config["gradient_clipping"], p.ds_config["gradient_accumulation_steps"]) for p in plans.values()] == [
        (0.3, 3), (0.7, 3)]
    raw["student"]["grad_clip"] = 0
    plans = plan_roles(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1, vocab_size=53)
    assert plans["student"].ds_config["gradient_clipping"] == 0.0  # DeepSpeed's "off"
    raw["teacher"].update(trainable=False, grad_clip=0.5)
    assert "a frozen role has no optimizer, scheduler or grad_clip" in _error(raw)

    class FrozenOnly(RoleTrainer):
        roles = {"teacher": Role()}

    frozen = {k: raw[k] for k in ("trainer", "output_dir", "data", "train")} | {"teacher": {"config": raw["student"]["config"]}}
    with pytest.raises(RecipeError, match="no role is trainable: set `trainable: true` on one of"):
        plan_roles(validate_recipe(frozen, FrozenOnly), FrozenOnly, world_size=1, vocab_size=53)


def test_missing_teacher_is_named_before_the_tokenizer(raw, tmp_path):
    from distill.loop.preflight import preflight

    raw["teacher"]["from_pretrained"] = str(tmp_path / "nope")
    with pytest.raises(RecipeError, match="`teacher.from_pretrained`"):
        preflight(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1)


def test_missing_data_file_is_named_before_loading(raw, tmp_path):
    from distill.loop.preflight import preflight

    raw["data"]["train"] = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(RecipeError, match="`data.train`.*does not exist.*`data.synthetic_seed: 0`.*`distill` trainer"):
        preflight(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1)


def test_memory_estimate_follows_zero_stages():
    from transformers import LlamaConfig

    from distill.plan.planner import RolePlan, estimate_memory

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100)
    kw = dict(micro_batch_size=1, grad_accum=1, world_size=2, grad_clip=None, hidden_size=64)

    def plan(**spec):
        role = Role(config={}, **spec)
        return RolePlan("r", role, role_ds_config("r", role, **kw), cfg, 1000)

    z2 = estimate_memory(plan(trainable=True, deepspeed=2, precision="bf16"), world_size=2, micro_batch_size=1, seq_len=10)
    assert z2["weights"] == 2000 and z2["gradients"] == 1000 and z2["optimizer"] == 12000 / 2
    z3 = estimate_memory(plan(deepspeed=3), world_size=2, micro_batch_size=1, seq_len=10)
    assert z3["weights"] == 2000 and z3["gradients"] == z3["optimizer"] == 0  # fp32, halved by ZeRO-3, frozen
    off = estimate_memory(plan(deepspeed=3, offload="cpu"), world_size=2, micro_batch_size=1, seq_len=10)
    assert off["weights"] == 0
    assert z2["logits"] == 10 * 100 * 4 * 2


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    import subprocess

    out = tmp_path / "never"
    proc = subprocess.run(python("-m", "distill.train", str(RECIPES[0].parent / "quickstart.yaml"), "--dry-run",
                           f"output_dir={out}"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "student  yes" in proc.stdout and "estimated memory per GPU" in proc.stdout
    assert re.search(r"teacher placement (sharded|replicated|offload): auto: \S", proc.stdout), proc.stdout
    assert "accelerate launch --num_processes 2" in proc.stdout
    assert not out.exists()


def test_role_names_that_clash_with_recipe_keys_or_trainer_attributes():
    from distill.loop.trainer import RoleTrainer

    for bad in ("data", "evaluate"):
        cls = type("Bad", (RoleTrainer,), {"name": "bad", "roles": {"student": Role(trainable=True), bad: Role()}})
        with pytest.raises(TypeError, match=bad):
            validate_recipe({"trainer": "bad", "output_dir": "x", "data": {"train": "x"}}, cls)


def test_too_few_pairs_for_one_step_is_refused(tmp_path):
    import subprocess

    proc = subprocess.run(python("-m", "distill.train", str(RECIPES[0].parent / "dpo_quickstart.yaml"),
                           f"output_dir={tmp_path}/run", "train.micro_batch_size=1500"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "fewer than one optimizer step needs" in proc.stderr


def test_each_shipped_trainer_declares_its_recipe_class_with_a_docstring_per_field():
    from distill.config.recipe import recipe_model
    from distill.config.schema import RecipeBase
    from distill.loop.registry import TRAINERS

    for name, cls in TRAINERS.items():
        if not cls.__module__.startswith("distill."):
            continue
        declared = cls.recipe_class
        assert declared is not None and recipe_model(cls) is declared, f"trainer `{name}`: declare its recipe class"
        own = set(declared.model_fields) - set(RecipeBase.model_fields)
        assert own == set(cls.roles) | set(cls.sections), f"{declared.__name__}: a field per role and per section"
        undocumented = [k for k, f in declared.model_fields.items() if not f.description]
        assert not undocumented, f"{declared.__name__}: fields without a docstring: {undocumented}"


def test_a_subclass_extends_the_declared_recipe_and_a_wrong_declaration_is_refused():
    from distill.config.recipe import recipe_model
    from distill.config.schema import Section
    from distill.trainers import DistillTrainer

    class Extra(Section):
        weight: float = 1.0
        """A weight."""

    class WithExtra(DistillTrainer):
        sections = {**DistillTrainer.sections, "extra": Extra}

    model = recipe_model(WithExtra)
    assert issubclass(model, DistillTrainer.recipe_class) and model.model_fields["extra"].annotation is Extra

    class Wrong(DistillTrainer):
        sections = {"kd": Extra}  # the declared class says `kd` is a KDSpec

    with pytest.raises(TypeError, match="kd is declared .*KDSpec.* reads it as Extra"):
        recipe_model(Wrong)

    class OtherRoles(DistillTrainer):  # a `teacher` the declared class requires, which this trainer never reads
        roles = {"student": DistillTrainer.roles["student"]}

    with pytest.raises(TypeError, match=r"DistillRecipe declares \['teacher'\], which OtherRoles has no role or section for"):
        recipe_model(OtherRoles)
