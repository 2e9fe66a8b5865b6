"""GRPOTrainer: the recipe checks, the generation batch's layout, the model-level loss against TRL's,
the reward model's re-tokenization, and on 2 CPU processes: the quickstart's reward rising, a failing
reward function stopping every rank, and a ZeRO-3 reward model with reused generation batches."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from distill.config.errors import RecipeError
from distill.config.recipe import validate_recipe
from distill.losses.grpo import GRPO_LOSSES
from distill.rl.batch import RepeatedData, completion_masks, padded_width
from distill.trainers.grpo import GRPOSpec, GRPOTrainer, completion_logps, grpo_loss_step
from tests.helpers import REPO, TINY_LLAMA, check, python, pythonpath

REWARD = "distill.data.reward_task:end_mark"
PAD, EOS = 0, 2


def _raw(tmp_path, **grpo) -> dict:
    return {
        "trainer": "grpo", "output_dir": str(tmp_path / "run"), "overwrite": True,
        "policy": {"config": TINY_LLAMA, "optimizer": {"lr": 1e-3}},
        "grpo": {"num_generations": 4, "max_completion_length": 8, "reward_funcs": [REWARD], **grpo},
        "data": {"train": str(tmp_path / "data/train.jsonl"), "tokenizer": str(tmp_path / "data/tokenizer"),
                 "synthetic_seed": 0, "max_length": 32},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 2, "progress": False},
    }


def test_bad_setups_are_refused_naming_the_key(tmp_path):
    assert validate_recipe(_raw(tmp_path), GRPOTrainer).grpo.num_generations == 4
    cases = [
        (dict(num_generations=3), "`grpo.num_generations: 3` must divide .* 4 x 2 = 8"),
        (dict(reward_funcs=[]), "GRPO needs a reward"),
        (dict(reward_funcs=["no_such_module_q:f"]), "cannot import `no_such_module_q`"),
        (dict(reward_weights=[1.0, 2.0]), "one weight per function"),
        (dict(max_completion_length=32), "leaves no room for the prompt"),
        (dict(beta=0.1, reference="policy_without_adapter"), "needs a LoRA policy"),
        (dict(loss_type="dapoo"), "Did you mean 'dapo'"),
        (dict(scale_rewards="global"), "scale_rewards"),
    ]
    for grpo, said in cases:
        with pytest.raises(RecipeError, match=said):
            validate_recipe(_raw(tmp_path, **grpo), GRPOTrainer)
    raw = _raw(tmp_path)
    raw["reward"] = {"config": TINY_LLAMA, "model_class": "causal_lm"}
    with pytest.raises(RecipeError, match="`reward.model_class` must be `sequence_classification`"):
        validate_recipe(raw, GRPOTrainer)


def test_the_roles_a_recipe_builds(tmp_path):
    def roles(**grpo):
        return GRPOTrainer.built_roles(validate_recipe(_raw(tmp_path, **grpo), GRPOTrainer))

    assert roles() == ["policy"]  # beta 0 (TRL's default): no reference
    assert roles(beta=0.04) == ["policy", "reference"]
    raw = _raw(tmp_path, reward_funcs=[])
    raw["reward"] = {"config": {**TINY_LLAMA, "num_labels": 1}}
    assert GRPOTrainer.built_roles(validate_recipe(raw, GRPOTrainer)) == ["policy", "reward"]


def test_reward_model_with_several_outputs_is_refused():
    plans = {"reward": SimpleNamespace(model_config=SimpleNamespace(num_labels=2)),
             "policy": SimpleNamespace(model_config=SimpleNamespace(vocab_size=40))}
    recipe = SimpleNamespace(reward=SimpleNamespace(from_pretrained=None))
    with pytest.raises(RecipeError, match="num_labels: 1"):
        GRPOTrainer.check_plans(recipe, plans)


# -- the generation batch ----------------------------------------------------------------------------
def test_completion_masks_and_widths():
    completions = torch.tensor([[5, EOS, PAD, PAD], [6, 7, 8, 9], [EOS, PAD, PAD, PAD]])
    attention, loss, truncated = completion_masks(completions, eos_id=EOS, mask_truncated=True)
    assert attention.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert loss.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]] and truncated.tolist() == [False, True, False]
    assert completion_masks(completions, eos_id=EOS, mask_truncated=False)[1].tolist() == attention.tolist()
    assert padded_width(5, 9, {"pad_to_multiple_of": 8, "max_length": 32}) == 11  # 16 columns in all
    assert padded_width(5, 9, {"pad_to_multiple_of": 8, "max_length": 15}) == 10  # never past max_length...
    assert padded_width(9, 9, {"pad_to_multiple_of": 8, "max_length": 15}) == 9  # ...unless the tokens are longer


def test_repeated_data_reuses_each_batch_and_resumes_in_place():
    inner = SimpleNamespace(steps_per_epoch=3, train_batches=lambda start_step=0: iter(range(start_step, 100)))
    data = RepeatedData(inner, 3)
    it = data.train_batches()
    assert [next(it) for _ in range(7)] == [0, 0, 0, 1, 1, 1, 2] and data.steps_per_epoch == 9
    it = data.train_batches(start_step=4)  # step 5 of an uninterrupted run is the 2nd use of batch 1
    assert [next(it) for _ in range(3)] == [1, 1, 2]


def _tiny_policy(vocab=40, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**cfg, vocab_size=vocab, attn_implementation="eager")).eval()


def _layout_batch():
    """2 prompts x 3 completions, left-padded prompts | right-padded completions, as `sample_rollout` lays them out."""
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10]]
    completions = [[11, 12, EOS], [13, EOS], [14, 15, 16, 17, 24], [18, EOS], [19, 20, 21, EOS], [22, 23, EOS]]  # 3rd: cut
    P, C = 5, 5
    rows = [prompts[i // 3] for i in range(6)]
    prompt_ids = torch.tensor([[PAD] * (P - len(p)) + p for p in rows])
    prompt_mask = (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in rows])[:, None]).long()
    comp = torch.tensor([c + [PAD] * (C - len(c)) for c in completions])
    attention, loss, _ = completion_masks(comp, eos_id=EOS, mask_truncated=False)
    return {"input_ids": torch.cat([prompt_ids, comp], 1), "attention_mask": torch.cat([prompt_mask, attention], 1),
            "completion_ids": comp, "completion_mask": attention, "loss_mask": loss, "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask, "rows": rows, "completions": completions}


def test_completion_logps_equal_one_unpadded_forward_per_sequence():
    model, b = _tiny_policy(), _layout_batch()
    with torch.no_grad():
        ours = completion_logps(model, b, temperature=0.7)  # [6, 5]
        for i, (p, c) in enumerate(zip(b["rows"], b["completions"])):
            logits = model(input_ids=torch.tensor([p + c])).logits[0].double() / 0.7
            ref = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            assert torch.allclose(ours[i, :len(c)].double(), ref, atol=2e-5), i
            assert (ours[i, len(c):] == 0).all()


class _Accelerator:
    num_processes, process_index, device, sync_gradients, is_main_process = 1, 0, torch.device("cpu"), True, True

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return contextlib.nullcontext()


@pytest.mark.trl
@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"),
                                            ("grpo", "sequence")])
def test_model_loss_and_gradient_match_trl(loss_type, level):
    """One fixed batch through a tiny Llama: our loss step against TRL's `_compute_loss` (its own log-prob path,
    the fused LM head at the sampling temperature): the loss, every parameter's gradient, KL, entropy, clipping;
    with GSPO's ratio per completion too (`importance_sampling_level: sequence`)."""
    pytest.importorskip("trl")
    from collections import defaultdict

    from trl import GRPOTrainer as TRLGRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    settings = dict(beta=0.05, epsilon=0.2, epsilon_high=0.28, temperature=0.7, max_completion_length=5, loss_type=loss_type,
                    importance_sampling_level=level)
    b = _layout_batch()
    g = torch.Generator().manual_seed(3)
    model = _tiny_policy()
    with torch.no_grad():
        now = completion_logps(model, b, settings["temperature"])
    b["advantages"] = torch.randn(6, generator=g)
    b["old_logps"] = (now + 0.2 * torch.randn(now.shape, generator=g)) * b["completion_mask"]
    b["ref_logps"] = (now + 0.3 * torch.randn(now.shape, generator=g)) * b["completion_mask"]

    theirs = copy.deepcopy(model)
    add_fused_lm_head(theirs, temperature=settings["temperature"], outputs=("log_probs", "entropy"))
    t = object.__new__(TRLGRPOTrainer)
    t.__dict__.update(accelerator=_Accelerator(), model=theirs, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                      importance_sampling_level=level, use_vllm=False, _entropy_bonus_enabled=False, aux_loss_enabled=False,
                      _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, beta=settings["beta"],
                      loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=5,
                      current_gradient_accumulation_steps=1,
                      args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1))
    theirs.train()
    trl_loss = TRLGRPOTrainer._compute_loss(t, theirs, {
        "prompt_ids": b["prompt_ids"], "prompt_mask": b["prompt_mask"], "completion_ids": b["completion_ids"],
        "completion_mask": b["completion_mask"], "advantages": b["advantages"], "old_per_token_logps": b["old_logps"],
        "ref_per_token_logps": b["ref_logps"], "num_items_in_batch": b["loss_mask"].sum()})
    trl_loss.backward()

    model.train()
    out = grpo_loss_step(model, b, GRPO_LOSSES[loss_type].count(b["loss_mask"]), GRPOSpec(**settings),
                         metric_tokens=b["loss_mask"].sum())
    out["loss"].backward()

    assert float(out["loss"].detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), theirs.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    m = t._metrics["train"]
    assert float(out["kl"]) == pytest.approx(m["kl"][0], rel=1e-5)
    assert float(out["entropy"]) == pytest.approx(m["entropy"][0], rel=1e-5)
    if level == "token":  # at the sequence level TRL counts clipped completions, we count their tokens
        assert float(out["clip_ratio/region_mean"]) == pytest.approx(m["clip_ratio/region_mean"][0], rel=1e-5, abs=1e-7)


