"""Hand-picked mutations: each breaks one claim of the docs in a copy of the checkout, and the tests that claim to
guard it must then fail. A mutation that survives names a test that would let a wrong product pass.

    python tests/mutations.py                      # every mutation (tens of minutes: some guards launch 2 processes)
    python tests/mutations.py NAME [NAME ...]      # these (a name ending in * selects by prefix: 'checkpoint-*')
    python tests/mutations.py --list               # names, files and guarding tests, nothing run
    python tests/mutations.py --baseline NAME      # first run the guards on the unmutated copy: they must pass
    python tests/mutations.py --each NAME          # every guard runs, and each one must fail

For each mutation: the checkout is copied to a temporary directory (the working tree is never edited), `old` is
replaced by `new` in `file` (`old` must occur there exactly once), and the guarding tests run in the copy
(`pytest -x`, `PYTHONPATH` set to the copy, so processes the tests launch import the mutated package too).
Result: `caught` (a guard failed; with `--each`, every guard failed), `partly` (`--each`: some guards passed),
`survived` (every guard passed), `timeout`, or `error` (the text does not occur exactly once, the mutated file does
not compile, or pytest ran no test). The exit status is 0 when every mutation was caught.

Run the mutations of the parts you change before you commit (docs/reliability.md, "Tests that fail when the code is
wrong"); add one when you add a claim. The list is not run in CI.
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", ".venv", "venv", "runs", "build")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    """Path from the checkout's root."""
    old: str
    """Text that occurs exactly once in `file`."""
    new: str
    tests: tuple[str, ...]
    """pytest node ids, from the checkout's root, that must fail."""
    claim: str
    """What the mutation breaks, in the docs' words."""


def M(name: str, file: str, old: str, new: str, tests: list[str], claim: str) -> Mutation:
    return Mutation(name, file, old, new, tuple(tests), claim)


