"""Group Relative Policy Optimisation: online RL with a policy, an optional frozen reference and rewards.

Each optimizer step (`grpo.num_iterations` steps, when that is above 1) starts with a generation batch:
the step's prompts on this rank, `num_generations` completions each, sampled from the policy. Rewards
come from reward functions (`module:function`, distill/rl/rewards.py) and/or a `reward` role, a frozen
sequence classifier; advantages come from the rewards by a registered estimator (`grpo.advantage`:
GRPO's group normalisation, RLOO's leave-one-out baseline, REINFORCE++'s global normalisation;
distill/losses/advantages.py). The reference's log-probs (and, when batches are reused or the KL is a
reward penalty, the generating policy's) are taken once, here. The shared loop then trains on the batch
in `train.grad_accum` micro-batches of `train.micro_batch_size` completions, with TRL's clipped
surrogate (a ratio per token, or per completion: `grpo.importance_sampling_level`), k3 KL and loss
aggregation.

Groups stay on the rank that generated them: advantages need no collective (TRL spreads a group
over ranks and gathers every reward); statistics of the whole step (`scale_rewards: batch`,
REINFORCE++) all-reduce.
"""
from __future__ import annotations

import torch

from distill.config.errors import RecipeError
from distill.config.schema import Role
from distill.data.loading import DataBundle, collator_padding, pad_id, tokenized_splits
from distill.data.prompts import PromptCollator, load_prompt_dataset, tokenize_prompts
from distill.data.reward_task import write_reward_task
from distill.generation.completions import CompletionSampler, generation_plan
from distill.loop.monitor import before_after_table
from distill.loop.registry import register_trainer
from distill.loop.trainer import RoleTrainer
from distill.losses.advantages import advantages, sequence_kl
from distill.losses.grpo import get_grpo_loss, group_std, token_loss
from distill.losses.logps import token_entropy, token_logps
from distill.rl.batch import RepeatedData, completion_masks, pad_columns, padded_width, split_rows
from distill.rl.reward_model import RewardModelScorer, check_reward_recipe, reward_model_given
from distill.rl.rewards import load_reward_functions, weighted_reward
from distill.rl.rollout import PromptRecords, score_rollout
from distill.trainers.grpo_spec import GRPORecipe, GRPOSpec, sampling_spec