# -- the reward model --------------------------------------------------------------------------------
def test_reward_model_reads_ids_or_retokenized_text(tmp_path):
    """Same scores through both paths: the policy's ids, and text re-encoded by a tokenizer whose ids differ."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from distill.data.synthetic import SyntheticLanguage, build_tokenizer
    from distill.rl.reward_model import RewardModelScorer

    tok = build_tokenizer(SyntheticLanguage(0))
    # The reward model's own tokenizer: the same words, other ids (the vocabulary reversed after the specials).
    vocab = tok.get_vocab()
    words = sorted((w for w in vocab if vocab[w] > 3), key=vocab.get)
    mapping = {**{w: i for w, i in vocab.items() if i <= 3}, **{w: 4 + j for j, w in enumerate(reversed(words))}}
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel(vocab=mapping, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    other = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                    unk_token="<unk>")
    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(**cfg, vocab_size=len(tok), num_labels=1, pad_token_id=PAD)).eval()
    rm.save_pretrained(tmp_path / "rm")
    other.save_pretrained(tmp_path / "rm")

    texts = [("the red cat", "sleeps ."), ("alice sees", "a dog !"), ("every big", "tree falls quietly .")]
    prompts = [tok(p)["input_ids"][:-1] for p, _ in texts]  # bos + words
    comps = [tok(c, add_special_tokens=False)["input_ids"] + [EOS] for _, c in texts]
    P, C = max(map(len, prompts)), max(map(len, comps))
    pid = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    cid = torch.tensor([c + [PAD] * (C - len(c)) for c in comps])
    batch = {"input_ids": torch.cat([pid, cid], 1), "attention_mask": torch.cat([(pid != PAD).long(), (cid != PAD).long()], 1)}

    def scorer(source):
        return RewardModelScorer(_Called(rm), source=source, tokenizer=tok, batch_size=2)

    scores = {}
    for source in (None, str(tmp_path / "rm")):
        with torch.no_grad():
            scores[source] = scorer(source).score(batch)
    assert scorer(str(tmp_path / "rm")).tokenizer is not None  # the text path was taken
    with torch.no_grad():  # by hand: each text alone through the reward model's own tokenizer
        hand = [float(rm(**other(p + " " + c, return_tensors="pt")).logits[0, 0]) for p, c in texts]
        ids_hand = [float(rm(input_ids=torch.tensor([p + c])).logits[0, 0]) for p, c in zip(prompts, comps)]
    assert scores[str(tmp_path / "rm")].tolist() == pytest.approx(hand, abs=1e-5)
    assert scores[None].tolist() == pytest.approx(ids_hand, abs=1e-5)
    assert ids_hand != pytest.approx(hand, abs=1e-3)  # the two tokenizers really give other ids


class _Called:
    """A plain model where the scorer expects a role: called for logits, `module` for its config."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


