"""`kd.cache`: where the teacher's distributions are written once and read by training runs, and how they are stored."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.config.schema import Section
from distill.teacher_cache.codec import check_values

WRITE_SETTINGS = ("format", "k", "samples", "values", "ids", "vocab_size")
"""The keys that decide what the writer stores; a training recipe that sets one is refused by a cache that stores
another."""


class CacheSpec(Section):
    """The teacher as a cache of its distributions on disk (docs/distill-trainer.md#offline-distillation-from-a-teacher-cache-kdcache):
    `python -m distill.teacher_cache RECIPE` runs the recipe's teacher over its data and writes the cache; a training
    run whose recipe has `kd.cache` loads no teacher and reads it."""

    dir: str | None = None
    """The cache directory. The writer writes there (or into `output_dir` when this is null); training reads it
    (and needs it set)."""
    format: Literal["topk", "sampled"] = "topk"
    """What is stored per predicted token. `topk`: the teacher's `k` most likely tokens, their log-probabilities and
    the mass outside them. `sampled`: the `k` most likely (0 allowed) and `samples` tokens drawn from the rest by
    systematic sampling, an unbiased estimate of the whole distribution (forward KL only)."""
    k: int = Field(64, ge=0)
    """Most likely tokens stored per position (their log-probabilities exact up to `values`)."""
    samples: int = Field(0, ge=0)
    """`format: sampled`: tokens drawn per position from the distribution outside the `k` stored ones."""
    values: str = "bf16"
    """How log-probabilities are stored: fp32, bf16, fp16, `log<b>` (-log p rounded to b bits over 24 nats) or
    `sqrt<b>` (sqrt(p) rounded to b bits), b in 2..16."""
    ids: Literal["packed", "int32"] = "packed"
    """Token ids as ceil(log2(vocab_size)) bits each (`packed`) or int32."""
    vocab_size: int | None = Field(None, ge=2)
    """The distributions are over the first `vocab_size` tokens of the teacher's head, renormalised (null: all of
    it). Set it to a student's smaller vocabulary: a student with fewer logits than the cache is refused, as the
    live loss would renormalise the teacher over the student's tokens."""
    tail: Literal["renormalize", "bucket"] = "renormalize"
    """Reading: how the mass outside the stored tokens enters the loss. `renormalize`: dropped, the stored tokens
    renormalised (exactly the live loss with `kd.top_k` = k); `bucket`: one more class against the student's mass
    outside the stored tokens (needs `kd.temperature: 1`)."""
    rows_per_shard: int = Field(1024, ge=1)
    """Writing: rows of the data per shard file, the unit of work of one rank and of resuming after a kill."""
    overwrite: bool = False
    """Writing: delete a cache in `dir` that was written from other settings, teacher or data, and write this one
    (otherwise it is refused, naming the difference). An unfinished cache of the same ones is always resumed."""

    @field_validator("values")
    @classmethod
    def _values(cls, v: str) -> str:
        return check_values(v)

    @model_validator(mode="after")
    def _consistent(self) -> "CacheSpec":
        if self.format == "topk" and self.k < 1:
            raise ValueError("`format: topk` stores k >= 1 tokens per position")
        if self.format == "topk" and self.samples:
            raise ValueError("`samples` are drawn by `format: sampled`; `topk` stores none: remove `samples`")
        if self.format == "sampled" and self.samples < 1:
            raise ValueError("`format: sampled` needs `samples` >= 1, e.g. samples: 32")
        return self

    def asked(self) -> dict:
        """The write settings this recipe states itself (not defaults): a cache must match them."""
        return {k: getattr(self, k) for k in WRITE_SETTINGS if k in self.model_fields_set}
