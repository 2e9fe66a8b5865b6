"""The recipe keys every RL trainer's rollout reads: how completions are sampled and which rewards score them."""
from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field, field_serializer

from distill.config.schema import Section
from distill.rl.rewards import callable_name


class RolloutSpec(Section):
    """Sampling and reward keys shared by `grpo:` and `ppo:` (each adds `num_generations` and its own losses)."""

    max_completion_length: int = Field(64, ge=1)
    """Longest completion generated; prompts keep their last data.max_length - max_completion_length tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs are taken at the same temperature, as in TRL."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling (1: the whole distribution; top_k is never applied, as TRL's default top_k=0)."""
    generation_batch_size: int | None = Field(None, ge=1)
    """Completions decoded together per rank. null: the whole rollout at once, as far as the KV cache fits beside
    the training state; smaller: in turns."""
    decode: Literal["auto", "compiled", "graphs", "static", "generate"] = "auto"
    """How tokens are decoded, as `kd.on_policy.decode` (docs/distill-trainer.md): `auto` is the static KV cache
    with a compiled, graph-replayed decode step on GPUs and the static-cache loop on CPU."""
    reward_funcs: list[str | Callable[..., Any]] = []
    """Reward functions as `module:function`, called with (prompts, completions, completion_ids, **dataset columns).
    From Python (`distill.run`), also the functions themselves."""
    reward_weights: list[float] | None = None
    """One weight per reward function, in order (default 1 each); the reward is the weighted sum."""
    reward_model_weight: float = 1.0
    """Weight of the `reward` role's score in the reward, when the recipe gives that role a model."""
    mask_truncated_completions: bool = False
    """Completions cut by max_completion_length (no eos) count in no loss term (they still count as completions)."""

    @field_serializer("reward_funcs", when_used="json")
    def _names(self, v: list) -> list[str]:
        return [f if isinstance(f, str) else callable_name(f) for f in v]
