"""The ground truth of the RLHF pipeline: a preference on the synthetic language that a function scores exactly.

A completion is worth the share of its sentence ends that are `!` (as `distill.data.reward_task:end_mark`), but
only when the prompt followed by it is text the language can produce; a completion with a word the grammar forbids
(`! !`, `the the`, a verb without a subject) is worth 0. The shipped teacher ends about a third of its sentences
with `!` and almost never breaks the grammar, so preference pairs sampled from it teach a reward model the first
part well and the second hardly at all: a policy that writes ungrammatical text full of `!` may please that model
while the truth gives it 0. That is the gap between the learned reward and the truth the pipeline measures
(distill/pipelines/rlhf.py, docs/rlhf-pipeline.md).

Named in a recipe as `distill.data.ground_truth:ground_truth` (with weight 0 in `grpo.reward_weights` it is
logged, `rewards/ground_truth`, and trains nothing); `distill.data.ground_truth:grammatical` logs the share of
completions that keep to the grammar.
"""
from __future__ import annotations

import functools
from typing import Any

from distill.data.synthetic import ENDS, SyntheticLanguage

LANGUAGE_SEED = 0
"""The language the shipped teacher and the synthetic data speak (`data.synthetic_seed: 0`)."""
MARK = "!"


@functools.lru_cache(maxsize=4)
def _language(seed: int) -> SyntheticLanguage:
    return SyntheticLanguage(seed)


def _text(x: Any) -> str:
    """A prompt or completion as text: a string, or the content of chat messages."""
    return x if isinstance(x, str) else " ".join(m["content"] for m in x)


def is_grammatical(words: list[str], *, seed: int = LANGUAGE_SEED) -> bool:
    """Whether the grammar allows every word of `words` where it stands: a prefix of a run of sentences. (Documents of
    the training data also have 1 to 4 sentences; that is their length, not their grammar, and is not checked.)"""
    try:
        _language(seed).state_after(words)
    except ValueError:
        return False
    return True


def score(prompt: str, completion: str, *, seed: int = LANGUAGE_SEED) -> float:
    """The truth of one completion: the share of its sentence ends that are `!` (0 without any), 0 when the prompt
    followed by the completion breaks the grammar."""
    words = completion.split()
    if not is_grammatical(prompt.split() + words, seed=seed):
        return 0.0
    ends = [w for w in words if w in ENDS]
    return sum(w == MARK for w in ends) / len(ends) if ends else 0.0


def ground_truth(prompts: list, completions: list, **columns) -> list[float]:
    """Per completion, its `score` against its prompt (a reward function: `distill.data.ground_truth:ground_truth`)."""
    return [score(_text(p), _text(c)) for p, c in zip(prompts, completions)]


def grammatical(prompts: list, completions: list, **columns) -> list[float]:
    """Per completion, 1.0 when the prompt followed by it keeps to the grammar, else 0.0: the share of a policy's text
    the truth can score at all (a reward function, logged beside the truth: `distill.data.ground_truth:grammatical`)."""
    return [float(is_grammatical(_text(p).split() + _text(c).split())) for p, c in zip(prompts, completions)]
