"""The RLHF pipeline where the truth is known (distill/pipelines/rlhf.py): the ground truth, the labelled pairs, bad
pipeline files, and the whole chain at CPU size: the reward model agrees with the truth better than chance, and
both RL runs raise the truth of the policy's held-out samples above the SFT model's."""
import json
import os
import random
import subprocess

import pytest

from distill.data.ground_truth import grammatical, ground_truth, score
from distill.data.synthetic import ENDS, SyntheticLanguage
from distill.pipelines.rlhf import Pipeline, load_pipeline, stage_commands
from distill.pipelines.rlhf_pairs import label_pairs, write_pairs
from distill.config.errors import RecipeError
from tests.helpers import REPO, check, python

PIPELINE = str(REPO / "recipes" / "rlhf" / "pipeline.yaml")


def test_ground_truth_scores_the_end_marks_of_grammatical_text_only():
    lang, rng = SyntheticLanguage(0), random.Random(3)
    for _ in range(50):  # text the language produces: the share of its sentence ends that are "!"
        words = lang.sample_document(rng, rng.randint(1, 3)).split()
        k = rng.randint(1, len(words) - 1)
        ends = [w for w in words[k:] if w in ENDS]
        want = sum(w == "!" for w in ends) / len(ends) if ends else 0.0
        assert score(" ".join(words[:k]), " ".join(words[k:])) == want
    assert ground_truth(["the red cat"], ["sees a dog !"]) == [1.0]
    assert ground_truth(["a fox"], ["runs . bob sleeps !"]) == [0.5]
    assert ground_truth(["a fox"], ["runs"]) == [0.0]  # no sentence end
    # more sentences than the training documents have (1 to 4) is a length, not a grammar error
    assert ground_truth(["a dog runs ."], ["a cat sleeps . bob runs ! a dog sleeps . a cat runs ! bob runs !"]) == [0.6]
    # one more "!" where the grammar allows none, a doubled article, a verb for an inanimate subject: 0
    assert ground_truth(["the red cat", "the", "a tree"], ["sees a dog ! !", "the dog runs !", "sings !"]) == [0.0, 0.0, 0.0]
    assert ground_truth([[{"role": "user", "content": "a fox"}]], [[{"role": "assistant", "content": "runs !"}]]) == [1.0]
    assert grammatical(["the red cat", "the red cat", "a fox"], ["sees a dog ! !", "sees a dog", "runs ."]) == [0.0, 1.0, 1.0]


def test_pairs_take_the_best_and_worst_completion_and_flip_at_the_noise_rate():
    records = [{"prompt": "a fox", "end_mark": "!"}] * 400 + [{"prompt": "bob", "end_mark": "!"}] * 2
    # the last two tie: their completions score the same, or an empty one (eos first) is all that differs
    groups = [["runs .", "runs !", "runs . bob sleeps !"]] * 400 + [["sleeps .", "runs ."], ["", "runs !"]]
    clean, stats = label_pairs(records, groups, ground_truth, label_noise=0.0, rng=random.Random(0))
    assert stats["pairs"] == 400 and stats["ties_skipped"] == 2 and stats["flipped"] == 0
    assert clean[0] | {} == {"prompt": "a fox", "chosen": "runs !", "rejected": "runs .", "truth_chosen": 1.0,
                              "truth_rejected": 0.0, "flipped": False}
    assert stats["truth_mean"] == pytest.approx((400 * 1.5 + 1) / 1204)
    noisy, stats = label_pairs(records, groups, ground_truth, label_noise=0.3, rng=random.Random(0))
    assert 0.24 < stats["flipped"] < 0.36
    assert all((p["chosen"], p["rejected"]) == (("runs .", "runs !") if p["flipped"] else ("runs !", "runs ."))
               for p in noisy)