@register_trainer
class GRPOTrainer(RoleTrainer):
    name = "grpo"
    roles = {
        "policy": Role(trainable=True, deepspeed="zero2"),
        "reference": Role(deepspeed="zero3", weights_from="policy"),
        "reward": Role(deepspeed="zero3", model_class="sequence_classification"),
    }
    sections = {"grpo": GRPOSpec}
    recipe_class = GRPORecipe
    rollout_section = "grpo"
    """The recipe section with the sampling and reward keys (`rollout_spec`); PPO reuses the rollout with its own."""

    def __init__(self, recipe, **kwargs):
        self.rollout: list[dict] | None = None
        """The step's generation batch, as `prepare_step` returns it: trained on again for `grpo.num_iterations` steps."""
        self.rollout_stats: dict[str, list[float]] = {}
        """Statistics of each generation batch since the last metrics line (`prepare_step` appends them, `step_metrics`
        averages and clears them)."""
        super().__init__(recipe, **kwargs)

    # -- the recipe --------------------------------------------------------------------------------
    @classmethod
    def built_roles(cls, recipe) -> list[str]:
        g, out = recipe.grpo, ["policy"]
        if g.beta != 0 and g.reference == "model":
            out.append("reference")
        if reward_model_given(recipe):
            out.append("reward")
        return out

    @classmethod
    def check_recipe(cls, recipe) -> None:
        g, t = recipe.grpo, recipe.train
        check_reward_recipe(recipe, "grpo", "GRPO")
        per_step = t.micro_batch_size * t.grad_accum
        if per_step % g.num_generations:
            raise RecipeError(f"`grpo.num_generations: {g.num_generations}` must divide the completions of one step on "
                              f"each rank, train.micro_batch_size x train.grad_accum = {t.micro_batch_size} x "
                              f"{t.grad_accum} = {per_step}: change one of them (e.g. num_generations: "
                              f"{_divisor_near(per_step, g.num_generations)})")
        if g.max_completion_length >= recipe.data.max_length:
            raise RecipeError(f"`grpo.max_completion_length: {g.max_completion_length}` leaves no room for the prompt in "
                              f"`data.max_length: {recipe.data.max_length}`: raise data.max_length or lower it")
        if g.beta != 0 and g.reference == "policy_without_adapter" and recipe.policy.lora is None:
            raise RecipeError("`grpo.reference: policy_without_adapter` needs a LoRA policy: add `policy.lora: {r: 16}` "
                              "(or set `grpo.reference: model`)")

    @classmethod
    def plan_notes(cls, recipe, plans, world_size: int) -> list[str]:
        return generation_plan(recipe, plans, world_size, sampling_spec(recipe.grpo), ["policy"])

    @classmethod
    def check_plans(cls, recipe, plans) -> None:
        if "reward" in plans:
            RewardModelScorer.check(recipe, plans)

    @classmethod
    def write_synthetic(cls, out_dir, seed: int, recipe=None) -> None:
        write_reward_task(out_dir, seed=seed)

    # -- data: prompts, with their text and extra columns kept for the reward functions ------------
    def build_data(self):
        d, g = self.recipe.data, self.rollout_spec
        max_prompt = d.max_length - g.max_completion_length
        self.records = PromptRecords()  # by index: the prompt as the reward functions see it, and its other columns

        def load(source, options):  # -> ((raw records, tokenized prompts), stats)
            raw = load_prompt_dataset(source, **options)
            tokenized, stats = tokenize_prompts(raw, self.tokenizer, max_length=d.max_length, max_prompt_length=max_prompt)
            return (raw, tokenized), stats

        splits = {"eval": None}
        for key, (raw, tokenized), stats in tokenized_splits(d, load):
            if self.rank == 0 and stats["prompt_truncated"]:
                self.log(f"data.{key}: {stats['prompt_truncated']} of {stats['n']} prompts left-truncated to {max_prompt} "
                         f"tokens (data.max_length - {self.rollout_section}.max_completion_length)")
            splits[key] = tokenized.add_column("index", self.records.add(raw))
        pad = pad_id(self.tokenizer)
        self.padding = collator_padding(d.max_length, self.compiled)
        rows, repeat = self.rollout_layout()
        prompts_per_step = rows // g.num_generations
        bundle = DataBundle(splits["train"], splits["eval"], _Indexed(PromptCollator(pad, **self.padding)), prompts_per_step,
                            self.rank, self.world_size, self.recipe.seed, pad, grad_accum=1,
                            pad_example={"prompt_ids": [pad], "completion_ids": [], "real": False, "index": -1})
        return RepeatedData(bundle, repeat)

    @property
    def rollout_spec(self):
        """The recipe section the rollout reads: sampling (`sampling_spec`), num_generations, reward functions."""
        return getattr(self.recipe, self.rollout_section)

    def rollout_layout(self) -> tuple[int, int]:
        """(completions of one generation batch on each rank, optimizer steps that train on it)."""
        t = self.recipe.train
        return t.micro_batch_size * t.grad_accum, self.recipe.grpo.num_iterations

    # -- a generation batch ------------------------------------------------------------------------
    def prepare_step(self, step, micro_batches):
        """Generate and score once per `num_iterations` steps (every rank together: the reference and reward
        roles may be ZeRO-3); the steps in between train on the same batch again. Each micro-batch holds its
        rows' prompt | completion ids and masks, `rewards` (NaN: unscored) and `advantages` [rows]."""
        if self.rollout is None or (step - 1) % self.recipe.grpo.num_iterations == 0:
            self.rollout = self._generate_and_score(micro_batches[0], seed=self.rollout_seed(step))
        return self.rollout

    def rollout_seed(self, step: int) -> int:
        """The sampling seed of the rollout made at `step` on this rank: a resumed run samples its prompts alike."""
        return hash((self.recipe.seed, step, self.rank)) % 2**63

    def _generate_and_score(self, prompts: dict, *, seed: int) -> list[dict]:
        """The step's micro-batches, each with its completions' `advantages` [B] and the `rewards` [B] they came from
        (with `kl_penalty: reward`, less beta times the `kl` [B] also kept)."""
        g, t = self.recipe.grpo, self.recipe.train
        batch = self.sample_rollout(prompts, seed)
        per_function = self._rewards(batch)  # [N, F]
        scored = weighted_reward(per_function, self._reward_weights.to(per_function.device))  # [N]
        micro = split_rows(batch, t.grad_accum)
        kl_in_reward = g.beta != 0 and g.kl_penalty == "reward"
        with torch.no_grad():
            for mb in micro:
                if g.num_iterations > 1 or kl_in_reward:
                    mb["old_logps"] = self._token_logps(self.policy, mb)
                if g.beta != 0:
                    mb["ref_logps"] = self._reference_logps(mb)
        rewards, kl = scored, None
        if kl_in_reward:
            kl = torch.cat([sequence_kl(mb["old_logps"], mb["ref_logps"], mb["loss_mask"]) for mb in micro])  # [N]
            rewards = scored - g.beta * kl
            for mb, k in zip(micro, kl.chunk(t.grad_accum)):  # the loss has no KL term; a first update's ratio is 1
                mb["kl"] = k
                del mb["ref_logps"]
                if g.num_iterations == 1:
                    del mb["old_logps"]
        adv = advantages(g.advantage, rewards, g.num_generations, g.scale_rewards, all_reduce=self._sum)  # [N]
        for mb, a, r in zip(micro, adv.chunk(t.grad_accum), rewards.chunk(t.grad_accum)):
            mb["advantages"], mb["rewards"] = a, r
        loss_tokens = self._record(batch, per_function, scored, rewards, kl)
        for mb in micro:
            mb["loss_tokens"] = loss_tokens  # the metrics' denominator: every loss token of the step on all ranks
        return micro

    def sample_rollout(self, prompts: dict, seed: int) -> dict:
        """`num_generations` completions of each prompt: [N = prompts x G] rows, prompt | completion columns."""
        g = self.rollout_spec
        prompt_ids = prompts["prompt_ids"].repeat_interleave(g.num_generations, 0)  # [N, P]
        prompt_mask = prompts["prompt_mask"].repeat_interleave(g.num_generations, 0)  # [N, P]
        completions = self.sampler.generate(self.policy, prompt_ids, prompt_mask, seed=seed)  # [N, L]
        attention, loss_mask, truncated = completion_masks(completions, eos_id=self.tokenizer.eos_token_id,
                                                           mask_truncated=g.mask_truncated_completions)
        width = padded_width(prompt_ids.shape[1], completions.shape[1], self.padding)
        completions = pad_columns(completions.masked_fill(attention == 0, self.data.pad_id), width, self.data.pad_id)
        attention, loss_mask = pad_columns(attention, width, 0), pad_columns(loss_mask, width, 0)  # [N, C]
        return {"input_ids": torch.cat([prompt_ids, completions], 1), "attention_mask": torch.cat([prompt_mask, attention], 1),
                "completion_ids": completions, "completion_mask": attention, "loss_mask": loss_mask,
                "truncated": truncated, "real": prompts["real"].repeat_interleave(g.num_generations, 0),
                "index": prompts["index"].repeat_interleave(g.num_generations, 0).tolist()}

    def _rewards(self, batch: dict) -> torch.Tensor:
        """[N, F] rewards of every function, then the reward model (`distill.rl.rollout.score_rollout`); collective."""
        return score_rollout(batch, self.records, self.tokenizer, self._reward_functions, self.reward_model,
                             world_size=self.world_size, device=self.device)

    def texts(self, batch: dict, rows: list[int] | None = None) -> tuple[list, list, list[list[int]]]:
        """(prompts, completions, completion ids) of a generation batch's `rows`, as reward functions take them
        (`PromptRecords.texts`)."""
        return self.records.texts(batch, self.tokenizer, rows)

    # -- the loss ----------------------------------------------------------------------------------
    def count_tokens(self, batch):
        """The loss type's share of the step's normaliser: completions, tokens, or 1 per micro-batch."""
        return get_grpo_loss(self.recipe.grpo.loss_type).count(batch["loss_mask"])

    def loss_step(self, batch, num_tokens):
        return grpo_loss_step(self.policy, batch, num_tokens, self.recipe.grpo, metric_tokens=batch["loss_tokens"])

    def _token_logps(self, role, batch) -> torch.Tensor:
        return completion_logps(role, batch, self.recipe.grpo.temperature)  # [B, C]

    def _reference_logps(self, batch) -> torch.Tensor:
        if self.recipe.grpo.reference == "policy_without_adapter":
            with self.policy.without_adapter():
                return self._token_logps(self.policy, batch)
        return self._token_logps(self.reference, batch)

    # -- evaluation and metrics --------------------------------------------------------------------
    @torch.no_grad()
    def eval_step(self, batch):
        """Sums over the eval prompts' completions (num_generations each, seeded by the prompts, so the same
        before and after training): the reward, each function's, the completion length."""
        seed = hash(tuple(batch["prompt_ids"].flatten().tolist())) % 2**63
        rolled = self.sample_rollout(batch, seed)
        per_function = self._rewards(rolled)
        real = rolled["real"].float()  # [N]
        reward = weighted_reward(per_function, self._reward_weights.to(per_function.device))

        def total(x):
            return torch.where(real.bool(), torch.nan_to_num(x, nan=0.0), 0).sum()

        out = {"reward": total(reward), "tokens": real.sum(), "rewards/tokens": real.sum(), "completions/tokens": real.sum(),
               "completions/mean_length": total(rolled["completion_mask"].sum(1).float())}
        for name, col in zip(self._reward_names, per_function.unbind(1)):
            out[f"rewards/{name}"] = total(col)
        return out

    def _record(self, batch, per_function, rewards, penalised, kl) -> torch.Tensor:
        """Global statistics of a generation batch (two all-reduces), averaged over the batches of each metrics line:
        `rewards` [N] as scored, `penalised` [N] the rewards the advantages came from (less the KL penalty, with
        `kl_penalty: reward`), `kl` [N] that penalty's sequence KL (or None). Returns the batch's loss tokens on all
        ranks (at least 1)."""
        g, f = self.recipe.grpo, per_function.shape[1]
        scored = ~torch.isnan(rewards)
        std = group_std(penalised, g.num_generations)  # [N / G]
        parts = [torch.nansum(rewards), scored.sum(), batch["completion_mask"].sum(), rewards.numel(), batch["truncated"].sum(),
                 (std < 1e-6).sum(), std.numel(), batch["loss_mask"].sum(), 0 if kl is None else kl.sum()]
        sums = self._sum(torch.cat([torch.stack([torch.as_tensor(p, device=self.device).float() for p in parts]),
                                    torch.nansum(per_function, 0).float(), (~torch.isnan(per_function)).sum(0).float()]))
        s = sums.tolist()
        mean = s[0] / max(s[1], 1)
        sq = float(self._sum(torch.where(scored, (rewards - mean) ** 2, 0).sum()))
        stats = {"reward": mean, "reward_std": (sq / max(s[1] - 1, 1)) ** 0.5, "completions/mean_length": s[2] / s[3],
                 "completions/clipped_ratio": s[4] / s[3], "frac_reward_zero_std": s[5] / s[6],
                 **{f"rewards/{n}": s[9 + i] / max(s[9 + f + i], 1) for i, n in enumerate(self._reward_names)}}
        if kl is not None:  # the penalty's KL per loss token, as TRL's RLOOTrainer logs it
            stats["kl"] = s[8] / max(s[7], 1)
        for k, v in stats.items():
            self.rollout_stats.setdefault(k, []).append(v)
        return sums[7].clamp(min=1)

    def step_metrics(self):
        out = {k: sum(v) / len(v) for k, v in self.rollout_stats.items()}
        self.rollout_stats = {}
        return {**out, **self.sampler.metrics()}

    def report(self, history):
        if "before" in history:
            rows = [("eval reward", "reward")] + [(f"eval reward: {n}", f"rewards/{n}") for n in self._reward_names]
            self.log(before_after_table(history, rows + [("eval completion length", "completions/mean_length")]))

    # -- parts built on first use ------------------------------------------------------------------
    @property
    def sampler(self):
        if "_sampler" not in self.__dict__:
            self._sampler = CompletionSampler.for_trainer(self, sampling_spec(self.rollout_spec), key=self.rollout_section)
        return self._sampler

    @property
    def _reward_functions(self):
        if "_funcs" not in self.__dict__:
            g = self.rollout_spec
            self._funcs = load_reward_functions(g.reward_funcs, g.reward_weights)
        return self._funcs

    @property
    def reward_model(self) -> RewardModelScorer | None:
        if "_scorer" not in self.__dict__:
            self._scorer = None if "reward" not in self.models else RewardModelScorer(
                self.reward, source=self.recipe.reward.from_pretrained, tokenizer=self.tokenizer,
                batch_size=self.recipe.train.micro_batch_size, chat_texts=self.texts if self.records.chat else None,
                log=self.log if self.rank == 0 else None)
        return self._scorer

    @property
    def _reward_names(self) -> list[str]:
        return [f.name for f in self._reward_functions] + (["reward_model"] if self.reward_model else [])

    @property
    def _reward_weights(self) -> torch.Tensor:
        w = [f.weight for f in self._reward_functions] + ([self.rollout_spec.reward_model_weight] if self.reward_model else [])
        return torch.tensor(w)

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(x)