T = "tests/"
RLHF = T + "pipelines/test_rlhf_pipeline.py::"
RESUME = T + "loop/test_checkpoint.py::test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one_bitwise"
ROLES = T + "runtime/test_multiprocess.py::test_roles_switch_shard_logits_save_and_uneven_eval"
DISTILL_2RANKS = T + "runtime/test_multiprocess.py::test_distill_run_matches_whole_reference"
REUSED_GRPO = T + "trainers/test_grpo.py::test_zero3_reward_model_with_reused_batches"
GENERATION = T + "generation/test_generation.py::"
PPO_LOSS = T + "losses/test_ppo_loss.py::"
PPO_2RANKS = T + "trainers/test_ppo.py::test_two_processes_step_as_one_process_replay_and_resume_exactly"
MUTATIONS: list[Mutation] = [
    # -- checkpoints and resume ------------------------------------------------------------------------------
    M("checkpoint-scheduler", "distill/loop/checkpoint.py",
      "        role.scheduler.load_state_dict(json.loads((path / role.name / \"scheduler.json\").read_text()))\n", "",
      [T + "loop/test_tracking.py::test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume",
       T + "models/test_lora.py::test_lora_resume_equals_uninterrupted_and_export_gives_the_merged_model",
       T + "trainers/test_on_policy.py::test_resumed_on_policy_run_samples_and_trains_like_an_uninterrupted_one", RESUME],
      "a resumed run has the learning rate of the step it resumes at"),
    M("checkpoint-torch-rng", "distill/loop/checkpoint.py", "    torch.set_rng_state(rng[\"torch\"])\n", "", [RESUME],
      "a resumed run draws what the uninterrupted run draws (dropout)"),
    M("data-tokenizer-written-in-place", "distill/data/synthetic.py",
      '    save_tokenizer_atomic(tokenizer, out / "tokenizer")', '    tokenizer.save_pretrained(str(out / "tokenizer"))',
      [T + "data/test_data.py::test_a_reader_never_sees_a_partly_written_file_while_the_data_is_written_again"],
      "every rank may write the synthetic data while another loads it: each file lands whole"),
    M("data-written-without-the-mark", "distill/data/synthetic.py",
      '    if not (out / "meta.json").exists():  # ours from', '    if False:  # ours from',
      [T + "data/test_data.py::test_a_writer_marks_the_directory_ours_before_its_first_data_file"],
      "ranks writing the same data directory at once each see it as distill's, not as someone's data to refuse"),
    M("data-loader-draws-from-the-global-rng", "distill/data/loading.py",
      "drop_last=True, generator=torch.Generator().manual_seed(self.seed + epoch))", "drop_last=True)", [RESUME],
      "making a data iterator leaves the global RNG alone, so a resumed run's dropout masks are the uninterrupted run's"),
    M("checkpoint-latest-without-state-file", "distill/loop/checkpoint.py",
      "    return path if (path / STATE_FILE).is_file() else None", "    return path",
      [T + "loop/test_rundir.py::test_prune_keeps_the_newest_by_step_and_drops_a_left_timeline"],
      "only a complete checkpoint (trainer_state.json, written last) is resumed from"),
    M("checkpoint-prune-keeps-a-left-timeline", "distill/loop/checkpoint.py",
      "    for old in later + kept[:-keep]:", "    for old in kept[:-keep]:",
      [T + "loop/test_rundir.py::test_prune_keeps_the_newest_by_step_and_drops_a_left_timeline"],
      "checkpoints of a timeline the run left are deleted"),
    # -- roles and ranks ------------------------------------------------------------------------------------
    M("launch-ranks-never-forked", "distill/runtime/compat.py",
      "    return (sys.platform.startswith(\"linux\") and threading.active_count() == 1",
      "    return (False and threading.active_count() == 1",
      [RESUME],
      "on a machine whose ranks see no GPU, a plain launch forks its ranks, and they train what fresh ranks train"),
    M("launch-signalled-job-kills-its-forked-ranks", "distill/runtime/compat.py",
      "            self._worker_finished_event.set()\n", "            pass\n", [RESUME],
      "a signalled job's forked ranks leave after their checkpoint instead of waiting until the launcher kills them"),
    M("launch-forked-rank-thinks-it-started-plain", "distill/runtime/launch.py",
      "    return _STARTED_PLAIN and not in_forked_rank()", "    return _STARTED_PLAIN",
      [T + "trainers/test_on_policy.py::test_lmbda_zero_is_exactly_offline_kd_on_the_same_data"],
      "`distill.run` in a rank trains in that rank; only a process started without a launcher starts ranks"),
    M("role-switch-does-not-restore", "distill/runtime/roles.py",
      "        try:\n            yield\n        finally:\n            self._activate(previous)\n\n    @contextlib.contextmanager\n"
      "    def no_plugin",
      "        yield\n\n    @contextlib.contextmanager\n    def no_plugin", [ROLES],
      "the previous role's plugin comes back after a block, also on errors"),
    M("role-switch-copies-the-config", "distill/runtime/roles.py",
      "        set_hf_deepspeed_config(self.slots[name].hf_config)\n        self._active = name",
      "        self.state.select_deepspeed_plugin(name)\n        self._active = name", [ROLES],
      "a role switch costs microseconds, not accelerate's copy of the DeepSpeed config"),
    M("zero3-not-born-sharded", "distill/runtime/roles.py", "            model = load_model(plan)\n",
      "            with self.no_plugin():  # built whole, sharded when prepared\n                model = load_model(plan)\n",
      [ROLES],
      "a ZeRO-3 role is built under zero.Init: born sharded, never whole in one process"),
    M("watchdog-misses-a-lost-launcher", "distill/runtime/ranks.py",
      "        if self._parent is not None and os.getppid() != self._parent:", "        if False:",
      [T + "loop/test_rundir.py::test_a_second_run_is_refused_and_a_killed_launcher_takes_its_ranks_with_it"],
      "the ranks of a killed launcher stop instead of training on"),
    # -- the step ---------------------------------------------------------------------------------------------
    M("loss-local-token-count", "distill/loop/trainer.py",
      "        num_tokens = self.all_reduce(sum(self.count_tokens(b) for b in micro))",
      "        num_tokens = sum(self.count_tokens(b) for b in micro)", [DISTILL_2RANKS],
      "losses are summed over tokens and divided by the step's count of valid tokens on all ranks"),
    M("loss-not-scaled-for-deepspeeds-mean", "distill/loop/trainer.py",
      "backward(losses[key] * self.world_size, boundary=boundary)", "backward(losses[key], boundary=boundary)",
      [DISTILL_2RANKS], "the step's gradient is that of the global mean (DeepSpeed averages over ranks)"),
    M("nan-step-not-agreed", "distill/loop/trainer.py", "*((~torch.isfinite(totals[keys[n]])).float().to(self.device) for n in roles)",
      "*(torch.zeros((), device=self.device) for n in roles)",
      [T + "runtime/test_multiprocess.py::test_nan_losses_in_a_row_stop_every_rank_together"],
      "every rank learns that a rank's loss was NaN/Inf; max_bad_steps in a row stop the run"),
    M("grad-clip-null-clips-at-1", "distill/config/deepspeed.py", "float(grad_clip or 0.0)", "float(grad_clip or 1.0)",
      [T + "runtime/test_multiprocess.py::test_grad_clip_matches_a_reference_optimizer_step"],
      "`train.grad_clip: null` does not clip (DeepSpeed clips at 1.0 when its key is absent)"),
    # -- KD -----------------------------------------------------------------------------------------------------
    M("kd-forward-kl-direction", "distill/losses/kd.py", "    per_token = _kl(t.log_softmax(-1), s.log_softmax(-1))",
      "    per_token = _kl(s.log_softmax(-1), t.log_softmax(-1))", [T + "losses/test_losses.py::test_matches_reference"],
      "forward_kl is KL(teacher || student)"),
    M("kd-temperature-not-squared", "distill/losses/kd.py",
      "    return total * (temperature**2) / _denominator(mask, num_valid_tokens, total)",
      "    return total / _denominator(mask, num_valid_tokens, total)", [T + "losses/test_losses.py::test_matches_reference"],
      "KD losses at temperature T are scaled by T^2 (Hinton et al.), as TRL's"),
    M("kd-chunked-bf16-weight-grad-accumulation", "distill/losses/chunked.py",
      "        acc_dtype = torch.promote_types(weight.dtype, torch.float32)", "        acc_dtype = weight.dtype",
      [T + f"losses/test_chunked_loss.py::test_bf16_multi_chunk_weight_grad_accumulates_in_fp32[{loss}]"
       for loss in ("generalized_jsd", "forward_kl")],
      "the chunked KD loss accumulates a bf16 weight gradient in fp32"),
    # -- DPO ------------------------------------------------------------------------------------------------------
    M("dpo-loss-without-beta", "distill/losses/preference.py", "    loss = -F.logsigmoid(beta * h)",
      "    loss = -F.logsigmoid(h)",
      [T + "losses/test_preference_losses.py::test_matches_reference", T + "trainers/test_trl_parity.py::test_first_dpo_steps_match_trl"],
      "the sigmoid DPO loss is TRL's, -log sigmoid(beta * margin)"),
    M("dpo-reference-decays", "distill/trainers/dpo.py",
      "    # -- the reference ---", "    def prepare_step(self, step, micro_batches):\n"
      "        if step > 1 and 'reference' in self.models:  # a weight decay that reaches the frozen role\n"
      "            import deepspeed\n\n"
      "            for p in self.reference.module.parameters():\n"
      "                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):\n"
      "                    p.data.mul_(1 - 1e-4)\n"
      "        return micro_batches\n\n    # -- the reference ---",
      [T + "trainers/test_dpo.py::test_dpo_step_matches_whole_reference"], "the DPO reference never changes"),
    # -- GRPO -----------------------------------------------------------------------------------------------------
    M("grpo-reuse-without-old-logps", "distill/trainers/grpo.py",
      "                    mb[\"old_logps\"] = self._token_logps(self.policy, mb)\n", "                    pass\n",
      [REUSED_GRPO], "a reused generation batch is scored against the policy that generated it (num_iterations > 1)"),
    M("grpo-batch-std-per-rank", "distill/trainers/grpo.py",
      "g.scale_rewards, all_reduce=self._sum)", "g.scale_rewards, all_reduce=None)", [REUSED_GRPO],
      "`scale_rewards: batch` divides by the std of the whole step's rewards, all ranks"),
    M("grpo-clip-high-ignored", "distill/losses/grpo.py",
      "eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high", "eps_low, eps_high = epsilon, epsilon",
      [T + "losses/test_grpo_loss.py::test_loss_and_gradient_match_trl"], "GRPO's loss and gradient are TRL's (epsilon_high)"),
    # -- PPO --------------------------------------------------------------------------------------------------------
    M("ppo-gae-next-value-sign", "distill/losses/ppo.py", "delta = r[:, t] + gamma * next_value - v[:, t]",
      "delta = r[:, t] - gamma * next_value - v[:, t]", [PPO_LOSS + "test_gae_and_returns_by_hand"],
      "GAE: delta_t = r_t + gamma V_{t+1} - V_t"),
    M("ppo-kl-penalty-sign", "distill/losses/ppo.py", "r = torch.where(m, -kl_coef * _upcast(kl)", "r = torch.where(m, kl_coef * _upcast(kl)",
      [PPO_LOSS + "test_shaped_rewards_put_the_score_on_the_last_token"], "the KL penalty is subtracted from the per-token reward"),
    M("ppo-trainer-kl-coef-sign", "distill/trainers/ppo.py", "kl, mask, p.kl_coef)", "kl, mask, -p.kl_coef)", [PPO_2RANKS],
      "the trainer shapes the rewards with ppo.kl_coef as given"),
    M("ppo-score-on-first-token", "distill/losses/ppo.py", "r.scatter_add(1, last_token(mask)[:, None]",
      "r.scatter_add(1, 0 * last_token(mask)[:, None]", [PPO_LOSS + "test_shaped_rewards_put_the_score_on_the_last_token"],
      "the sequence's score is added on its last token"),
    M("ppo-whiten-counts-padding", "distill/losses/advantages.py", "(kept * kept).sum(), m.sum().double()])",
      "(kept * kept).sum(), torch.tensor(float(m.numel()), dtype=torch.float64)])",
      [PPO_LOSS + "test_masked_whiten_by_hand_and_across_ranks"], "whitening reads the valid tokens only"),
    M("ppo-whiten-per-rank", "distill/trainers/ppo.py", "adv = masked_whiten(adv, mask, all_reduce=self._sum)",
      "adv = masked_whiten(adv, mask, all_reduce=None)", [PPO_2RANKS],
      "advantages are whitened over every valid token of the rollout on all ranks"),
    M("ppo-policy-clip-dropped", "distill/losses/ppo.py", "per_token = torch.maximum(unclipped, clipped)",
      "per_token = unclipped", [PPO_LOSS + "test_policy_loss_and_gradient_by_hand"],
      "the policy loss is PPO's clipped surrogate"),
    M("ppo-value-clip-dropped", "distill/losses/ppo.py",
      "per_token, took_clip = torch.maximum(err, err_clipped), (err_clipped > err) & mask.bool()",
      "per_token, took_clip = err, (err_clipped > err) & mask.bool()", [PPO_LOSS + "test_value_loss_and_gradient_by_hand"],
      "the value loss is clipped around the rollout's values"),
    M("ppo-values-one-column-late", "distill/trainers/ppo.py", "return out[:, -c - 1:-1, 0].float()",
      "return out[:, -c:, 0].float()", [T + "trainers/test_ppo.py::test_critic_values_are_read_where_each_completion_token_is_predicted"],
      "a value is the critic's output at the column that predicts the token"),
    M("ppo-critic-dropout-kept", "distill/trainers/ppo.py",
      "cfg.classifier_dropout = 0.0  # transformers'", "pass  # transformers'",
      [T + "trainers/test_ppo.py::test_a_reward_model_starts_the_critic"], "the critic's head has no dropout"),
    M("ppo-epochs-not-reshuffled", "distill/trainers/ppo.py", "        if epoch:  # rollout rows", "        if False:  # rollout rows",
      [PPO_2RANKS], "each PPO epoch draws its minibatches afresh"),
    # -- generation ---------------------------------------------------------------------------------------------
    M("generation-finished-rows-go-on", "distill/generation/decode.py",
      "        nxt = torch.where(done, sampling.pad_token_id, nxt)", "        nxt = nxt",
      [GENERATION + "test_greedy_equals_generate_token_for_token"],
      "a row ends at its first eos: pad after it, as generate()"),
    M("generation-length-without-eos", "distill/generation/sampling.py",
      "first + 1, tokens.shape[1]) if tokens.shape[1] else first", "first, tokens.shape[1]) if tokens.shape[1] else first",
      [GENERATION + "test_sampling_is_seeded_and_bounded_by_min_and_max_new_tokens"],
      "a completion's length counts its tokens up to and including the first eos"),
    M("generation-temperature-ignored", "distill/generation/sampling.py", "    x = x / spec.temperature", "    x = x",
      [GENERATION + "test_sampled_tokens_follow_the_processed_softmax"],
      "tokens are drawn from the softmax processed as generate() does (temperature)"),
    M("generation-top-p-ignored", "distill/generation/sampling.py", "    if spec.top_p < 1:", "    if False:",
      [GENERATION + "test_sampled_tokens_follow_the_processed_softmax"],
      "tokens are drawn from the softmax processed as generate() does (top-p)"),
    M("generation-unseeded", "distill/generation/generate.py", "            torch.manual_seed(seed)", "            pass",
      [GENERATION + "test_sampling_is_seeded_and_bounded_by_min_and_max_new_tokens"],
      "every generation call is seeded: the same seed, the same completions"),
    # -- data -----------------------------------------------------------------------------------------------------
    M("packing-without-positions", "distill/data/packing.py",
      '"position_ids": batch["position_ids"], "use_cache": False}', '"use_cache": False}',
      [T + "data/test_packing.py::test_packed_run_trains_and_evaluates_like_the_unpacked_one"],
      "a packed batch evaluates as the unpacked one: each document attends to itself only, from position 0"),
    M("synthetic-entropy-one-eos-chance", "distill/data/synthetic.py",
      "key = (state, min(done, hi) if include_eos", "key = (state, lo if include_eos",
      [T + "data/test_data.py::test_entropy_estimate_is_the_mean_entropy_of_the_visited_predictions"],
      "the synthetic language's entropy floor counts the chance of <eos> after each sentence count"),
    # -- what is reported -----------------------------------------------------------------------------------------
    M("tracking-drops-a-metric", "distill/loop/tracking.py", 'if k != "step" and isinstance(v, (int, float))',
      'if k not in ("step", "lr") and isinstance(v, (int, float))',
      [T + "loop/test_tracking.py::test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume"],
      "TensorBoard gets every number of metrics.jsonl, step for step"),
    M("benchmark-step-time-per-token", "benchmarks/distill_throughput.py", "    step_s = elapsed / a.steps",
      "    step_s = elapsed / (a.steps * mb * a.seq_len)",
      [T + "system/test_benchmarks.py::test_distill_throughput_tiny_on_one_cpu_process"],
      "the throughput benchmark's step time, tokens/s and MFU are those of a step"),
    M("benchmark-build-timer-starts-late", "benchmarks/build_time.py",
      "    start = time.perf_counter()\n    with torch.device(where):\n"
      "        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)\n",
      "    with torch.device(where):\n        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)\n"
      "    start = time.perf_counter()\n",
      [T + "system/test_benchmarks.py::test_build_time_reports_the_cpu_build_of_the_pairs_teacher"],
      "build_time.py times the model's build"),
    # -- the RLHF pipeline where the truth is known ---------------------------------------------------------------
    M("rlhf-truth-ignores-the-grammar", "distill/data/ground_truth.py",
      "    if not is_grammatical(prompt.split() + words, seed=seed):\n        return 0.0\n", "",
      [RLHF + "test_ground_truth_scores_the_end_marks_of_grammatical_text_only"],
      "the ground truth gives 0 to text the grammar cannot produce"),
    M("rlhf-pair-prefers-the-worse", "distill/pipelines/rlhf_pairs.py",
      "chosen, rejected = (worst, best) if flipped else (best, worst)", "chosen, rejected = (best, worst) if flipped else (worst, best)",
      [RLHF + "test_pairs_take_the_best_and_worst_completion_and_flip_at_the_noise_rate"],
      "a pair's chosen completion is the one the truth prefers, unless the label noise swapped it"),
    M("rlhf-empty-completion-in-a-pair", "distill/pipelines/rlhf_pairs.py",
      "kept = [i for i, c in enumerate(group) if c.strip()]", "kept = list(range(len(group)))",
      [RLHF + "test_pairs_take_the_best_and_worst_completion_and_flip_at_the_noise_rate"],
      "an empty completion is in no pair"),
    M("rlhf-eval-pairs-noisy", "distill/pipelines/rlhf_pairs.py",
      '(("train", n_train, label_noise), ("eval", n_eval, 0.0))', '(("train", n_train, label_noise), ("eval", n_eval, label_noise))',
      [RLHF + "test_written_pairs_are_the_models_samples_with_noise_on_train_pairs_only"],
      "eval pairs are never swapped: the reward model's eval accuracy is its agreement with the truth"),
    M("rlhf-the-truth-trains", "distill/pipelines/rlhf.py", "json.dumps(weights + [0.0] * len(extra))", "json.dumps(weights + [1.0] * len(extra))",
      [RLHF + "test_rl_stages_get_the_sft_model_the_learned_reward_and_the_truth_at_weight_zero"],
      "the RL stages learn from the reward model alone; the truth is logged with weight 0"),
    M("rlhf-report-truth-is-the-learned-reward", "distill/pipelines/rlhf_report.py",
      '(steps, learned), (_, truth) = data[f"eval/{LEARNED}"], data[f"eval/{TRUTH}"]',
      '(steps, learned), (_, truth) = data[f"eval/{LEARNED}"], data[f"eval/{LEARNED}"]',
      [RLHF + "test_pipeline_learns_a_reward_model_and_raises_the_truth"],
      "the report's table holds the held-out truth of each RL run"),
    M("rlhf-finished-stage-runs-again", "distill/pipelines/rlhf.py", "if done.get(name) == key and marker.is_file():",
      "if False:", [RLHF + "test_pipeline_learns_a_reward_model_and_raises_the_truth"],
      "a finished stage is skipped when the pipeline runs again"),
    M("overlap-new-graph-raises", "distill/runtime/overlap.py",
      "                return _NEW_GRAPH\n", "                raise\n",
      [DISTILL_2RANKS + "[compiled_fused]"],
      "with compiled layers, a frozen forward beside the trainable one that needs a new graph runs again alone"),
    M("reward-responses-without-eos", "distill/data/preference.py",
      "c, r = (x if x[-1:] == [eos] else x + [eos] for x in map(ids, responses))", "c, r = map(ids, responses)",
      [T + "trainers/test_trl_parity.py::test_first_dpo_steps_match_trl"],
      "preference pairs are the sequences TRL's trainers make of them, each response ending with eos (DPO and the reward model share the tokenisation)"),
    M("fork-sees-the-servers-environment", "tests/forkserver.py",
      'os.environ.update({**added, **request["env"]})', "os.environ.update(added)",
      [T + "system/test_forks.py::test_a_forked_command_sees_what_a_fresh_one_sees_and_exits_the_same"],
      "a command the suite forks sees its own environment, as a fresh interpreter would"),
    M("fork-client-keeps-sigterm", "tests/forked.py",
      "        else:\n            os.kill(pid, sig)\n", "        else:\n            pass\n",
      [T + "system/test_forks.py::test_signals_reach_the_command_and_a_killed_client_takes_it_with_it"],
      "SIGTERM sent to a forked command's client reaches the command"),
]


