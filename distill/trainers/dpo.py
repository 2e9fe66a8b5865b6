"""Direct preference optimisation: a trainable policy against a frozen reference.

The same loop as every trainer; what differs is the roles (policy ZeRO-2, reference ZeRO-3 loaded
from the policy's weights unless the recipe says otherwise), the data (prompt, chosen, rejected;
both responses in one concatenated forward) and the loss step. With `dpo.precompute_reference`
the reference scores the whole dataset once before training and is then freed. With a LoRA policy
and `dpo.reference: policy_without_adapter` there is no reference model at all: the policy with its
adapter disabled is the reference (it is exactly the starting policy, since LoRA's B starts at 0).
"""
from __future__ import annotations

import gc
from typing import Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import save_file

from distill.config.errors import RecipeError
from distill.config.schema import RecipeBase, Role, Section
from distill.data.loading import DataBundle
from distill.data.preference import build_preference_data, write_preference_dataset
from distill.loop.monitor import before_after_table
from distill.loop.registry import register_trainer
from distill.loop.trainer import RoleTrainer
from distill.losses.logps import head_sequence_logps, logit_transform, sequence_logps
from distill.losses.preference import get_preference_loss, rewards


class DPOSpec(Section):
    loss: str = "sigmoid"
    """The preference loss, by registered name: sigmoid (DPO), ipo, hinge, robust."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL penalty towards the reference."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed probability that a preference label is flipped (cDPO / robust)."""
    reference: Literal["model", "policy_without_adapter"] = "model"
    """Where reference log-probs come from: `model`, the `reference` role (a second model); or
    `policy_without_adapter`, the LoRA policy with its adapter disabled (no second copy; needs `policy.lora`)."""
    precompute_reference: bool = False
    """Score the data with the reference once before training, cache it in the run directory, free the reference."""
    max_prompt_length: int | None = Field(None, ge=1)
    """Prompt tokens kept (from the end) when a prompt is too long; default half of data.max_length."""
    logps: Literal["auto", "chunked", "logits"] = "auto"
    """How sequence log-probs are taken: `chunked` applies the lm_head to the response tokens' hidden states
    chunk by chunk, never holding [tokens, vocab] logits; `logits` from the model's full logits; `auto`
    chunked unless the policy is ZeRO-3, has an adapter on lm_head, or a model transforms its logits."""

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        get_preference_loss(v)
        return v


class DPORecipe(RecipeBase):
    """A `trainer: dpo` recipe."""

    policy: Role
    """The model trained on the preference pairs (ZeRO-2 by default)."""
    reference: Role
    """The frozen model the policy's log-ratios are taken against: by default the policy's weights at the start
    (`weights_from: policy`), ZeRO-3; not loaded with `dpo.reference: policy_without_adapter`."""
    dpo: DPOSpec = DPOSpec()
    """The preference loss, its beta and how log-probs are taken."""


