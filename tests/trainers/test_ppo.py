"""PPOTrainer: the recipe checks, the roles a recipe builds, the GPU recipe's plan, and on 2 CPU processes (one
launch): the steps of an actor and a critic against one process's plain-torch replay of every rank's rollouts, a
resumed run, and the quickstart raising the eval reward. The formulas alone: tests/losses/test_ppo_loss.py."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from distill.config.errors import RecipeError
from distill.config.recipe import validate_recipe
from distill.trainers.ppo import PPOTrainer, critic_values
from tests.helpers import REPO, TINY_LLAMA, launch_scenarios

REWARD = "distill.data.reward_task:end_mark"


def _raw(tmp_path, **ppo) -> dict:
    return {
        "trainer": "ppo", "output_dir": str(tmp_path / "run"), "overwrite": True,
        "actor": {"config": TINY_LLAMA, "optimizer": {"lr": 1e-3}},
        "ppo": {"num_generations": 2, "max_completion_length": 8, "reward_funcs": [REWARD], **ppo},
        "data": {"train": str(tmp_path / "data/train.jsonl"), "tokenizer": str(tmp_path / "data/tokenizer"),
                 "synthetic_seed": 0, "max_length": 32},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 2, "progress": False},
    }


def test_bad_setups_are_refused_naming_the_key(tmp_path):
    recipe = validate_recipe(_raw(tmp_path), PPOTrainer)
    assert recipe.critic.trainable and recipe.critic.model_class == "token_classification"
    assert recipe.critic.config == TINY_LLAMA and recipe.reference.config == TINY_LLAMA  # the actor's, by weights_from
    cases = [
        (dict(num_generations=3), "`ppo.num_generations: 3` must divide .* 1 x 4 x 2"),
        (dict(reward_funcs=[]), "PPO needs a reward"),
        (dict(max_completion_length=32), "`ppo.max_completion_length: 32` leaves no room for the prompt"),
        (dict(kl_estimator="k4"), "Unknown KL estimator 'k4'"),
        (dict(value_clip=0), "ppo.value_clip"),
    ]
    for ppo, said in cases:
        with pytest.raises(RecipeError, match=said):
            validate_recipe(_raw(tmp_path, **ppo), PPOTrainer)
    for role, block, said in [
        ("critic", {"trainable": False}, "`critic`: .*set `trainable: true`"),
        ("critic", {"model_class": "causal_lm"}, "`critic.model_class` must be `token_classification`"),
        ("critic", {"lora": {"r": 4}}, "`critic.lora`"),
        ("reward", {"config": TINY_LLAMA, "model_class": "causal_lm"}, "`reward.model_class` must be `sequence_classification`"),
    ]:
        raw = _raw(tmp_path)
        raw[role] = block
        with pytest.raises(RecipeError, match=said):
            validate_recipe(raw, PPOTrainer)


def test_the_roles_a_recipe_builds_and_the_critic_head(tmp_path):
    def roles(raw):
        return PPOTrainer.built_roles(validate_recipe(raw, PPOTrainer))

    assert roles(_raw(tmp_path)) == ["actor", "critic", "reference"]
    assert roles(_raw(tmp_path, kl_coef=0)) == ["actor", "critic"]  # no penalty: no reference
    raw = _raw(tmp_path, reward_funcs=[])
    raw["reward"] = {"config": {**TINY_LLAMA, "num_labels": 1}}
    assert roles(raw) == ["actor", "critic", "reference", "reward"]
    # The critic: one output per token, no dropout on it, whatever the config's defaults.
    raw = _raw(tmp_path)
    raw["critic"] = {"config": {**TINY_LLAMA, "num_labels": 3}}
    critic = SimpleNamespace(model_config=SimpleNamespace(num_labels=2))
    with pytest.raises(RecipeError, match="`critic.config.num_labels: 3`"):
        PPOTrainer.check_plans(validate_recipe(raw, PPOTrainer), {"critic": critic})
    PPOTrainer.check_plans(validate_recipe(_raw(tmp_path), PPOTrainer), {"critic": critic})
    assert critic.model_config.num_labels == 1 and critic.model_config.classifier_dropout == 0.0


def test_gpu_recipe_plans_without_loading(tmp_path):
    """recipes/gpu_ppo_0.3b.yaml (launch.device: cuda) cannot run here: its dry run's checks and plan (as `--dry-run`
    makes them) hold the four roles' shapes, the critic's head of one output and the actor's generation."""
    from distill.data.reward_task import write_reward_task
    from distill.loop.preflight import preflight
    from distill.trainers import load_recipe

    write_reward_task(tmp_path / "d", n_train=8, n_eval=2)
    recipe, cls = load_recipe(REPO / "recipes" / "gpu_ppo_0.3b.yaml", f"output_dir={tmp_path / 'run'}",
                              f"data.train={tmp_path / 'd/train.jsonl'}", f"data.tokenizer={tmp_path / 'd/tokenizer'}")
    assert cls is PPOTrainer and recipe.launch.device == "cuda"
    _, plans = preflight(recipe, cls, world_size=2, dry_run=True)
    assert list(plans) == ["actor", "critic", "reference"]
    assert plans["critic"].model_config.num_labels == 1 and plans["critic"].model_config.hidden_size == 1024
    assert any(line.startswith("generation (actor)") for line in cls.plan_notes(recipe, plans, 2))


