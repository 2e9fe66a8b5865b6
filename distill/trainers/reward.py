"""Reward modelling: a sequence classifier trained on preference pairs, the reward role of GRPO.

The same loop as every trainer; what differs is the one role (`reward`, a trainable sequence classifier with
one output), the data (DPO's preference pairs: prompt + chosen and prompt + rejected in one forward) and the
loss step: the Bradley-Terry loss of the two scores (distill/losses/reward.py), with an optional margin column
and TRL's reward-centering term. Its saved model (`final/reward/`, the tokenizer beside it, `pad_token_id` in
its config) is what GRPO's `reward.from_pretrained` loads.
"""
from __future__ import annotations

import torch
from pydantic import Field, field_validator

from distill.config.errors import RecipeError
from distill.config.schema import RecipeBase, Role, Section
from distill.data.loading import DataBundle, pad_id
from distill.data.preference import build_preference_data, write_preference_dataset
from distill.loop.monitor import before_after_table
from distill.loop.registry import register_trainer
from distill.loop.trainer import RoleTrainer
from distill.losses.reward import centering, get_reward_loss
from distill.models.build import class_of_saved


class RewardSpec(Section):
    loss: str = "bradley_terry"
    """The pairwise loss of the two scores, by registered name (distill/losses/reward.py): bradley_terry."""
    margin_column: str | None = None
    """A numeric column of the preference records: each pair's margin m, in -log sigmoid(r_chosen - r_rejected - m)
    (Llama 2's margin loss). null: no margin. TRL uses a column named `margin` whenever the data has one; here it
    is named."""
    center_rewards_coefficient: float | None = Field(None, ge=0)
    """Add this times the mean over pairs of (r_chosen + r_rejected)^2 to the loss, pulling the scores towards mean 0
    (Eisenstein et al. 2023; TRL's key, e.g. 0.01). null: off."""
    max_prompt_length: int | None = Field(None, ge=1)
    """Prompt tokens kept (from the end) when a prompt is too long; default half of data.max_length."""

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        get_reward_loss(v)
        return v


class RewardRecipe(RecipeBase):
    """A `trainer: reward` recipe."""

    reward: Role
    """The reward model in training: a sequence classifier with one output (ZeRO-2 by default)."""
    rm: RewardSpec = RewardSpec()
    """The pairwise loss and its reward-centering term."""


@register_trainer
class RewardTrainer(RoleTrainer):
    name = "reward"
    roles = {"reward": Role(trainable=True, deepspeed="zero2", model_class="sequence_classification")}
    sections = {"rm": RewardSpec}
    recipe_class = RewardRecipe

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.reward.model_class != "sequence_classification":
            raise RecipeError("`reward.model_class` must be `sequence_classification`: a reward model gives one score per "
                              "sequence (a causal LM's weights load into one, with a new score head): remove the key")
        if recipe.reward.lora is not None:
            # distill's adapters are a causal LM's (peft's CAUSAL_LM task): the new score head would stay frozen at random.
            raise RecipeError("`reward.lora`: a reward model trains whole here (a LoRA adapter would leave its new score "
                              "head frozen): remove `reward.lora`")

    @classmethod
    def check_plans(cls, recipe, plans) -> None:
        """One score per sequence. A causal LM's checkpoint (or a config without `num_labels`) gets a new head of one
        output, as TRL's RewardTrainer makes it; a classifier that already has another number of outputs is refused."""
        plan, spec = plans["reward"], recipe.reward
        cfg = plan.model_config
        if spec.config is not None:
            given = spec.config.get("num_labels")
        else:
            given = cfg.num_labels if class_of_saved(cfg).__name__ == "AutoModelForSequenceClassification" else None
        if given not in (None, 1):
            where = "`reward.config.num_labels`" if spec.config is not None else f"{spec.from_pretrained}/config.json"
            raise RecipeError(f"{where} gives the reward model {given} outputs; a reward model has one score per sequence: "
                              "set num_labels: 1 (or start from a causal LM's checkpoint, which gets a new one-output head)")
        cfg.num_labels = 1

    @classmethod
    def write_synthetic(cls, out_dir, seed: int, recipe=None) -> None:
        write_preference_dataset(out_dir, seed=seed)

    def load_model(self, plan):
        # The classifier reads the score at the last token that is not padding: it must know the collator's padding,
        # and the saved config carries it to GRPO's reward role.
        plan.model_config.pad_token_id = pad_id(self.tokenizer)
        return super().load_model(plan)

    def build_data(self) -> DataBundle:
        spec = self.recipe.rm
        return build_preference_data(self.recipe, self.tokenizer, self.rank, self.world_size, compiled=self.compiled,
                                     max_prompt_length=spec.max_prompt_length, log=self.log,
                                     columns=(spec.margin_column,) if spec.margin_column else ())

    # -- the algorithm -------------------------------------------------------------------------
    def count_tokens(self, batch):
        """Pairs: a pair counts when it has response tokens (the padding pairs of evaluation do not)."""
        return valid_pairs(batch).sum()

    def loss_step(self, batch, num_tokens):
        return reward_loss_step(self.reward, batch, num_tokens, self.recipe.rm)

    def log_samples(self, step: int) -> None:
        """A sequence classifier writes no text: no generation samples."""

    def report(self, history):
        if "before" in history:
            self.log(before_after_table(history, [("eval accuracy", "accuracy"), ("eval margin", "margin"),
                                                  ("eval loss", "loss")]))


def valid_pairs(batch) -> torch.Tensor:
    """[B] bool: the pairs of a batch of chosen rows then rejected rows that have response tokens."""
    half = batch["labels"].shape[0] // 2
    return (batch["labels"][:half] != -100).any(-1)


def reward_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) scores, fp32: logit 0 of the classifier, one forward over the 2B rows."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()  # [2B]
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def reward_loss_step(model, batch: dict, num_pairs: torch.Tensor, spec: RewardSpec) -> dict[str, torch.Tensor]:
    """The reward loss of one micro-batch (chosen rows then rejected rows) and its metrics, each a sum over the
    micro-batch's real pairs divided by `num_pairs` (the step's, on all ranks)."""
    chosen, rejected = reward_scores(model, batch)
    margin = batch[spec.margin_column] if spec.margin_column else None
    losses = get_reward_loss(spec.loss)(chosen, rejected, margin=margin)  # [B]
    if spec.center_rewards_coefficient:
        losses = losses + spec.center_rewards_coefficient * centering(chosen, rejected)
    valid = valid_pairs(batch)

    def mean(x):  # where, not a multiply: a padding pair's NaN must not reach the sum
        return torch.where(valid, x, torch.zeros_like(x)).sum() / num_pairs

    c, r = chosen.detach(), rejected.detach()
    return {"loss": mean(losses), "accuracy": mean((c > r).float()), "margin": mean(c - r),
            "rewards/chosen": mean(c), "rewards/rejected": mean(r)}
