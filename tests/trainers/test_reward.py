"""RewardTrainer: its losses against float64 by hand, its recipe and data checks, the loss step against TRL's
RewardTrainer on the same model and batch, and on 2 CPU processes (tests/scripts/reward_check.py): a step against
the whole batch in plain torch, the quickstart learning the preferences, and its saved model scoring GRPO's
completions unchanged as GRPO's reward role."""
from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from distill.config.errors import RecipeError
from distill.config.recipe import validate_recipe
from distill.data.preference import (
    PreferenceCollator,
    build_preference_data,
    tokenize_preferences,
    write_preference_dataset,
)
from distill.loop.preflight import preflight
from distill.losses.reward import REWARD_LOSSES, bradley_terry, centering
from distill.trainers.reward import RewardSpec, RewardTrainer, reward_loss_step
from tests.helpers import TINY_LLAMA, launch_scenarios


# -- the losses ----------------------------------------------------------------------------------------
def test_bradley_terry_and_centering_by_hand_in_value_and_gradient():
    c = torch.tensor([1.5, -0.3, 0.0, 4.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.5, 0.2, 0.0, -2.0], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([0.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    coef = 0.1
    loss = bradley_terry(c, r, margin=m) + coef * centering(c, r)
    loss.sum().backward()
    for i in range(4):
        ci, ri, mi = float(c.detach()[i]), float(r.detach()[i]), float(m[i])
        d = ci - ri - mi
        assert float(loss.detach()[i]) == pytest.approx(math.log1p(math.exp(-d)) + coef * (ci + ri) ** 2, rel=1e-12)
        sig = 1 / (1 + math.exp(d))  # d/dd of -log sigmoid(d) is -sigmoid(-d)
        assert float(c.grad[i]) == pytest.approx(-sig + 2 * coef * (ci + ri), rel=1e-12, abs=1e-15)
        assert float(r.grad[i]) == pytest.approx(sig + 2 * coef * (ci + ri), rel=1e-12, abs=1e-15)
    assert torch.equal(bradley_terry(c, r), bradley_terry(c, r, margin=torch.zeros(4, dtype=torch.float64)))
    assert "bradley_terry" in REWARD_LOSSES
    with pytest.raises(ValueError, match="expected \\[B\\] scores"):
        bradley_terry(c[:, None], r[:, None])


# -- the recipe and the data ---------------------------------------------------------------------------
def _raw(tmp_path, **rm) -> dict:
    return {"trainer": "reward", "output_dir": str(tmp_path / "run"),
            "reward": {"config": {**TINY_LLAMA}, "optimizer": {"lr": 1e-3}},
            "rm": rm, "data": {"train": str(tmp_path / "prefs/train.jsonl"), "eval": str(tmp_path / "prefs/eval.jsonl"),
                               "tokenizer": str(tmp_path / "prefs/tokenizer"), "synthetic_seed": 0, "max_length": 48},
            "train": {"micro_batch_size": 4, "max_steps": 2, "progress": False}}


def test_bad_setups_are_refused_before_any_model_loads(tmp_path):
    cases = [
        ({"reward": {"config": TINY_LLAMA, "model_class": "causal_lm", "optimizer": {"lr": 1e-3}}},
         "`reward.model_class` must be `sequence_classification`"),
        ({"rm": {"loss": "bradley_terri"}}, "Did you mean 'bradley_terry'"),
        ({"rm": {"center_rewards_coefficient": -0.1}}, "rm.center_rewards_coefficient"),
        ({"reward": {"config": TINY_LLAMA, "lora": {"r": 4}}}, "`reward.lora`: a reward model trains whole"),
    ]
    for change, said in cases:
        with pytest.raises(RecipeError, match=said):
            validate_recipe({**_raw(tmp_path), **change}, RewardTrainer)
    raw = _raw(tmp_path)
    raw["reward"]["config"]["num_labels"] = 3
    with pytest.raises(RecipeError, match="`reward.config.num_labels` gives the reward model 3 outputs"):
        preflight(validate_recipe(raw, RewardTrainer), RewardTrainer, world_size=1, dry_run=True)


def test_a_causal_lm_checkpoint_becomes_a_one_output_classifier_with_its_tokenizer(tmp_path):
    """TRL's way: num_labels 1 on a causal LM's checkpoint; the tokenizer from the reward role's directory."""
    raw = _raw(tmp_path)
    raw["reward"] = {"from_pretrained": "distill:assets/teacher"}
    del raw["data"]["tokenizer"]
    tokenizer, plans = preflight(validate_recipe(raw, RewardTrainer), RewardTrainer, world_size=1, dry_run=True)
    assert plans["reward"].model_config.num_labels == 1 and len(tokenizer) == 53
    from distill.models.build import build_model

    model = build_model(plans["reward"].spec, plans["reward"].model_config)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.score.weight.shape[0] == 1


def test_margin_column_reaches_the_batch_or_is_refused_naming_the_record(tmp_path):
    from transformers import AutoTokenizer

    prefs = tmp_path / "prefs"
    write_preference_dataset(prefs, seed=0, n_train=12, n_eval=4)
    records = [json.loads(line) for line in (prefs / "train.jsonl").read_text().splitlines()]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({**r, "gap": i / 4}) + "\n" for i, r in enumerate(records)))
    tok = AutoTokenizer.from_pretrained(prefs / "tokenizer")

    def data(train, column):
        raw = _raw(tmp_path, margin_column=column)
        raw["data"].update(train=str(train), eval=None)
        return build_preference_data(validate_recipe(raw, RewardTrainer), tok, 0, 1, max_prompt_length=None, columns=(column,))

    bundle = data(tmp_path / "m.jsonl", "gap")
    batch = next(bundle.eval_batches(split="train"))
    assert batch["gap"].dtype == torch.float32 and batch["gap"].tolist() == [i / 4 for i in range(4)]
    with pytest.raises(RecipeError, match="`data.train`: .* no column 'margin'"):
        data(tmp_path / "m.jsonl", "margin")
    bad = [json.dumps({**r, "gap": "wide" if i == 5 else 1.0}) for i, r in enumerate(records)]
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")
    with pytest.raises(RecipeError, match="record 5: field 'gap' must be a finite number, got 'wide'"):
        data(tmp_path / "bad.jsonl", "gap")


# -- parity with TRL's RewardTrainer -------------------------------------------------------------------
class _Accelerator:
    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _pairs(tmp_path, n=6):
    from transformers import AutoTokenizer

    prefs = tmp_path / "prefs"
    write_preference_dataset(prefs, seed=0, n_train=n, n_eval=2)
    tok = AutoTokenizer.from_pretrained(prefs / "tokenizer")
    from distill.data.preference import load_preference_dataset

    ds, _ = tokenize_preferences(load_preference_dataset(str(prefs / "train.jsonl")), tok, max_length=48)
    return tok, [ds[i] for i in range(len(ds))]


def _classifier(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return LlamaForSequenceClassification(LlamaConfig(**cfg, vocab_size=vocab, num_labels=1, pad_token_id=0))


@pytest.mark.trl
@pytest.mark.parametrize("coef,with_margin", [(None, False), (0.05, True)])
def test_loss_gradients_and_metrics_match_trl(tmp_path, coef, with_margin):
    """TRL's `RewardTrainer.compute_loss` on a bare trainer against our loss step, the same tiny Llama classifier and
    pairs: TRL's collator makes the same batch from the same ids; the loss, every parameter's gradient, accuracy and
    margin agree. Our step in two micro-batches (each normalised by the step's pairs) gives the same loss."""
    pytest.importorskip("trl")
    from trl import RewardTrainer as TRLRewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok, pairs = _pairs(tmp_path)
    margins = [0.0, 0.5, 1.0, 0.25, 2.0, 0.75][:len(pairs)]
    ours_batch = PreferenceCollator(0, pad_to_multiple_of=8)(pairs)
    ours_batch["gap"] = torch.tensor(margins)
    examples = [{"chosen_ids": p["prompt_ids"] + p["chosen_ids"], "rejected_ids": p["prompt_ids"] + p["rejected_ids"],
                 **({"margin": m} if with_margin else {})} for p, m in zip(pairs, margins)]
    trl_batch = DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert torch.equal(trl_batch["input_ids"], ours_batch["input_ids"])
    assert torch.equal(trl_batch["attention_mask"], ours_batch["attention_mask"])

    model = _classifier(len(tok))
    theirs = copy.deepcopy(model)
    model.train()
    theirs.train()
    t = object.__new__(TRLRewardTrainer)
    t.__dict__.update(model=theirs, accelerator=_Accelerator(), args=SimpleNamespace(center_rewards_coefficient=coef),
                      _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trl_loss = TRLRewardTrainer.compute_loss(t, theirs, dict(trl_batch))
    trl_loss.backward()

    spec = RewardSpec(margin_column="gap" if with_margin else None, center_rewards_coefficient=coef)
    out = reward_loss_step(model, ours_batch, torch.tensor(len(pairs)), spec)
    out["loss"].backward()
    assert float(out["loss"].detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), theirs.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-8), name
    assert float(out["accuracy"]) == pytest.approx(t._metrics["train"]["accuracy"][0], abs=1e-7)
    assert float(out["margin"]) == pytest.approx(t._metrics["train"]["margin"][0], rel=1e-6)
    assert 0 < float(out["accuracy"]) < 1  # an untrained model: the metric is not trivially 0 or 1

    with torch.no_grad():  # two micro-batches of one step: each share over the step's 6 pairs
        halves = [PreferenceCollator(0, pad_to_multiple_of=8)(pairs[s]) for s in (slice(0, 2), slice(2, None))]
        for h, s in zip(halves, (slice(0, 2), slice(2, None))):
            h["gap"] = torch.tensor(margins[s])
        total = sum(reward_loss_step(model, h, torch.tensor(len(pairs)), spec)["loss"] for h in halves)
    assert float(total) == pytest.approx(float(trl_loss.detach()), rel=1e-5)


# -- 2 processes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    return launch_scenarios("tests.scripts.reward_check", assets["root"], tmp_path_factory.mktemp("reward"), {
        "margin": ["rm.margin_column=gap", "rm.center_rewards_coefficient=0.05"],
        "quickstart": ["quickstart"]}, timeout=600)


@pytest.mark.multiprocess
def test_step_equals_the_whole_batch_in_plain_torch(runs):
    # reward_check asserts the step-1 loss and gradient norm against plain torch inside the run; here, the record.
    m = runs["margin"]
    assert m["first"]["grad_norm"] == pytest.approx(m["reference"]["grad_norm"], rel=1e-4)
    assert m["first"]["loss"] == pytest.approx(m["reference"]["loss"], rel=1e-5)
    assert m["reference"]["margin_effect"] > 1e-3  # the margins changed the loss: the check is not trivial
    assert m["disjoint"]


@pytest.mark.multiprocess
def test_quickstart_learns_and_grpo_scores_with_its_model_unchanged(runs):
    q = runs["quickstart"]
    assert q["history"]["before"]["accuracy"] < 0.7 and q["history"]["after"]["accuracy"] > 0.85, q["history"]
    # GRPO with reward.from_pretrained: final/reward: its rewards are the saved classifier's scores of each prompt +
    # completion, each alone and unpadded through plain transformers.
    g = q["grpo"]
    assert g["rows"] >= 16 and g["max_score_error"] < 1e-4, g
    assert g["score_spread"] > 0.1  # the completions got different scores