# -- 2 processes ---------------------------------------------------------------------------------------
def _train(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(python("-m", "distill.train", *args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_quickstart_raises_the_reward(tmp_path):
    """recipes/grpo_quickstart.yaml, shortened (10 steps, a higher rate, no eval): the mean reward over the last
    3 steps is clearly above the first 3 steps', and the KL to the reference has grown from 0."""
    proc = _train(["recipes/grpo_quickstart.yaml", f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'd/train.jsonl'}",
                   "data.eval=", "train.max_steps=10", "train.log_every=1", "policy.optimizer.lr=1e-3", "train.progress=false"])
    check(proc)
    lines = [m for m in _metrics(tmp_path / "run") if "reward" in m]
    assert [m["step"] for m in lines] == list(range(1, 11))
    first, last = (sum(m["rewards/end_mark"] for m in part) / 3 for part in (lines[:3], lines[-3:]))
    assert last > first + 0.2, (first, last)
    assert lines[0]["kl"] < 1e-3 < lines[-1]["kl"]
    assert all(0 < m["gen_time_share"] < 1 and m["completions/mean_length"] > 0 for m in lines)


BAD_REWARDS = '''
import os

def fails_on_rank_1(prompts, completions, **kwargs):
    if os.environ.get("RANK") == "1":
        raise KeyError("no score for this completion")
    return [0.0] * len(completions)
'''


@pytest.mark.multiprocess
def test_a_reward_function_failing_on_one_rank_stops_every_rank_with_one_message(tmp_path):
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    raw = _raw(tmp_path, reward_funcs=["bad_rewards:fails_on_rank_1"], beta=0.04)
    raw["reference"] = {"deepspeed": "zero3"}  # rank 0 would wait in the reference's gathers after its rewards
    raw["launch"] = {"num_processes": 2, "timeout_s": 60}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    proc = _train([str(tmp_path / "r.yaml")], env={"PYTHONPATH": pythonpath(tmp_path)},
                  timeout=120)
    assert proc.returncode != 0
    said = "on rank 1: reward function `bad_rewards:fails_on_rank_1` raised KeyError: 'no score for this completion'"
    assert proc.stderr.count(said) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess
def test_zero3_reward_model_with_reused_batches(tmp_path):
    """A config-built sequence-classification reward role at ZeRO-3 beside a reward function, 2 updates per
    generation batch (old log-probs kept), batch-scaled advantages, the grpo loss type, truncated completions
    masked: the run finishes and logs both rewards, once per generation batch. Each rank's advantages are those of
    the whole batch, both ranks' rewards together (tests/scripts/grpo_record.py writes them). The second use of a
    batch is scored against the policy that generated it: with a clip range of 1e-4, one update moves the ratio
    past it. The reference, sharded (ZeRO-3) and built from the policy's config, starts as the whole (ZeRO-2)
    policy does: the first KL is 0."""
    from distill.losses.grpo import group_advantages

    raw = _raw(tmp_path, num_iterations=2, scale_rewards="batch", loss_type="grpo", mask_truncated_completions=True, beta=0.04,
               epsilon=1e-4)
    raw["trainer"] = "tests.scripts.grpo_record:RecordingGRPO"
    raw["reward"] = {"config": {**TINY_LLAMA, "num_labels": 1}, "deepspeed": "zero3"}
    raw["reference"] = {"deepspeed": "zero3", "placement": "sharded"}
    raw["train"].update(max_steps=4, log_every=1)
    raw["launch"] = {"num_processes": 2, "timeout_s": 120}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    check(_train([str(tmp_path / "r.yaml")], env={"PYTHONPATH": pythonpath(REPO)}))
    lines = [m for m in _metrics(tmp_path / "run") if "loss" in m]
    assert [("rewards/reward_model" in m, "rewards/end_mark" in m) for m in lines] == [(True, True), (False, False)] * 2
    assert all(math.isfinite(m["loss"]) for m in lines)
    assert lines[0]["clip_ratio/region_mean"] == 0 < lines[1]["clip_ratio/region_mean"]  # ratio 1 on the first use only
    assert lines[0]["kl"] < 1e-7 < lines[-1]["kl"], [m["kl"] for m in lines]
    ranks = [[json.loads(line) for line in (tmp_path / "run" / f"generation_batches_rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [[b["step"] for b in batches] for batches in ranks] == [[1, 3], [1, 3]]
    for first, second in zip(*ranks):
        rewards = torch.tensor(first["rewards"] + second["rewards"])  # [16]: both ranks' rows
        whole, _ = group_advantages(rewards, 4, "batch")  # one process holding every row
        got = torch.tensor(first["advantages"] + second["advantages"])
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6, equal_nan=True)
        alone, _ = group_advantages(rewards[:8], 4, "batch")  # rank 0 by itself: other advantages, so the check bites
        assert not torch.allclose(alone, whole[:8], rtol=1e-3, equal_nan=True)
