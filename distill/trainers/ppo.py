"""PPO with four roles: a trainable actor and critic, a frozen reference and reward (Ouyang et al. 2022, as OpenRLHF).

Each rollout samples `num_generations` completions of the rollout's prompts from the actor and scores them with
the reward functions and/or the `reward` role: GRPO's rollout and scoring (distill/trainers/grpo.py), shared, not
copied. Then, once per rollout and without gradients: the actor's and the reference's log-probs and the critic's
values of every completion token; per-token rewards, `-kl_coef` times the KL estimate with the score added on the
last token; GAE advantages and returns; advantages whitened over every valid token of the rollout on all ranks
(distill/losses/ppo.py). The shared loop then takes `ppo_epochs` x `num_minibatches` optimizer steps on the
rollout, each on one minibatch (`train.micro_batch_size` x `train.grad_accum` completions per rank), the rows
reshuffled each epoch: the actor's clipped surrogate and the critic's clipped value loss, each its own role's
`<role>/loss`, summed over valid tokens and divided by the minibatch's valid tokens on all ranks.
"""
from __future__ import annotations

import random

import torch

from distill.config.errors import RecipeError
from distill.config.schema import Role
from distill.generation.completions import generation_plan
from distill.loop.registry import register_trainer
from distill.losses.logps import token_entropy, token_logps
from distill.losses.ppo import gae, masked_whiten, policy_loss, shaped_rewards, token_kl, value_loss
from distill.rl.batch import split_rows
from distill.rl.reward_model import RewardModelScorer, check_reward_recipe, reward_model_given
from distill.rl.rewards import weighted_reward
from distill.trainers.grpo import GRPOTrainer, completion_labels, completion_logits, completion_logps
from distill.trainers.grpo_spec import sampling_spec
from distill.trainers.ppo_spec import PPORecipe, PPOSpec