def test_written_pairs_are_the_models_samples_with_noise_on_train_pairs_only(tmp_path):
    """Label noise 1: every train pair is swapped (its chosen scores below its rejected by the truth), no eval pair is;
    the records carry the prompts of their split and read back as the reward trainer's preference data."""
    from distill.data.preference import load_preference_dataset
    from distill.data.reward_task import write_reward_task
    from distill.config.presets import resolve_shipped

    write_reward_task(tmp_path / "prompts", n_train=16, n_eval=16)
    meta = write_pairs(tmp_path / "pairs", model_dir=resolve_shipped("distill:assets/teacher"), prompts_dir=tmp_path / "prompts",
                       truth=ground_truth, n_train=16, n_eval=16, completions_per_prompt=4, max_completion_length=12,
                       temperature=1.0, label_noise=1.0, batch_size=16, seed=0)
    assert meta["train"]["flipped"] == 1.0 and meta["eval"]["flipped"] == 0.0
    for split, swapped in (("train", True), ("eval", False)):
        rows = [json.loads(line) for line in (tmp_path / "pairs" / f"{split}.jsonl").read_text().splitlines()]
        prompts = {json.loads(line)["prompt"] for line in (tmp_path / "prompts" / f"{split}.jsonl").read_text().splitlines()}
        assert len(rows) == meta[split]["pairs"] > 8 and {r["prompt"] for r in rows} <= prompts
        for r in rows:
            assert ground_truth([r["prompt"]] * 2, [r["chosen"], r["rejected"]]) == [r["truth_chosen"], r["truth_rejected"]]
            assert (r["truth_chosen"] < r["truth_rejected"]) == swapped and r["flipped"] == swapped
        assert len(load_preference_dataset(str(tmp_path / "pairs" / f"{split}.jsonl"))) == len(rows)


