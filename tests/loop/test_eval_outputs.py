"""What a run shows besides its losses: generation samples at each eval, the lm trainer's before/after table,
and `kd.alpha: 1` training without running the teacher."""
from types import SimpleNamespace

import pytest
import torch

from distill.loop.samples import format_samples, sample_prompts
from tests.helpers import TINY_LLAMA


def test_sample_prompts_of_text_packed_and_prompt_records():
    import datasets

    text = datasets.Dataset.from_dict({"input_ids": [list(range(1, 41)), [5, 6, 7], [9]]})
    assert sample_prompts(text, 5) == [list(range(1, 17)), [5], [9]]  # half of the text, at most 16 tokens
    packed = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6, 7]], "position_ids": [[0, 1, 2, 3, 0, 1, 2]]})
    assert sample_prompts(packed, 3) == [[1, 2]]  # half of the row's first document
    prompts = datasets.Dataset.from_dict({"prompt_ids": [[1, 8, 9], [1, 4]], "completion_ids": [[3], []]})
    assert sample_prompts(prompts, 1) == [[1, 8, 9]]
    assert "[0] 'the cat' -> 'sleeps .' <eos>" in format_samples(3, [{"prompt": "the cat", "completion": "sleeps .", "eos": True}])


def test_lm_trainer_prints_a_before_after_table():
    from distill.trainers.lm import LMTrainer

    said = []
    LMTrainer.report(SimpleNamespace(log=said.append), {"before": {"loss": 3.9}, "after": {"loss": 2.1}})
    assert said and "eval CE (nats/token)" in said[0] and "3.9000" in said[0] and "2.1000" in said[0]


class _Role:
    """A model called like a RoleModel; `calls` counts its forwards."""

    def __init__(self, model):
        self.module, self.calls = model, 0

    def __call__(self, **inputs):
        self.calls += 1
        return self.module(**inputs)

    def last_hidden(self, **inputs):
        self.calls += 1
        return self.module.model(**{k: v for k, v in inputs.items() if k != "use_cache"}).last_hidden_state


@pytest.mark.parametrize("chunked", [False, True])
def test_kd_alpha_one_trains_on_the_labels_without_running_the_teacher(chunked):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.config.recipe import validate_recipe
    from distill.losses import cross_entropy
    from distill.trainers.distill import DistillTrainer

    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    student, teacher = _Role(LlamaForCausalLM(LlamaConfig(**cfg, vocab_size=30))), _Role(LlamaForCausalLM(LlamaConfig(**cfg, vocab_size=30)))
    raw = {"trainer": "distill", "output_dir": "unused", "data": {"train": "unused.jsonl"},
           "student": {"config": TINY_LLAMA}, "teacher": {"config": TINY_LLAMA}, "kd": {"alpha": 1.0, "chunked": chunked}}
    trainer = SimpleNamespace(recipe=validate_recipe(raw, DistillTrainer), student=student, teacher=teacher)
    trainer.ce_step = lambda b, n: DistillTrainer.ce_step(trainer, b, n)
    ids = torch.randint(0, 30, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)}
    n = (batch["labels"] != -100).sum()
    out = DistillTrainer.loss_step(trainer, batch, n)
    assert teacher.calls == 0 and student.calls == 1 and set(out) == {"loss", "ce"}
    reference = cross_entropy(student.module(input_ids=ids).logits, batch["labels"], num_valid_tokens=n)
    torch.testing.assert_close(out["loss"], reference, rtol=1e-5, atol=1e-6)
    out["loss"].backward()  # the student learns from it
    assert student.module.model.embed_tokens.weight.grad is not None