@register_trainer
class PPOTrainer(GRPOTrainer):
    name = "ppo"
    roles = {
        "actor": Role(trainable=True, deepspeed="zero2"),
        "critic": Role(trainable=True, deepspeed="zero2", model_class="token_classification", weights_from="actor"),
        "reference": Role(deepspeed="zero3", weights_from="actor"),
        "reward": Role(deepspeed="zero3", model_class="sequence_classification"),
    }
    sections = {"ppo": PPOSpec}
    recipe_class = PPORecipe
    rollout_section = "ppo"

    def __init__(self, recipe, **kwargs):
        self.experience: dict | None = None
        """The current rollout with its `old_logps`, `old_values`, `advantages` and `returns` (`make_experience`): its
        minibatches train the next ppo_epochs x num_minibatches steps."""
        self.rollout_sums: list[torch.Tensor] = []
        """Each rollout's statistics since the last metrics line, summed over ranks (`_record_rollout` appends them,
        `step_metrics` reads and clears them)."""
        super().__init__(recipe, **kwargs)

    @property
    def policy(self):
        """The role that samples the rollout (GRPO's rollout reads `policy`)."""
        return self.actor

    # -- the recipe --------------------------------------------------------------------------------
    @classmethod
    def built_roles(cls, recipe) -> list[str]:
        out = ["actor", "critic"] + (["reference"] if recipe.ppo.kl_coef != 0 else [])
        if reward_model_given(recipe):
            out.append("reward")
        return out

    @classmethod
    def check_recipe(cls, recipe) -> None:
        p, t = recipe.ppo, recipe.train
        check_reward_recipe(recipe, "ppo", "PPO")
        if recipe.critic.model_class != "token_classification":
            raise RecipeError("`critic.model_class` must be `token_classification`: the critic gives one value per token "
                              "(a causal LM's or a reward model's weights load into one, with a one-output head): remove the key")
        if recipe.critic.lora is not None:
            raise RecipeError("`critic.lora`: the critic trains whole (a LoRA adapter would leave its new value head frozen): "
                              "remove `critic.lora`")
        per_step = t.micro_batch_size * t.grad_accum
        if (per_step * p.num_minibatches) % p.num_generations:
            raise RecipeError(f"`ppo.num_generations: {p.num_generations}` must divide the completions of one rollout on each "
                              f"rank, ppo.num_minibatches x train.micro_batch_size x train.grad_accum = {p.num_minibatches} x "
                              f"{t.micro_batch_size} x {t.grad_accum}: change one of them")
        if p.max_completion_length >= recipe.data.max_length:
            raise RecipeError(f"`ppo.max_completion_length: {p.max_completion_length}` leaves no room for the prompt in "
                              f"`data.max_length: {recipe.data.max_length}`: raise data.max_length or lower it")

    @classmethod
    def check_plans(cls, recipe, plans) -> None:
        """The critic has one output per token and no dropout on it (a value must not change between the rollout and
        the update); the reward model can score the actor's completions."""
        if "reward" in plans:
            RewardModelScorer.check(recipe, plans, policy="actor")
        cfg, spec = plans["critic"].model_config, recipe.critic
        given = spec.config.get("num_labels") if spec.config is not None else None
        if given not in (None, 1):
            raise RecipeError(f"`critic.config.num_labels: {given}`: the critic has one value per token: set num_labels: 1 "
                              "or remove it")
        cfg.num_labels = 1
        if spec.config is None or "classifier_dropout" not in spec.config:
            cfg.classifier_dropout = 0.0  # transformers' token classifiers default to 0.1

    @classmethod
    def plan_notes(cls, recipe, plans, world_size: int) -> list[str]:
        return generation_plan(recipe, plans, world_size, sampling_spec(recipe.ppo), ["actor"])

    def rollout_layout(self) -> tuple[int, int]:
        t, p = self.recipe.train, self.recipe.ppo
        return p.num_minibatches * t.micro_batch_size * t.grad_accum, p.ppo_epochs * p.num_minibatches

    # -- a rollout, then its minibatches -------------------------------------------------------------
    def prepare_step(self, step, micro_batches):
        """Roll out and score once per ppo_epochs x num_minibatches steps (every rank together: the reference and
        reward may be ZeRO-3); each step trains on one minibatch of it, as `train.grad_accum` micro-batches holding
        their rows' ids and masks, `old_logps`, `old_values`, `advantages` and `returns` [B, C]."""
        p = self.recipe.ppo
        k = (step - 1) % (p.ppo_epochs * p.num_minibatches)
        first = step - k  # the rollout's first step: its seed, so a resumed run rolls out its prompts alike
        if self.experience is None or k == 0:
            self.experience = self.make_experience(micro_batches[0], seed=self.rollout_seed(first))
        epoch, part = divmod(k, p.num_minibatches)
        rows = list(range(self.experience["loss_mask"].shape[0]))
        if epoch:  # rollout rows are in sampling order; later passes draw the minibatches afresh
            random.Random(hash((self.recipe.seed, first, epoch))).shuffle(rows)
        size = len(rows) // p.num_minibatches
        picked = rows[part * size:(part + 1) * size]  # a list: choosing rows reads nothing back from the device
        mini = {key: v[torch.tensor(picked, device=v.device)] if torch.is_tensor(v) and v.dim() > 0 else
                [v[i] for i in picked] if isinstance(v, list) else v for key, v in self.experience.items()}
        return split_rows(mini, self.recipe.train.grad_accum)

    @torch.no_grad()
    def make_experience(self, prompts: dict, *, seed: int) -> dict:
        """One rollout on this rank: GRPO's sampling and scoring, then the actor's, reference's and critic's
        forwards in micro-batches, the KL-shaped rewards, GAE and the whitened advantages (all ranks' tokens)."""
        p, t = self.recipe.ppo, self.recipe.train
        batch = self.sample_rollout(prompts, seed)
        per_function = self._rewards(batch)  # [N, F]
        scores = weighted_reward(per_function, self._reward_weights.to(per_function.device))  # [N]: NaN unscored
        scored = ~torch.isnan(scores) & batch["real"].bool()
        mask = batch["loss_mask"] * scored[:, None]  # [N, C]: a padding row or an unscored one trains nothing
        chunks = split_rows({**batch, "loss_mask": mask}, batch["input_ids"].shape[0] // t.micro_batch_size)
        old = torch.cat([completion_logps(self.actor, mb, p.temperature) for mb in chunks])  # [N, C]
        values = torch.cat([critic_values(self.critic, mb) for mb in chunks])  # [N, C]
        if "reference" in self.models:
            ref = torch.cat([completion_logps(self.reference, mb, p.temperature) for mb in chunks])
            kl = token_kl(old, ref, mask, p.kl_estimator)  # [N, C]
        else:
            kl = torch.zeros_like(old)
        rewards = shaped_rewards(torch.nan_to_num(scores, nan=0.0), kl, mask, p.kl_coef)  # [N, C]
        adv, returns = gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = masked_whiten(adv, mask, all_reduce=self._sum)
        self._record_rollout(batch, mask, per_function, scores, kl, values, returns)
        return {**batch, "loss_mask": mask, "old_logps": old, "old_values": values, "advantages": adv, "returns": returns}

    def _record_rollout(self, batch, mask, per_function, scores, kl, values, returns) -> None:
        """The rollout's statistics on all ranks, in one all-reduce kept on the device until the metrics line reads it."""
        m, real = mask.bool(), batch["real"].bool()
        scored = ~torch.isnan(scores) & real
        residual = returns - values
        where = lambda x: torch.where(m, x, torch.zeros_like(x))  # noqa: E731
        parts = [torch.where(scored, scores, 0).sum(), scored.sum(), where(kl).sum(), m.sum(),
                 (batch["completion_mask"].sum(1) * real).sum(), real.sum(), (batch["truncated"] & real).sum(),
                 where(values).sum(), where(returns).sum(), where(returns ** 2).sum(), where(residual).sum(),
                 where(residual ** 2).sum()]
        f = per_function[real]
        sums = torch.cat([torch.stack([x.float() for x in parts]), torch.nansum(f, 0).float(), (~torch.isnan(f)).sum(0).float()])
        self.rollout_sums.append(self._sum(sums.to(self.device)))

    # -- the loss ----------------------------------------------------------------------------------
    def count_tokens(self, batch):
        return batch["loss_mask"].sum()

    def loss_step(self, batch, num_tokens):
        return ppo_loss_step(self.actor, self.critic, batch, num_tokens, self.recipe.ppo)

    def step_metrics(self):
        """Each rollout's statistics since the last line, averaged over rollouts: reward, KL per token, lengths, the
        critic's value mean and explained variance (1 - Var(returns - values) / Var(returns), valid tokens)."""
        stats, out = self.rollout_sums, {}
        self.rollout_sums = []
        names = self._reward_names
        for s in (x.tolist() for x in stats):
            n = max(s[3], 1)
            var_ret = s[9] / n - (s[8] / n) ** 2
            var_res = s[11] / n - (s[10] / n) ** 2
            row = {"reward": s[0] / max(s[1], 1), "kl": s[2] / n, "completions/mean_length": s[4] / max(s[5], 1),
                   "completions/clipped_ratio": s[6] / max(s[5], 1), "value/mean": s[7] / n,
                   "value/explained_variance": 1 - var_res / var_ret if var_ret > 0 else 0.0,
                   **{f"rewards/{name}": s[12 + i] / max(s[12 + len(names) + i], 1) for i, name in enumerate(names)}}
            for key, v in row.items():
                out[key] = out.get(key, 0.0) + v / len(stats)
        return {**out, **self.sampler.metrics()}


def critic_values(model, batch: dict) -> torch.Tensor:
    """[B, C] fp32: the critic's value of the state before each completion token (prompt | completion rows: input_ids,
    attention_mask [B, P + C], completion_ids [B, C]): its output at the column that predicts the token."""
    c = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, P + C, 1]
    return out[:, -c - 1:-1, 0].float()


