"""Language-model training of a single role: how the project trains its own teacher."""
from __future__ import annotations

from distill.config.schema import RecipeBase, Role
from distill.data.packing import model_inputs
from distill.loop.monitor import before_after_table
from distill.loop.registry import register_trainer
from distill.loop.trainer import RoleTrainer
from distill.losses import cross_entropy


class LMRecipe(RecipeBase):
    """A `trainer: lm` recipe."""

    model: Role
    """The language model trained on the text's next tokens (ZeRO-2 by default)."""


@register_trainer
class LMTrainer(RoleTrainer):
    name = "lm"
    roles = {"model": Role(trainable=True, deepspeed=2)}
    recipe_class = LMRecipe
    supports_packing = True

    def loss_step(self, batch, num_tokens):
        logits = self.model(**model_inputs(batch)).logits  # [B, T, V]
        ce = cross_entropy(logits, batch["labels"], num_valid_tokens=num_tokens)
        return {"loss": ce}

    def report(self, history):
        if "before" in history:
            self.log(before_after_table(history, [("eval CE (nats/token)", "loss")]))
