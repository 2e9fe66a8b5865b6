"""GRPO's recipe: its `grpo:` section and the declared recipe class of `trainer: grpo`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.config.schema import RecipeBase, Role
from distill.generation.completions import OnPolicySpec
from distill.losses.advantages import get_advantage
from distill.losses.grpo import get_grpo_loss, get_importance_level
from distill.rl.spec import RolloutSpec


class GRPOSpec(RolloutSpec):
    """The rollout (`RolloutSpec`'s keys), then GRPO's: groups, advantages, ratios, the KL term and the clipped loss."""

    num_generations: int = Field(8, ge=2)
    """Completions sampled per prompt (a group); must divide train.micro_batch_size x train.grad_accum."""
    advantage: str = "group"
    """How advantages come from the rewards, by registered name (distill/losses/advantages.py): `group` (GRPO: against
    the group's mean), `rloo` (against the mean of the prompt's other completions; TRL's RLOOTrainer), `reinforce_pp`
    (REINFORCE++: normalised by the mean and std of the whole step's rewards on all ranks)."""
    scale_rewards: Literal["group", "batch", "none"] | None = None
    """Divide advantages by the std of the group's rewards (`group`), of the whole step's on all ranks (`batch`; with
    `rloo`, TRL's normalize_advantages), or not at all (`none`, Dr. GRPO). null: the estimator's own: `group` for
    `group`, `none` for `rloo`, `batch` for `reinforce_pp` (its only one)."""
    importance_sampling_level: str = "token"
    """The probability ratio of the clipped surrogate, by registered name: `token` (one per token: GRPO, PPO),
    `sequence` (one per completion, the geometric mean of its tokens' ratios: GSPO, TRL's
    importance_sampling_level="sequence"), `sequence_sum` (one per completion, of its whole probability: TRL's RLOOTrainer)."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """Where `beta`'s KL to the reference enters: `loss`, beta x k3 on every token of the loss (GRPO); `reward`, beta x
    sum over the completion's tokens of log pi_old - log pi_ref subtracted from its reward before the advantage
    (RLOO, as TRL's RLOOTrainer)."""
    loss_type: str = "dapo"
    """How token losses are aggregated, by registered name: grpo, bnpo, dr_grpo, dapo (see docs/grpo-trainer.md)."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """Clip the probability ratio below at 1 - epsilon (and above at 1 + epsilon unless epsilon_high is set)."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); default epsilon."""
    delta: float | None = Field(None, gt=1)
    """Also cap the ratio at delta where the clipped term would not (INTELLECT-2's two-sided clip); null: off."""
    beta: float = Field(0.0, ge=0)
    """Coefficient of the KL to the reference (k3 estimator); 0 builds no reference."""
    kl_bias_correction: bool = True
    """Weight the KL term by the probability ratio (TRL's use_bias_correction_kl, its default)."""
    reference: Literal["model", "policy_without_adapter"] = "model"
    """With beta > 0: the `reference` role, or the LoRA policy with its adapter disabled (no second model)."""
    num_iterations: int = Field(1, ge=1)
    """Optimizer steps on each generation batch; the log-probs of the policy that generated it are kept for the ratio."""

    @field_validator("loss_type")
    @classmethod
    def _known(cls, v: str) -> str:
        get_grpo_loss(v)
        return v

    @field_validator("advantage")
    @classmethod
    def _known_estimator(cls, v: str) -> str:
        get_advantage(v)
        return v

    @field_validator("importance_sampling_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        get_importance_level(v)
        return v

    @model_validator(mode="after")
    def _scaling(self) -> "GRPOSpec":
        takes = get_advantage(self.advantage).scalings
        if self.scale_rewards is None:
            self.scale_rewards = takes[0]
        elif self.scale_rewards not in takes:
            raise ValueError(f"`scale_rewards: {self.scale_rewards}` does not apply to `advantage: {self.advantage}`, which "
                             f"takes {' or '.join(takes)}: set one of them, or remove scale_rewards for its default ({takes[0]})")
        return self


class GRPORecipe(RecipeBase):
    """A `trainer: grpo` recipe."""

    policy: Role
    """The model that generates completions and learns from their rewards (ZeRO-2 by default)."""
    reference: Role
    """The frozen model of the KL term: the policy's weights at the start (`weights_from: policy`), ZeRO-3;
    loaded only when `grpo.beta` is not 0 and `grpo.reference` is `model`."""
    reward: Role
    """A frozen sequence classifier whose logit scores prompt + completion; loaded only when it names a model
    (`reward.from_pretrained` or `reward.config`)."""
    grpo: GRPOSpec = GRPOSpec()
    """Sampling, rewards, advantages, the clipped loss and its KL term."""


def sampling_spec(g: GRPOSpec) -> OnPolicySpec:
    """The policy's sampling settings, in the on-policy sampler's terms."""
    return OnPolicySpec(max_new_tokens=g.max_completion_length, temperature=g.temperature, top_p=g.top_p,
                        generation_batch_size=g.generation_batch_size, decode=g.decode)