def test_a_bad_pipeline_file_names_the_key_before_anything_runs(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key `pairs.label_nosie`: did you mean `pairs.label_noise`"):
        load_pipeline(PIPELINE, ["pairs.label_nosie=0.2"])
    with pytest.raises(RecipeError, match=r"`pairs.label_noise`"):
        load_pipeline(PIPELINE, ["pairs.label_noise=1.5"])
    with pytest.raises(RecipeError, match=r"`rl.grpo.recipe`: .* is `trainer: reward`; the pipeline's RL stages run grpo"):
        load_pipeline(PIPELINE, ["rl.grpo.recipe=distill:recipes/rlhf/reward.yaml"])
    with pytest.raises(RecipeError, match=r"stage `rloo` .*`grpo.num_generations: 7` must divide"):
        load_pipeline(PIPELINE, ["rl.rloo.overrides=[grpo.num_generations=7]"])
    with pytest.raises(RecipeError, match=r"`pairs.truth`: cannot import `no_such_module`"):
        load_pipeline(PIPELINE, ["pairs.truth=no_such_module:truth"])


def test_rl_stages_get_the_sft_model_the_learned_reward_and_the_truth_at_weight_zero(tmp_path):
    spec = load_pipeline(PIPELINE, [f"output_dir={tmp_path}"])
    cmds = stage_commands(spec)
    assert list(cmds) == ["reward", "grpo", "rloo", "ppo"]
    for name in ("grpo", "rloo"):
        from distill.trainers import load_recipe

        recipe, _ = load_recipe(cmds[name][0], cmds[name][1:])
        assert recipe.reward.from_pretrained == str(tmp_path / "reward" / "final" / "reward")
        assert recipe.policy.from_pretrained == recipe.reference.from_pretrained == spec.sft.from_pretrained.replace(
            "distill:", str(REPO / "distill") + "/")
        assert recipe.grpo.reward_funcs == ["distill.data.ground_truth:ground_truth", "distill.data.ground_truth:grammatical"]
        assert recipe.grpo.reward_weights == [0.0, 0.0]
        assert recipe.data.eval == str(tmp_path / "prompts" / "eval.jsonl")
    ppo, _ = load_recipe(cmds["ppo"][0], cmds["ppo"][1:])  # the critic starts from the reward model
    assert ppo.reward.from_pretrained == ppo.critic.from_pretrained == str(tmp_path / "reward" / "final" / "reward")
    assert ppo.actor.from_pretrained == recipe.policy.from_pretrained
    assert ppo.ppo.reward_funcs == recipe.grpo.reward_funcs and ppo.ppo.reward_weights == [0.0, 0.0]
    reward, _ = load_recipe(cmds["reward"][0], cmds["reward"][1:])
    assert reward.data.train == str(tmp_path / "pairs" / "train.jsonl")


def test_gpu_pipeline_checks(tmp_path):
    """The GPU pipeline's recipes validate with the overrides the pipeline gives them (what --dry-run checks); its SFT
    stage trains the LM recipe and the later stages read that run's model."""
    spec = load_pipeline(str(REPO / "recipes" / "rlhf" / "gpu_pipeline.yaml"), [f"output_dir={tmp_path}"])
    cmds = stage_commands(spec)
    assert list(cmds) == ["sft", "reward", "grpo", "rloo", "ppo"]
    sft = str(tmp_path / "sft" / "final" / "model")
    assert f"reward.from_pretrained={sft}" in cmds["reward"] and f"policy.from_pretrained={sft}" in cmds["grpo"]


def _pipeline(out, *extra):
    return subprocess.run(python("-m", "distill.pipelines.rlhf", PIPELINE, f"output_dir={out}", *CPU_TEST, *extra),
                          capture_output=True, text=True, cwd=REPO, timeout=400)


CPU_TEST = ["pairs.n_train=256", "pairs.n_eval=64", "pairs.max_completion_length=16",
            "reward_model.overrides=[train.max_steps=30, train.progress=false]",
            "rl_overrides=[train.max_steps=10, train.eval_every=10, train.eval_batches=2, train.progress=false]",
            "rl.grpo.overrides=[policy.optimizer.lr=1.0e-3]", "rl.rloo.overrides=[policy.optimizer.lr=1.0e-3]"]
# PPO keeps its recipe's rate: at 1e-3 its 10 steps raise the learned reward and lower the truth (it games the reward model)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.multiprocess
def test_pipeline_learns_a_reward_model_and_raises_the_truth(tmp_path):
    """The whole chain, shortened: the reward model's eval accuracy (held-out pairs labelled by the truth) beats
    chance; each RL run's truth on held-out prompts ends above the SFT model's (its step-0 evaluation); every step
    logs the learned reward, the truth, the KL and the lengths; the report's table holds the held-out values; the same
    pipeline run again skips every stage."""
    out = tmp_path / "p"
    check(_pipeline(out))
    rm = json.loads((out / "reward" / "summary.json").read_text())
    assert rm["after"]["accuracy"] > 0.7, rm
    table = (out / "report" / "summary.md").read_text()
    for name in ("grpo", "rloo", "ppo"):
        rows = _metrics(out / name)
        evals = [r for r in rows if "eval/rewards/ground_truth" in r]
        assert [r["step"] for r in evals] == [0, 10]
        assert evals[-1]["eval/rewards/ground_truth"] > evals[0]["eval/rewards/ground_truth"] + 0.1, (name, evals)
        steps = [r for r in rows if "rewards/ground_truth" in r]
        every = 4 if name == "ppo" else 1  # PPO rolls out (and scores) once per 2 epochs x 2 minibatches of steps
        assert [r["step"] for r in steps] == list(range(1, 11, every))
        assert all({"rewards/reward_model", "rewards/grammatical", "kl", "completions/mean_length"} <= set(r) for r in steps)
        truth = [r["eval/rewards/ground_truth"] for r in evals]
        assert f"| {name} | 10 |" in table and f"| {truth[0]:.3f} → {truth[-1]:.3f} |" in table
    assert (out / "report" / "rewards.png").stat().st_size > 0
    before = {name: os.path.getmtime(out / name / "metrics.jsonl") for name in ("reward", "grpo", "rloo", "ppo")}
    said = []
    Pipeline(load_pipeline(PIPELINE, [f"output_dir={out}", *CPU_TEST]), log=said.append).run()
    assert sum("is done" in line for line in said) == 5, said
    assert before == {name: os.path.getmtime(out / name / "metrics.jsonl") for name in before}