@register_trainer
class DPOTrainer(RoleTrainer):
    name = "dpo"
    roles = {
        "policy": Role(trainable=True, deepspeed="zero2"),
        "reference": Role(deepspeed="zero3", weights_from="policy"),
    }
    sections = {"dpo": DPOSpec}
    recipe_class = DPORecipe

    @classmethod
    def built_roles(cls, recipe) -> list[str]:
        return ["policy"] if recipe.dpo.reference == "policy_without_adapter" else ["policy", "reference"]

    @classmethod
    def check_plans(cls, recipe, plans) -> None:
        blocker = _head_logps_blocker(recipe, plans)
        if recipe.dpo.logps == "chunked" and blocker:
            raise RecipeError(f"`dpo.logps: chunked` is not possible here: {blocker}; set `dpo.logps: auto` or `logits`")

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.dpo.reference != "policy_without_adapter":
            return
        if recipe.policy.lora is None:
            raise RecipeError("`dpo.reference: policy_without_adapter` needs a LoRA policy: add `policy.lora: {r: 16}` "
                              "(or set `dpo.reference: model` for a separate reference model)")
        ref, pol = recipe.reference, recipe.policy
        if (ref.from_pretrained, ref.config) != (pol.from_pretrained, pol.config):
            raise RecipeError("`dpo.reference: policy_without_adapter` uses the policy's own base weights as the reference, "
                              "but `reference` names other weights: remove the `reference` block (or set `dpo.reference: model`)")

    # -- data ----------------------------------------------------------------------------------
    @classmethod
    def write_synthetic(cls, out_dir, seed: int, recipe=None) -> None:
        write_preference_dataset(out_dir, seed=seed)

    def build_data(self) -> DataBundle:
        return build_preference_data(self.recipe, self.tokenizer, self.rank, self.world_size, compiled=self.compiled,
                                     max_prompt_length=self.recipe.dpo.max_prompt_length, log=self.log)

    # -- the algorithm -------------------------------------------------------------------------
    def count_tokens(self, batch):
        """DPO normalises by pairs: a pair counts when it has response tokens (padding pairs do not)."""
        return self._valid_pairs(batch).sum()

    @staticmethod
    def _valid_pairs(batch) -> torch.Tensor:
        half = batch["labels"].shape[0] // 2
        return (batch["labels"][:half] != -100).any(-1)  # [B]

    reference_table: torch.Tensor | None = None
    """[pairs, 2] the reference's log-probs of every pair's chosen and rejected response, by the pair's index, once
    `dpo.precompute_reference` has scored the data (`train`); the batches then carry theirs as `ref_logps`."""

    def prepare_step(self, step, micro_batches):
        return [self._with_table(b) for b in micro_batches]

    def eval_step(self, batch):
        return super().eval_step(self._with_table(batch))

    def _with_table(self, batch: dict) -> dict:
        """`batch` with `ref_logps` [2B] (chosen rows, then rejected) from `reference_table`, when there is one."""
        if self.reference_table is None:
            return batch
        idx = batch["index"].clamp(min=0).cpu()  # padding pairs carry -1; their loss is masked
        return {**batch, "ref_logps": torch.cat([self.reference_table[idx, 0], self.reference_table[idx, 1]]).to(self.device)}

    def loss_step(self, batch, num_tokens):
        spec = self.recipe.dpo
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        if "ref_logps" in batch:
            ref = batch["ref_logps"]  # [2B]
            logps = self._logps(self.policy, inputs, labels)  # [2B]: chosen rows, then rejected
        else:
            ref_role = self.policy if spec.reference == "policy_without_adapter" else self.reference
            reference = lambda: self._reference_sequence_logps(inputs, labels)  # noqa: E731
            if self._chunked_logps():  # decided (and logged) here, not in the worker thread
                # Only the decoders side by side: the policy's head and backward, where its memory peaks,
                # then never share the GPU with the reference's forward (a lower peak at the same speed: docs/performance.md).
                ref, hidden = self.alongside(ref_role, reference, lambda: self.policy.last_hidden(**inputs))  # [2B], [2B, T, H]
                logps = self.head_logps(self.policy, hidden, labels)  # [2B]
            else:
                ref, logps = self.alongside(ref_role, reference, lambda: self._logps(self.policy, inputs, labels))
        half = logps.shape[0] // 2
        valid = self._valid_pairs(batch).float()  # [B]
        pc, pr, rc, rr = logps[:half], logps[half:], ref[:half], ref[half:]
        losses = get_preference_loss(spec.loss)(pc, pr, rc, rr, beta=spec.beta, label_smoothing=spec.label_smoothing)
        chosen_r, rejected_r = rewards(pc, rc, spec.beta), rewards(pr, rr, spec.beta)

        def mean(x):  # sum over this micro-batch's real pairs / pairs of the whole step on all ranks
            return (x * valid).sum() / num_tokens

        return {"loss": mean(losses), "rewards/chosen": mean(chosen_r), "rewards/rejected": mean(rejected_r),
                "rewards/accuracy": mean((chosen_r > rejected_r).float()), "rewards/margin": mean(chosen_r - rejected_r),
                "logps/chosen": mean(pc.detach()), "logps/rejected": mean(pr.detach())}

    def report(self, history):
        if "before" in history:
            self.log(before_after_table(history, [("eval reward accuracy", "rewards/accuracy"),
                                                  ("eval reward margin", "rewards/margin"),
                                                  ("eval DPO loss", "loss")]))

    # -- the reference -------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_sequence_logps(self, inputs, labels) -> torch.Tensor:
        """[N] log-probs of the reference: its own model, or the policy with the adapter off."""
        if self.recipe.dpo.reference == "policy_without_adapter":
            with self.policy.without_adapter():
                return self._logps(self.policy, inputs, labels)
        return self._logps(self.reference, inputs, labels)

    def _logps(self, role, inputs, labels) -> torch.Tensor:
        """[N] summed log-probs of the labels under `role`, from hidden states chunk by chunk or from logits."""
        if not self._chunked_logps():
            return sequence_logps(role(**inputs).logits, labels)
        return self.head_logps(role, role.last_hidden(**inputs), labels)  # [N, T, H] hidden states

    def head_logps(self, role, hidden, labels) -> torch.Tensor:
        """[N] summed log-probs of `labels` [N, T] from `role`'s hidden states [N, T, H] through its lm_head, chunk by
        chunk (the head gathered once under ZeRO-3; detached for a frozen role)."""
        head = role.module.get_output_embeddings().weight
        with role.gathered([head]):  # a sharded reference: its head once per micro-batch, on every rank
            return head_sequence_logps(hidden, head if role.trainable else head.detach(), labels)

    def _chunked_logps(self) -> bool:
        if "_chunked" not in self.__dict__:
            self._chunked = self.recipe.dpo.logps == "chunked" or (
                self.recipe.dpo.logps == "auto" and not _head_logps_blocker(self.recipe, self.plans))
            if self.rank == 0:
                self.log(f"dpo: log-probs {'from hidden states, chunk by chunk' if self._chunked else 'from full logits'} "
                         f"(dpo.logps: {self.recipe.dpo.logps})")
        return self._chunked

    def train(self):
        if self.recipe.dpo.precompute_reference:
            self._precompute_reference()
        return super().train()

    @torch.no_grad()
    def _precompute_reference(self) -> None:
        """Every rank scores its share of each split; the tables are gathered, saved, and the reference freed."""
        n = len(self.data.train) + (len(self.data.eval) if self.data.eval is not None else 0)
        rows = []
        for split in ("train", "eval"):
            if getattr(self.data, split) is None:
                continue
            for batch in self.data.eval_batches(split=split):
                batch = self.to_device(batch)
                ref = self._reference_sequence_logps({"input_ids": batch["input_ids"],
                                                      "attention_mask": batch["attention_mask"]}, batch["labels"])
                half = ref.shape[0] // 2
                rows.append(torch.stack([batch["index"].double(), ref[:half].double(), ref[half:].double()], -1))
        everyone = self.accelerator.gather(torch.cat(rows))  # [rows of all ranks, 3]: index, chosen, rejected
        keep = everyone[:, 0] >= 0  # padding pairs carry index -1
        table = torch.zeros(n, 2, dtype=torch.float32)
        table[everyone[keep, 0].long().cpu()] = everyone[keep, 1:].float().cpu()
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_file({"logps": table}, str(self.out / "reference_logps.safetensors"))
        self.reference_table = table
        if "reference" not in self.models:  # the policy without its adapter scored the pairs; nothing to free
            return
        ref = self.models.pop("reference")
        ref.engine.destroy()
        del self.reference, ref
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.accelerator.is_main_process:
            self.log("reference: log-probs precomputed for every pair; the reference role is freed")


def _head_logps_blocker(recipe, plans) -> str | None:
    """Why log-probs cannot be taken from hidden states through the lm_head weight here, if they cannot."""
    policy = recipe.policy
    if policy.zero_stage == 3:
        return "the policy is ZeRO-3, and its gathered lm_head weight would not carry a gradient back to its shards"
    lora = policy.lora
    if lora is not None and isinstance(lora.target_modules, list) and "lm_head" in lora.target_modules:
        return "`policy.lora` adapts lm_head, whose weight alone would skip the adapter"
    for name, plan in plans.items():
        transform = logit_transform(plan.model_config)
        if transform:
            return f"`{name}` transforms its logits ({transform})"
    return None
