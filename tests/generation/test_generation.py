"""distill.generation: the static-cache decode loop against transformers' generate(), its sampling against the
model's processed softmax, and the on-policy trainer's one generation phase per step."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from distill.data.prompts import PromptCollator
from distill.generation.generate import SamplingSpec, completion_lengths, generate_completions, processed_logits

V, PAD = 64, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _prompts(n: int, width: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """n left-padded prompts [n, width] of 1..width tokens (no pad id inside)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, width), generator=g)
    mask = torch.ones_like(ids)
    for b in range(n):
        pad = int(torch.randint(0, width, (1,), generator=g))
        ids[b, :pad], mask[b, :pad] = PAD, 0
    return ids, mask


def test_greedy_equals_generate_token_for_token(model):
    ids, mask = _prompts(21, 9)
    # A quarter of the vocabulary ends a completion: rows stop after 2 to ~20 tokens, so rows leave the batch
    # (21 rows: buckets 21, 16, 8) while others run to max_new_tokens.
    spec = SamplingSpec(max_new_tokens=30, temperature=0, eos_token_ids=tuple(range(3, V, 4)), pad_token_id=PAD, min_new_tokens=2)
    want = model.generate(input_ids=ids, attention_mask=mask, **spec.generate_kwargs())[:, ids.shape[1]:]
    got = generate_completions(model, ids, mask, spec, decode="static")
    assert torch.equal(got.tokens, want)
    lengths = got.lengths.tolist()
    assert min(lengths) >= 2 and max(lengths) == 30 and len(set(lengths)) > 4
    assert torch.equal(got.lengths, completion_lengths(want, spec.eos_token_ids))
    # In turns of 8 rows, and each prompt twice: the same tokens.
    assert torch.equal(generate_completions(model, ids, mask, spec, decode="static", batch_size=8).tokens, want)
    twice = generate_completions(model, ids[:5], mask[:5], spec, decode="static", num_generations=2)
    width = int(got.lengths[:5].max())
    assert torch.equal(twice.tokens[::2, :width], want[:5, :width]) and torch.equal(twice.tokens[1::2, :width], want[:5, :width])
    # The reference path itself, through the same function.
    assert torch.equal(generate_completions(model, ids, mask, spec, decode="generate").tokens, want)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probs` (bins expecting < 5 pooled)."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat.double() / 2))


def test_sampled_tokens_follow_the_processed_softmax(model):
    """Rows of one prompt, sampled at a fixed seed: the first token's frequencies against softmax of the logits
    processed as generate() does (temperature, top-k, top-p), and the second token's against the same for
    the rows whose first token was the most frequent one (that token comes out of a decode step).

    A chi-square test at p > 1e-3: with the seed fixed the test is deterministic, and a correct sampler fails
    it at one seed in a thousand; the same counts against the unprocessed softmax, a sampler that ignored the
    settings, give p < 1e-9. Tokens outside the support never appear."""
    peaked = LlamaForCausalLM(model.config).eval()
    peaked.load_state_dict(model.state_dict())
    with torch.no_grad():
        peaked.lm_head.weight *= 8  # logits spread over several nats: the settings cut deep into the distribution
    model = peaked
    ids, mask = _prompts(1, 6)
    n = 6000
    spec = SamplingSpec(max_new_tokens=2, temperature=0.7, top_k=24, top_p=0.9, pad_token_id=PAD)
    out = generate_completions(model, ids, mask, spec, decode="static", num_generations=n, seed=1234)
    assert torch.equal(out.tokens, generate_completions(model, ids, mask, spec, decode="static", num_generations=n, seed=1234).tokens)
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(24), TopPLogitsWarper(0.9)]

    def reference(prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(input_ids=prefix[None]).logits[:, -1].float()
        processed = logits
        for w in warpers:
            processed = w(prefix[None], processed)
        assert torch.equal(processed.isfinite(), processed_logits(logits, spec, torch.zeros(0, dtype=torch.long), False).isfinite())
        return processed.softmax(-1)[0], logits.softmax(-1)[0]

    prompt = ids[0][mask[0].bool()]
    for position in (0, 1):
        if position == 0:
            rows, prefix = torch.ones(n, dtype=torch.bool), prompt
        else:
            first = torch.bincount(out.tokens[:, 0], minlength=V).argmax()
            rows, prefix = out.tokens[:, 0] == first, torch.cat([prompt, first[None]])
        want, raw = reference(prefix)
        counts = torch.bincount(out.tokens[rows, position], minlength=V).double()
        assert counts[want == 0].sum() == 0, "a token outside the top-k/top-p support was sampled"
        assert 1 < int((want > 0).sum()) < 24 and counts.sum() > 300
        assert _chi_square_p(counts, want.double()) > 1e-3
        assert _chi_square_p(counts, raw.double()) < 1e-9


def test_sampling_is_seeded_and_bounded_by_min_and_max_new_tokens(model):
    ids, mask = _prompts(12, 5, seed=3)
    eos = tuple(range(3, V, 3))  # a third of the vocabulary: most rows would stop within a few tokens
    spec = SamplingSpec(max_new_tokens=12, temperature=1.0, min_new_tokens=4, eos_token_ids=eos, pad_token_id=PAD)
    a, b = (generate_completions(model, ids, mask, spec, decode="static", seed=s) for s in (7, 7))
    c = generate_completions(model, ids, mask, spec, decode="static", seed=8)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    stops = torch.isin(a.tokens, torch.tensor(eos))
    for row, n in zip(range(len(a.lengths)), a.lengths.tolist()):
        assert 4 <= n <= 12
        assert not stops[row, :min(n, 4) - 1].any()  # no eos among the first min_new_tokens - 1
        assert (a.tokens[row, n:] == PAD).all()
        assert n == 12 or stops[row, n - 1]
    assert a.lengths.min() < 12, "rows should stop: a third of the vocabulary is eos"


def test_one_generation_phase_per_step_and_the_loss_masks_the_generated_tokens(model, monkeypatch):
    """Two student-written micro-batches decode in one call; the rebuilt batches predict exactly the generated
    tokens (up to and including the first eos, the tokenizer's or the model's), each at the position after its
    predecessor."""
    from distill.generation import completions as on_policy
    from distill.generation.completions import CompletionSampler, OnPolicySpec
    from distill.trainers.distill import DistillTrainer

    calls = []

    def recording(role, ids, mask, spec, **kw):
        calls.append(len(ids))
        return generate_completions(role.module, ids, mask, spec, **{**kw, "gather": False})

    monkeypatch.setattr(on_policy, "generate_completions", recording)
    tok = SimpleNamespace(eos_token_id=5, pad_token_id=PAD, bos_token_id=1)
    spec = OnPolicySpec(max_new_tokens=10, temperature=1.0, lmbda=1.0)
    collate = PromptCollator(PAD, pad_to_multiple_of=None)
    micro = [collate([{"prompt_ids": [1, 7, 8], "completion_ids": []}, {"prompt_ids": [1, 9], "completion_ids": []}]),
             collate([{"prompt_ids": [1, 4, 4, 4, 6], "completion_ids": []}, {"prompt_ids": [1], "completion_ids": []}])]
    student = SimpleNamespace(name="student", module=model, plan=SimpleNamespace(zero_stage=2))
    trainer = SimpleNamespace(recipe=SimpleNamespace(seed=0, kd=SimpleNamespace(on_policy=spec)), rank=0,
                              models={"student": student},
                              sampler=CompletionSampler(spec, tok, rank=0, log=lambda *a: None, padding={"pad_to_multiple_of": None}))
    out = DistillTrainer.prepare_step(trainer, 3, micro)
    assert calls == [4]
    for batch, before in zip(out, micro):
        assert batch["source"] == "student"
        for b in range(2):
            prompt = before["prompt_ids"][b][before["prompt_mask"][b].bool()].tolist()
            seq = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            completion = seq[len(prompt):]
            assert seq[:len(prompt)] == prompt and 1 <= len(completion) <= 10
            # eos: the tokenizer's (5) and the model's generation config's (2)
            assert completion[-1] in (5, 2) or len(completion) == 10
            assert not {5, 2} & set(completion[:-1])
            labels = batch["labels"][b]
            predicted = (labels != -100).nonzero().squeeze(1).tolist()
            assert predicted == list(range(len(prompt) - 1, len(seq) - 1))
            assert labels[predicted].tolist() == completion