# -- running ----------------------------------------------------------------------------------------------------
def select(names: list[str], mutations: list[Mutation] = MUTATIONS) -> list[Mutation]:
    if not names:
        return list(mutations)
    chosen = [m for m in mutations if any(fnmatch.fnmatchcase(m.name, n) for n in names)]
    unknown = [n for n in names if not any(fnmatch.fnmatchcase(m.name, n) for m in mutations)]
    if unknown:
        raise SystemExit(f"no mutation named {', '.join(unknown)}; --list shows them")
    return chosen


def copy_checkout(root: Path, into: Path) -> Path:
    dest = into / root.name
    shutil.copytree(root, dest, symlinks=True, ignore=IGNORED)
    return dest


def apply(m: Mutation, copy: Path) -> str | None:
    """Apply `m` in `copy`; the reason when it cannot be applied, else None."""
    path = copy / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        return f"the text to replace occurs {n} times in {m.file}, not once"
    text = text.replace(m.old, m.new)
    if path.suffix == ".py":
        try:
            ast.parse(text)
        except SyntaxError as e:
            return f"{m.file} does not compile once mutated: {e}"
    path.write_text(text)
    return None


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float, each: bool = False) -> tuple[str, str]:
    """(result, detail) of the tests in `copy`: passed, failed, timeout or error. `each`: every test runs (no -x),
    and `failed` means each of them failed (a parametrized one in at least one case), else `partly`."""
    env = {**os.environ, "PYTHONPATH": str(copy)}  # the copy only, never the checkout it came from
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    if not each:
        cmd.insert(3, "-x")
    # Its own process group: on a timeout, the runs the tests launched end with pytest.
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", f"still running after {timeout:.0f} s"
    except BaseException:  # Ctrl-C or SIGTERM to the tool: its tests stop too
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    failed = re.findall(r"^(?:FAILED|ERROR) (.+)$", out, flags=re.M)
    if proc.returncode == 0:
        return "passed", ""
    if proc.returncode == 1 and failed:
        if each:
            passed = [t for t in tests if not any(f.split(" ")[0].startswith(t) for f in failed)]
            if passed:
                return "partly", "these guards passed: " + ", ".join(passed)
        return "failed", failed[0][:240]
    return "error", f"pytest exit {proc.returncode}: " + " | ".join(out.strip().splitlines()[-3:])