def test_a_reward_model_starts_the_critic(tmp_path):
    """`critic.from_pretrained: <a reward model>` (OpenRLHF's start): its body and score head load into the token
    classifier, the head's bias starts at 0, no dropout; planned and built as a run builds it."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from distill.models.build import build_model
    from distill.loop.preflight import preflight

    torch.manual_seed(3)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    reward = LlamaForSequenceClassification(LlamaConfig(**cfg, vocab_size=64, num_labels=1, pad_token_id=0))
    reward.save_pretrained(tmp_path / "rm")
    raw = _raw(tmp_path)
    raw["critic"] = {"from_pretrained": str(tmp_path / "rm")}
    recipe = validate_recipe(raw, PPOTrainer)
    _, plans = preflight(recipe, PPOTrainer, world_size=1, dry_run=True)
    critic = build_model(plans["critic"].spec, plans["critic"].model_config)
    assert type(critic).__name__ == "LlamaForTokenClassification" and critic.dropout.p == 0.0
    torch.testing.assert_close(critic.score.weight, reward.score.weight)
    torch.testing.assert_close(critic.model.embed_tokens.weight, reward.model.embed_tokens.weight)
    assert critic.score.bias.abs().max() == 0


def test_critic_values_are_read_where_each_completion_token_is_predicted():
    """The value of the state before completion token t is the critic's output at the column that predicts t: one
    unpadded forward per sequence gives the same values (left-padded prompts, right-padded completions)."""
    from transformers import LlamaConfig, LlamaForTokenClassification

    from tests.trainers.test_grpo import _layout_batch

    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    critic = LlamaForTokenClassification(LlamaConfig(**cfg, vocab_size=40, num_labels=1, attn_implementation="eager")).eval()
    b = _layout_batch()
    with torch.no_grad():
        ours = critic_values(critic, b)  # [6, 5]
        for i, (p, c) in enumerate(zip(b["rows"], b["completions"])):
            whole = critic(input_ids=torch.tensor([p + c])).logits[0, :, 0]  # [len(p) + len(c)]
            torch.testing.assert_close(ours[i, :len(c)], whole[len(p) - 1:-1], atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    return launch_scenarios("tests.scripts.ppo_check", assets["root"], tmp_path_factory.mktemp("ppo"),
                            {"exact": ["exact"], "quickstart": ["quickstart"]}, timeout=400)


@pytest.mark.multiprocess
def test_two_processes_step_as_one_process_replay_and_resume_exactly(runs):
    """Actor ZeRO-2, critic ZeRO-2, reference and reward ZeRO-3 on 2 processes: after 8 steps (2 rollouts x 2 epochs x
    2 minibatches) both trained roles equal one process replaying every rank's rollouts whole (the rewards scored
    again, the advantages whitened over both ranks' tokens); each step's losses and gradient norms are the replay's;
    a run resumed from step 4 ends with the same weights, bit for bit; a step between rollouts waits on the host once."""
    r = runs["exact"]
    assert r["steps"] == list(range(1, 9)) and r["resumed_steps"] == [5, 6, 7, 8] and r["rollouts"] == 2
    for name, role in r["roles"].items():
        assert role["max_diff"] < 2e-6 < 1e-3 < role["moved"], (name, role)
        assert role["resumed_equal"], name
    for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm"):
        assert r[key]["logged"] == pytest.approx(r[key]["replayed"], rel=1e-4, abs=1e-6), key
    logged = r["reward"]["logged"]
    assert [x is not None for x in logged] == [True, False, False, False] * 2  # once per rollout
    assert [x for x in logged if x is not None] == pytest.approx([x for x in r["reward"]["replayed"] if x is not None], rel=1e-5)
    # The replay clips the actor's gradients at its own 0.5 and not the critic's: some steps' norms are above it.
    assert max(r["actor/grad_norm"]["logged"]) > 0.5 and max(r["critic/grad_norm"]["logged"]) > 0.5
    assert r["kl"][0] == 0 and r["kl"][4] != 0  # the reference starts as the actor
    # A step between rollouts brings tensors to the host once on each rank: the loop's step-end all-reduce.
    assert [len(syncs) for syncs in r["host_syncs"]] == [1, 1], r["host_syncs"]
    # Later passes over a rollout move the ratio and the values past their clips.
    assert r["clip_frac"][0] == 0 < max(r["clip_frac"]) and max(r["value_clip_frac"]) > 0


@pytest.mark.multiprocess
def test_quickstart_raises_the_eval_reward(runs):
    """recipes/ppo_quickstart.yaml, 16 steps (4 rollouts) at twice the actor's rate: the eval's end-mark reward rises by
    more than 0.2."""
    r = runs["quickstart"]
    before, after = r["before"]["rewards/end_mark"], r["after"]["rewards/end_mark"]
    assert after > before + 0.2, (before, after)
    assert all(math.isfinite(m["actor/loss"]) and math.isfinite(m["critic/loss"]) for m in r["metrics"])
    assert {"actor/lr", "critic/lr", "actor/grad_norm", "critic/grad_norm", "value/explained_variance"} <= set(r["metrics"][0])
