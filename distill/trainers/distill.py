"""Offline logit distillation: a trainable student learns from a frozen teacher's distributions."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from pydantic import Field, field_validator, model_validator

from distill.losses import cross_entropy, get_kd_loss
from distill.losses.chunked import chunked_kd_loss
from distill.recipe import RecipeError, Role, Section
from distill.trainer import RoleTrainer, before_after_table
from distill.trainers import register_trainer


class KDSpec(Section):
    loss: str = "forward_kl"
    """The divergence, by registered name: forward_kl, reverse_kl, generalized_jsd, skew_forward_kl, skew_reverse_kl, tvd."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the cross-entropy on the labels: loss = alpha * CE + (1 - alpha) * KD."""
    temperature: float = Field(1.0, gt=0)
    """Softens both distributions; the KD term is scaled by temperature**2."""
    top_k: int | None = Field(None, ge=1)
    """Keep only the teacher's top-k probabilities, renormalised."""
    params: dict[str, Any] = {}
    """Parameters of the chosen divergence, e.g. {beta: 0.5} for generalized_jsd, {alpha: 0.1} for the skew KLs."""
    chunked: bool = False
    """Compute the loss chunk by chunk over tokens from hidden states, never holding [tokens, vocab] logits."""
    chunk_size: int = Field(2048, ge=1)
    """Tokens per chunk of the chunked loss."""

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        get_kd_loss(v)  # raises with the registered names and the nearest one
        return v

    @model_validator(mode="after")
    def _params_fit_the_loss(self) -> "KDSpec":
        # One call on a 1-token, 2-word input: a misspelled or out-of-range parameter fails now,
        # not on the first step after the models are loaded.
        x = torch.zeros(1, 2)
        try:
            get_kd_loss(self.loss)(x, x, torch.zeros(1, dtype=torch.long), temperature=self.temperature, **self.params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"`kd.params` {self.params} do not fit `kd.loss: {self.loss}`: {e}") from None
        return self


@contextlib.contextmanager
def last_hidden(model: torch.nn.Module) -> Iterator[dict]:
    """Captures the decoder's final (normalised) hidden states [B, T, H] of forwards inside the block."""
    box: dict = {}

    def hook(module, args, output):
        box["value"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = model.get_decoder().register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@register_trainer
class DistillTrainer(RoleTrainer):
    name = "distill"
    roles = {
        "student": Role(trainable=True, deepspeed="zero2"),
        "teacher": Role(trainable=False, deepspeed="zero3"),
    }
    sections = {"kd": KDSpec}

    @classmethod
    def check_plans(cls, recipe, plans) -> None:
        if not recipe.kd.chunked:
            return
        for name, plan in plans.items():
            cfg = plan.model_config
            # The chunked loss computes logits as hidden @ lm_head.T; transforms applied after that are not reproduced.
            for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
                if getattr(cfg, attr, None) not in (None, 1, 1.0):
                    raise RecipeError(f"`kd.chunked: true` cannot reproduce `{name}`'s {attr}={getattr(cfg, attr)}: set `kd.chunked: false`")

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.kd.chunked and recipe.student.zero_stage == 3:
            # The chunked loss needs the student's whole lm_head weight with a gradient; a gathered
            # ZeRO-3 parameter does not carry one back to its shards.
            raise RecipeError("`kd.chunked: true` needs the student at ZeRO-0/1/2: set `student.deepspeed: zero2` or `kd.chunked: false`")
        lora = recipe.student.lora
        if recipe.kd.chunked and lora is not None and isinstance(lora.target_modules, list) and "lm_head" in lora.target_modules:
            # The chunked loss multiplies by the lm_head weight itself; an adapter on it would be skipped.
            raise RecipeError("`kd.chunked: true` reads the student's lm_head weight directly, so it cannot train a LoRA "
                              "adapter on it: drop lm_head from `student.lora.target_modules` or set `kd.chunked: false`")

    def loss_step(self, batch, num_tokens):
        kd = self.recipe.kd
        if kd.chunked:
            return self._chunked_loss_step(batch, num_tokens)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits  # [B, T, V_t]
        logits = self.student(**inputs).logits  # [B, T, V_s]
        ce = cross_entropy(logits, batch["labels"], num_valid_tokens=num_tokens)
        div = get_kd_loss(kd.loss)(logits, teacher_logits, batch["labels"], temperature=kd.temperature, top_k=kd.top_k,
                                   num_valid_tokens=num_tokens, **kd.params)
        return {"loss": kd.alpha * ce + (1 - kd.alpha) * div, "ce": ce, "kd": div}

    def _chunked_loss_step(self, batch, num_tokens):
        kd = self.recipe.kd
        # logits_to_keep=1: the models compute logits for one position only; the loss takes the rest
        # from the hidden states, one chunk of tokens at a time.
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": 1}
        with last_hidden(self.teacher.module) as t_hidden, torch.no_grad():
            self.teacher(**inputs)
        with last_hidden(self.student.module) as s_hidden:
            self.student(**inputs)
        t_head = self.teacher.module.get_output_embeddings().weight
        s_head = self.student.module.get_output_embeddings().weight
        # One gather of the teacher's head per micro-batch, on every rank, whatever its token count.
        with self.teacher.gathered([t_head]):
            total, parts = chunked_kd_loss(s_hidden["value"], s_head, t_hidden["value"], t_head.detach(), batch["labels"],
                                           loss=kd.loss, alpha_ce=kd.alpha, chunk_size=kd.chunk_size,
                                           num_valid_tokens=num_tokens, temperature=kd.temperature, top_k=kd.top_k,
                                           loss_kwargs=kd.params)
        return {"loss": total, **parts}

    @torch.no_grad()
    def eval_step(self, batch):
        """Sums over valid tokens: student CE, teacher CE, KL(teacher || student) and the training divergence."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels, one = batch["labels"], torch.ones((), device=batch["labels"].device)
        teacher_logits = self.teacher(**inputs).logits
        logits = self.student(**inputs).logits
        kd = self.recipe.kd
        return {
            "ce": cross_entropy(logits, labels, num_valid_tokens=one),
            "teacher_ce": cross_entropy(teacher_logits, labels, num_valid_tokens=one),
            "kl_to_teacher": get_kd_loss("forward_kl")(logits, teacher_logits, labels, num_valid_tokens=one),
            "kd": get_kd_loss(kd.loss)(logits, teacher_logits, labels, temperature=kd.temperature, top_k=kd.top_k,
                                       num_valid_tokens=one, **kd.params),
            "tokens": self.count_tokens(batch),
        }

    def report(self, history):
        if "before" in history:
            self.log(before_after_table(history, [("student eval CE (nats/token)", "ce"),
                                                  ("student KL(teacher || student)", "kl_to_teacher"),
                                                  ("teacher eval CE (nats/token)", "teacher_ce")]))
