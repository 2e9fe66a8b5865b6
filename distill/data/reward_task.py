"""A GRPO task on the synthetic language whose reward is known and learnable.

Prompts are the starts of documents of :class:`~distill.data.synthetic.SyntheticLanguage` (2 to 6
words, as in `distill.data.prompts`); each record also carries `end_mark`, the punctuation its
completion's sentences should end with (`!` in the written data). Two reward functions score a
completion's text:

* :func:`end_mark`: the fraction of the completion's sentence ends (`.`, `!`, `?`) that are the
  record's `end_mark` (0 when no sentence ends). The language ends a sentence with `!` about a third
  of the time (a model trained on it, like the shipped teacher, too), so the reward starts near 0.35
  and a policy can reach 1 by shifting one choice per sentence: the grammar stays intact.
* :func:`whole_sentences`: 1 when the completion stops at a sentence end (its last word is one),
  0 when it is cut mid-sentence by the length limit.

Both are named in a recipe as `distill.data.reward_task:end_mark` and
`distill.data.reward_task:whole_sentences` (recipes/grpo_quickstart.yaml).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from distill.data.synthetic import ENDS, SyntheticLanguage, cut_documents, existing_meta, write_splits, writer_cli

_FORMAT_VERSION = 1


def _text(completion: Any) -> str:
    """A completion's text: a string, or the content of chat messages."""
    if isinstance(completion, str):
        return completion
    return " ".join(m["content"] for m in completion)


def end_mark(prompts: list, completions: list, end_mark: list[str], **kwargs) -> list[float]:
    """Per completion: the share of its sentence ends that are `end_mark` (0 without any)."""
    out = []
    for completion, mark in zip(completions, end_mark):
        ends = [w for w in _text(completion).split() if w in ENDS]
        out.append(sum(w == mark for w in ends) / len(ends) if ends else 0.0)
    return out


def whole_sentences(prompts: list, completions: list, **kwargs) -> list[float]:
    """Per completion: 1.0 when its last word ends a sentence, else 0.0 (cut mid-sentence, or empty)."""
    return [1.0 if _text(c).split()[-1:] and _text(c).split()[-1] in ENDS else 0.0 for c in completions]


def write_reward_task(out_dir: str | os.PathLike[str], *, seed: int = 0, n_train: int = 2000, n_eval: int = 200,
                      prompt_words: tuple[int, int] = (2, 6), mark: str = "!") -> dict[str, Any]:
    """Write `{"prompt", "end_mark"}` records (train.jsonl, eval.jsonl), `tokenizer/` and `meta.json`.

    Each prompt is the first `k` words (`k` uniform on `prompt_words`) of a one-sentence document
    that has more words than that. Deterministic per seed and idempotent."""
    if mark not in ENDS:
        raise ValueError(f"mark must be one of {ENDS}, got {mark!r}")
    lo, hi = prompt_words
    out = Path(out_dir)
    config = {"format_version": _FORMAT_VERSION, "kind": "reward_task", "seed": seed, "n_train": n_train,
              "n_eval": n_eval, "prompt_words": [lo, hi], "mark": mark}
    old = existing_meta(out, config)
    if old is not None:
        return old
    out.mkdir(parents=True, exist_ok=True)
    lang = SyntheticLanguage(seed)
    splits = {name: cut_documents(lang, random.Random(f"reward-task-{seed}-{name}"), n, (lo, hi), sentences=lambda rng: 1,
                                  record=lambda prompt, rest: {"prompt": prompt, "end_mark": mark})
              for name, n in (("train", n_train), ("eval", n_eval))}
    return write_splits(out, splits, lang, config)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m distill.data.reward_task OUT_DIR [--seed S] [--n-train N] [--n-eval N]``."""
    writer_cli("Write the synthetic GRPO task's prompts.",
               lambda a: write_reward_task(a.out_dir, seed=a.seed, n_train=a.n_train, n_eval=a.n_eval), argv)


if __name__ == "__main__":
    main()
