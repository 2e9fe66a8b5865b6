"""Language-model training of a single role: how the project trains its own teacher."""
from __future__ import annotations

from distill.losses import cross_entropy
from distill.recipe import Role
from distill.trainer import RoleTrainer
from distill.trainers import register_trainer


@register_trainer
class LMTrainer(RoleTrainer):
    name = "lm"
    roles = {"model": Role(trainable=True, deepspeed=2)}

    def loss_step(self, batch, num_tokens):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = cross_entropy(logits, batch["labels"], num_valid_tokens=num_tokens)
        return {"loss": ce}