def ppo_loss_step(actor, critic, batch: dict, num_tokens: torch.Tensor, p: PPOSpec) -> dict[str, torch.Tensor]:
    """The actor's and the critic's losses of one micro-batch (`loss_mask`, `old_logps`, `advantages`, `old_values`,
    `returns` [B, C]), each a sum over its valid tokens divided by `num_tokens` (the minibatch's on all ranks), and
    metrics on the same scale: clip fractions, the policy's entropy and approximate KL to the rollout's actor."""
    mask = batch["loss_mask"]  # [B, C]
    n = num_tokens.clamp(min=1)
    logits = completion_logits(actor, batch, p.temperature)  # [B, C, V]
    logps = token_logps(logits, completion_labels(batch))  # [B, C]
    pol = policy_loss(logps, batch["old_logps"], batch["advantages"], mask, n, clip_eps=p.clip_eps,
                      clip_eps_high=p.clip_eps_high)
    values = critic_values(critic, batch)  # [B, C]
    val = value_loss(values, batch["old_values"], batch["returns"], mask, n, clip=p.value_clip)

    def mean(x):
        return torch.where(mask.bool(), x.detach().float(), 0).sum() / n

    log_ratio = logps.detach() - batch["old_logps"]
    return {"actor/loss": pol.loss, "critic/loss": val.loss, "policy/clip_frac": mean(pol.clipped.float()),
            "value/clip_frac": mean(val.clipped.float()), "policy/approx_kl": mean(0.5 * log_ratio ** 2),
            "entropy": mean(token_entropy(logits))}
