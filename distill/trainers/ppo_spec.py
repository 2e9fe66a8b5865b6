"""PPO's recipe: its `ppo:` section and the declared recipe class of `trainer: ppo`."""
from __future__ import annotations

from pydantic import Field, field_validator

from distill.config.schema import RecipeBase, Role
from distill.losses.ppo import get_kl_estimator
from distill.rl.spec import RolloutSpec


class PPOSpec(RolloutSpec):
    """The rollout (`RolloutSpec`'s keys, as grpo's), then PPO's: minibatches, the KL penalty, GAE and the clips."""

    num_generations: int = Field(1, ge=1)
    """Completions sampled per prompt of a rollout (PPO needs no group: 1, as TRL's PPOTrainer; OpenRLHF's
    n_samples_per_prompt)."""
    num_minibatches: int = Field(1, ge=1)
    """Optimizer steps per pass over a rollout: a rollout holds num_minibatches x train.micro_batch_size x
    train.grad_accum completions per rank."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout (its rows reshuffled each pass); a rollout serves ppo_epochs x num_minibatches
    optimizer steps of the actor and the critic."""
    kl_coef: float = Field(0.05, ge=0)
    """Coefficient of the per-token KL penalty in the reward: r_t = -kl_coef x KL_t, plus the score on the last token.
    0 builds no reference."""
    kl_estimator: str = "k1"
    """The per-token KL of the penalty, by registered name (distill/losses/ppo.py): k1 (log pi - log pi_ref, the PPO-RLHF
    papers' and OpenRLHF's default), k2, k3."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount of GAE."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE's lambda: 1 makes an advantage the Monte Carlo return less the value, 0 the one-step TD error."""
    whiten_advantages: bool = True
    """Normalise the advantages by the mean and std of every valid token of the rollout on all ranks."""
    clip_eps: float = Field(0.2, gt=0, lt=1)
    """Clip the probability ratio to [1 - clip_eps, 1 + clip_eps_high] in the policy loss."""
    clip_eps_high: float | None = Field(None, gt=0)
    """Upper clip (DAPO's clip-higher); default clip_eps."""
    value_clip: float | None = Field(0.2, gt=0)
    """Keep the new value within value_clip of the rollout's in the clipped term of the value loss; null: plain
    squared error."""

    @field_validator("kl_estimator")
    @classmethod
    def _known_estimator(cls, v: str) -> str:
        get_kl_estimator(v)
        return v


class PPORecipe(RecipeBase):
    """A `trainer: ppo` recipe."""

    actor: Role
    """The policy: generates the rollouts and learns from their advantages (ZeRO-2 by default)."""
    critic: Role
    """The value model: one value per token (`token_classification`, a one-output head), its own optimizer and
    learning rate; starts from the actor's weights (`weights_from: actor`) or from a reward model's
    (`critic.from_pretrained`)."""
    reference: Role
    """The frozen model of the KL penalty: the actor's weights at the start (`weights_from: actor`), ZeRO-3;
    loaded only when `ppo.kl_coef` is not 0."""
    reward: Role
    """A frozen sequence classifier whose logit scores prompt + completion (e.g. a `trainer: reward` run's
    `final/reward`); loaded only when it names a model."""
    ppo: PPOSpec = PPOSpec()
    """The rollout (as grpo's keys), GAE, the KL penalty in the reward, minibatches and the clipped losses."""
