"""GRPO's `reward` role: a frozen sequence classifier that scores prompt + completion (its logit 0).

A reward model that ships its own tokenizer, different from the policy's, reads text: each prompt and
completion is decoded by the policy's tokenizer and encoded again by the reward model's (chat records
through the reward tokenizer's chat template, as TRL does). One with the policy's tokenizer (or none of
its own) reads the policy's token ids directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer

from distill.config.errors import RecipeError
from distill.data.loading import pad_id
from distill.rl.rewards import RewardError, load_reward_functions


def own_tokenizer(source: str | None):
    """The tokenizer saved with a model directory, or None when it has none."""
    if source is None or not any((Path(source) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(source)


def reward_model_given(recipe) -> bool:
    """Whether the recipe's `reward` role names a model (then it is built and scores every completion)."""
    return recipe.reward.from_pretrained is not None or recipe.reward.config is not None


def check_reward_recipe(recipe, section: str, trainer: str) -> None:
    """An RL recipe's reward, before any weight loads: its `<section>.reward_funcs` import and have one weight each,
    there is a function or a reward model, and the `reward` role is a frozen sequence classifier."""
    s = getattr(recipe, section)
    load_reward_functions(s.reward_funcs, s.reward_weights)  # importable, callable, one weight each
    if not s.reward_funcs and not reward_model_given(recipe):
        raise RecipeError(f"{trainer} needs a reward: name functions in `{section}.reward_funcs` (module:function) or a "
                          "reward model in `reward.from_pretrained`")
    if recipe.reward.trainable:
        raise RecipeError(f"`reward.trainable: true`: the reward model is frozen in {trainer}; remove `reward.trainable`")
    if recipe.reward.model_class != "sequence_classification":
        raise RecipeError("`reward.model_class` must be `sequence_classification`: the reward model gives one score per "
                          f"sequence; score with a causal LM through a reward function in `{section}.reward_funcs`")


class RewardModelScorer:
    """Scores prompt + completion rows with a frozen sequence classifier (GRPO's `reward` role)."""

    def __init__(self, role, *, source: str | None, tokenizer, batch_size: int,
                 chat_texts: Callable[[dict], tuple[list, list, list]] | None = None, log: Callable[[str], None] | None = None):
        """`role`: the classifier (a RoleModel, or any callable returning `.logits` [b, 1]); `source`: the directory it
        was loaded from, whose own tokenizer, if it has one, reads the text; `tokenizer`: the policy's, which wrote the
        batch; `batch_size`: rows per forward. `chat_texts(batch)` -> (prompt messages, completion messages, ids) of
        every row, for chat records (None: plain prompts, decoded from the ids). `log`: where to say which path it takes."""
        self.role, self.policy_tokenizer, self.batch_size, self.chat_texts = role, tokenizer, batch_size, chat_texts
        tok = own_tokenizer(source)
        self.tokenizer = None if tok is None or tok.get_vocab() == tokenizer.get_vocab() else tok
        config = role.module.config
        if config.pad_token_id is None:  # a classifier reads the last token that is not padding; it must know padding
            config.pad_token_id = pad_id(self.tokenizer or tokenizer)
        self.pad = config.pad_token_id
        if self.tokenizer is not None:
            self.tokenizer.truncation_side = "left"  # the score is read at the end: keep the completion
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = getattr(config, "max_position_embeddings", None)
        if log is not None:
            how = "re-tokenizes the text with its own tokenizer" if self.tokenizer else "reads the policy's token ids"
            log(f"grpo: the reward model {how}")

    @classmethod
    def check(cls, recipe, plans, policy: str = "policy") -> None:
        """Refuse a reward model that cannot score `policy`'s completions, before any weight loads."""
        plan = plans["reward"]
        labels = getattr(plan.model_config, "num_labels", 1)
        if labels != 1:
            raise RecipeError(f"`reward` must output one score per sequence (num_labels: 1); its config has num_labels: "
                              f"{labels}: give a reward model (e.g. trained with a reward trainer), or `reward.config.num_labels: 1`")
        tok = own_tokenizer(recipe.reward.from_pretrained)
        if tok is None:
            need = getattr(plans[policy].model_config, "vocab_size", None)
            have = getattr(plan.model_config, "vocab_size", None)
            if need and have and have < need:
                raise RecipeError(f"`reward` has no tokenizer of its own and {have} embeddings, fewer than the policy's "
                                  f"vocabulary ({need}): save the reward model's tokenizer in its directory")
        elif tok.pad_token is None and tok.eos_token is None:
            raise RecipeError(f"the tokenizer of `reward.from_pretrained: {recipe.reward.from_pretrained}` has neither a pad "
                              "nor an eos token to pad batches with: set one in its tokenizer_config.json")

    @torch.no_grad()
    def score(self, batch: dict) -> torch.Tensor:
        """[N] scores of the batch's prompt + completion rows, `train.micro_batch_size` rows per forward (the same
        number of forwards on every rank: a ZeRO-3 reward model gathers its weights in each)."""
        ids, mask = self._inputs(batch)
        step, out = self.batch_size, []
        for s in range(0, ids.shape[0], step):
            logits = self.role(input_ids=ids[s:s + step], attention_mask=mask[s:s + step]).logits  # [b, 1]
            out.append(logits[:, 0].float())
        return torch.cat(out)

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = batch["input_ids"].device
        if self.tokenizer is None:
            return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, self.pad), batch["attention_mask"]
        if self.chat_texts is not None:
            prompts, completions, _ = self.chat_texts(batch)
            if not getattr(self.tokenizer, "chat_template", None):
                raise RewardError("the reward model's tokenizer has no chat template to render the chat records with: "
                                  "give it one, or use plain-text prompts")
            texts = [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
            special = False  # the template writes them
        else:
            seqs = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
            texts = self.policy_tokenizer.batch_decode(seqs, skip_special_tokens=True)
            special = True
        enc = self.tokenizer(texts, padding=True, truncation=self.max_length is not None, max_length=self.max_length,
                             add_special_tokens=special, return_tensors="pt")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