def completion_logits(model, batch: dict, temperature: float) -> torch.Tensor:
    """[B, C, V] logits at the sampling temperature that predict the C completion columns of `batch` (prompt |
    completion rows: input_ids, attention_mask [B, P + C], completion_ids [B, C])."""
    c = batch["completion_ids"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=c + 1).logits
    logits = logits[:, :-1]
    return logits / temperature if temperature != 1 else logits


def completion_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """[B, C] log-probabilities of the completion tokens (0 on padding), at the sampling temperature."""
    return token_logps(completion_logits(model, batch, temperature), completion_labels(batch))


def grpo_loss_step(model, batch: dict, num_tokens: torch.Tensor, g: GRPOSpec, *, metric_tokens: torch.Tensor) -> dict:
    """GRPO's loss of one micro-batch (advantages [B], loss_mask [B, C], optional old_logps / ref_logps [B, C])
    under `g`'s loss type, clipping and KL, and its metrics (entropy, clip ratios, KL: sums over the micro-batch's
    loss tokens divided by `metric_tokens`, the step's count on all ranks)."""
    mask = batch["loss_mask"]  # [B, C]
    logits = completion_logits(model, batch, g.temperature)  # [B, C, V]
    logps = token_logps(logits, completion_labels(batch))  # [B, C]
    terms = token_loss(logps, batch["advantages"], old_logps=batch.get("old_logps"), ref_logps=batch.get("ref_logps"),
                       beta=g.beta if g.kl_penalty == "loss" else 0.0, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                       delta=g.delta, kl_bias_correction=g.kl_bias_correction, mask=mask,
                       importance_sampling_level=g.importance_sampling_level)
    loss = get_grpo_loss(g.loss_type).reduce(terms.loss, mask, num_tokens.float(), g.max_completion_length)

    def mean(x):
        return torch.where(mask.bool(), x.detach().float(), 0).sum() / metric_tokens

    low, high = terms.low_clipped.float(), terms.high_clipped.float()
    out = {"loss": loss, "entropy": mean(token_entropy(logits)), "clip_ratio/low_mean": mean(low),
           "clip_ratio/high_mean": mean(high), "clip_ratio/region_mean": mean(torch.maximum(low, high))}
    if terms.kl is not None:
        out["kl"] = mean(terms.kl)
    return out


def completion_labels(batch) -> torch.Tensor:
    """[B, C] the completion tokens to score, -100 on padding."""
    return batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)


class _Indexed:
    """The prompt collator, plus each prompt's index into the trainer's records (-1: a padding row)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        return {**self.inner(examples), "index": torch.tensor([ex["index"] for ex in examples])}


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(2, n + 1) if n % d == 0), key=lambda d: abs(d - k), default=n)