def run_mutation(m: Mutation, root: Path = REPO, *, baseline: bool = False, timeout: float = 1200,
                 keep: bool = False, each: bool = False) -> dict:
    """Copy `root`, run `m`'s guards there (unmutated first with `baseline`), mutate, run them again."""
    start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f"distill-mutant-{m.name}-"))
    try:
        copy = copy_checkout(root, tmp)
        if baseline:
            result, detail = run_tests(copy, m.tests, timeout)
            if result != "passed":
                return {"name": m.name, "result": "error", "seconds": round(time.time() - start),
                        "detail": f"the unmutated guards do not pass ({result}: {detail})"}
        why = apply(m, copy)
        if why is not None:
            return {"name": m.name, "result": "error", "seconds": round(time.time() - start), "detail": why}
        result, detail = run_tests(copy, m.tests, timeout, each)
        result = {"failed": "caught", "passed": "survived"}.get(result, result)
        return {"name": m.name, "result": result, "seconds": round(time.time() - start), "detail": detail}
    finally:
        if keep:
            print(f"  kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all); NAME* selects by prefix")
    p.add_argument("--list", action="store_true", help="list the mutations and their guards, run nothing")
    p.add_argument("--baseline", action="store_true", help="run each mutation's guards unmutated first")
    p.add_argument("--timeout", type=float, default=1200, help="seconds for one mutation's tests (default 1200)")
    p.add_argument("--each", action="store_true", help="run every guard (no -x): caught only when each one fails")
    p.add_argument("--keep", action="store_true", help="keep each mutated copy (its path is printed)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--root", type=Path, default=REPO, help="the checkout to copy (default: this one), e.g. to see "
                   "which mutations an older checkout's tests let through")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # cleans up as Ctrl-C does
    chosen = select(a.names)
    if a.list:
        for m in chosen:
            print(f"{m.name}  ({m.file}): {m.claim}\n    " + "\n    ".join(m.tests))
        return 0
    rows = []
    for m in chosen:
        print(f"{m.name} ...", flush=True)
        row = run_mutation(m, a.root, baseline=a.baseline, timeout=a.timeout, keep=a.keep, each=a.each)
        rows.append(row)
        print(f"  {row['result']} in {row['seconds']} s{': ' + row['detail'] if row['detail'] else ''}", flush=True)
    width = max(len(r["name"]) for r in rows)
    print(f"\n{'mutation':<{width}}  result    seconds  detail")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['result']:<8}  {r['seconds']:>7}  {r['detail']}")
    counts = {k: sum(r["result"] == k for r in rows) for k in ("caught", "partly", "survived", "timeout", "error")}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0 if counts["caught"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
