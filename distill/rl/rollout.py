"""What an RL trainer's reward step reads of a rollout: the prompt records the completions answer, the texts reward
functions take, and the [N, F] rewards of every function and the reward model.

Explicit inputs only (records, tokenizer, functions, scorer): any RL trainer can score its completions with them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from distill.rl.reward_model import RewardModelScorer
from distill.rl.rewards import RewardError, RewardFunction, agree_on_error, call_reward_function


class PromptRecords:
    """A prompt dataset's rows as reward functions see them, found by the `index` column of the tokenized prompts:
    the prompt (a string, or chat messages) and every other column of the row (a task's answer, ...)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.chat = False
        """Whether the prompts are chat messages (a `messages` column): completions then go to reward functions as
        `[{"role": "assistant", "content": ...}]`."""

    def add(self, raw) -> list[int]:
        """Keep the rows of a raw prompt dataset (`load_prompt_dataset`); returns their indices, in order."""
        offset = len(self.rows)
        extra = [c for c in raw.column_names if c not in ("prompt", "completion", "messages")]
        self.chat = "messages" in raw.column_names
        self.rows += [{"prompt": row["messages"] if self.chat else row["prompt"], **{c: row[c] for c in extra}} for row in raw]
        return list(range(offset, len(self.rows)))

    def texts(self, batch: dict, tokenizer, rows: Sequence[int] | None = None) -> tuple[list, list, list[list[int]]]:
        """(prompts, completions, completion ids) of a generation batch's `rows` (default all), as reward functions
        take them (TRL's forms): the dataset's prompt (a string, or chat messages), the completion decoded by
        `tokenizer` (a string, or `[{"role": "assistant", "content": ...}]` for chat prompts) and its token ids, eos
        included. `batch`: `completion_ids` [N, C], `completion_mask` [N, C] and `index` (N ints, -1 for padding rows)."""
        rows = range(batch["completion_ids"].shape[0]) if rows is None else rows
        completion_ids, mask = batch["completion_ids"].cpu(), batch["completion_mask"].cpu().bool()  # one copy, not one per row
        ids = [completion_ids[i][mask[i]].tolist() for i in rows]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        prompts = [self.rows[batch["index"][i]]["prompt"] if batch["index"][i] >= 0 else [] if self.chat else "" for i in rows]
        if self.chat:
            texts = [[{"role": "assistant", "content": c}] for c in texts]
        return prompts, texts, ids

    def columns(self, batch: dict, rows: Sequence[int]) -> dict[str, list]:
        """The extra dataset columns of `rows`, column -> one value per row, as reward functions take them (`**kwargs`)."""
        records = [self.rows[batch["index"][i]] for i in rows]
        return {k: [r[k] for r in records] for k in (records[0] if records else {}) if k != "prompt"}


def score_rollout(batch: dict, records: PromptRecords, tokenizer, functions: Sequence[RewardFunction],
                  scorer: RewardModelScorer | None, *, world_size: int, device: torch.device) -> torch.Tensor:
    """[N, F] rewards of a generation batch: each reward function's, then the reward model's; NaN where a function
    does not apply, and in padding rows (`batch["real"]` false), which no function sees.

    Collective: the reward model runs on every rank first, then every rank learns whether any reward function
    failed on any rank (RewardError everywhere, naming it), so none waits in a collective alone."""
    n = batch["completion_ids"].shape[0]
    model_scores = [] if scorer is None else [scorer.score(batch)]
    real = batch["real"].tolist()
    rows = [i for i in range(n) if real[i]]
    prompts, completions, ids = records.texts(batch, tokenizer, rows)
    columns = records.columns(batch, rows)
    out, error = [], None
    try:
        for rf in functions:
            values = torch.full((n,), float("nan"))
            values[rows] = call_reward_function(rf, prompts, completions, ids, columns)
            out.append(values.to(device))
    except RewardError as e:
        error = str(e)
    agree_on_error(error, world_size, device)
    return torch.stack(out + model_scores, 1)  # [N, F]
