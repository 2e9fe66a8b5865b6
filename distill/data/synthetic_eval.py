"""Scoring a causal LM of the synthetic language against the language itself.

The language's next-token distribution after any prefix is known exactly
(:meth:`~distill.data.synthetic.SyntheticLanguage.next_token_distributions`), so a model can be
measured against the truth rather than against a teacher or a finite sample:

* :func:`score_text`: on held-out documents, teacher-forced, per predicted token: the model's
  cross-entropy, ``KL(true || model)``, the probability it puts on tokens the language cannot
  produce there, and, given a teacher, ``KL(teacher || model)`` and the teacher's own scores;
* :func:`score_samples`: on the model's own samples from ``<bos>``: the share of documents the
  language can produce, and the true per-token NLL of the grammatical ones.

``KL(true || model)`` is the cross-entropy minus the true conditional entropy at the same
positions, so it reads as "nats/token above the best possible model" without the noise of
comparing two cross-entropies.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from distill.data.synthetic import BOS, EOS, UNK, SyntheticLanguage

IGNORE = -100


def true_probs(lang: SyntheticLanguage, words: list[str], token_id: dict[str, int], *,
               sentences_per_doc: tuple[int, int], vocab: int) -> torch.Tensor:
    """The true next-token distributions after ``<bos>`` and after each word of ``words``:
    ``[n_words + 1, vocab]`` fp64 (rows past an impossible word are all zero)."""
    out = torch.zeros(len(words) + 1, vocab, dtype=torch.float64)
    for t, dist in enumerate(lang.next_token_distributions(words, sentences_per_doc)):
        for w, p in dist.items():
            out[t, token_id[w]] = p
    return out


def _batches(texts: list[str], tokenizer, max_length: int, batch_size: int):
    """(input_ids [B, T], attention_mask [B, T], words per row) of `texts`, right-padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(texts), batch_size):
        rows = [tokenizer(t)["input_ids"][:max_length] for t in texts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
        yield ids, mask, [t.split() for t in texts[i:i + batch_size]]


@torch.no_grad()
def score_text(model, texts: list[str], tokenizer, lang: SyntheticLanguage, *, sentences_per_doc: tuple[int, int],
               teacher=None, max_length: int = 128, batch_size: int = 32) -> dict[str, float]:
    """Teacher-forced scores of `model` on `texts` (documents of `lang`), means over predicted tokens.

    Every token after ``<bos>`` is predicted, the final ``<eos>`` included (what the trainers' text
    data predicts). Returns ``ce``, ``kl_true`` = KL(true || model), ``outside_mass`` = the model's
    probability on tokens the language cannot produce at that position, ``tokens``; with `teacher`
    also ``kl_teacher`` = KL(teacher || model) over the shared vocabulary, ``teacher_ce``,
    ``teacher_kl_true`` and ``teacher_outside_mass``. Models run on their own device and dtype; the
    scores are computed in fp64."""
    token_id = tokenizer.get_vocab()
    v_tok = max(token_id.values()) + 1
    sums: dict[str, float] = {}
    device = next(model.parameters()).device

    def add(key: str, value: torch.Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    for ids, mask, words in _batches(texts, tokenizer, max_length, batch_size):
        # Position t predicts token t + 1: the last real position of each row predicts nothing.
        labels = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE)  # [B, T-1]
        truth = torch.zeros(*labels.shape, v_tok, dtype=torch.float64)  # [B, T-1, V_tok]
        for b, w in enumerate(words):
            p = true_probs(lang, w, token_id, sentences_per_doc=sentences_per_doc, vocab=v_tok)
            n = int((labels[b] != IGNORE).sum())
            truth[b, :min(n, len(p))] = p[:n]
        labels, truth = labels.to(device), truth.to(device)
        valid = labels != IGNORE  # [B, T-1]
        scored = {"": model}
        if teacher is not None:
            scored["teacher_"] = teacher
        logps = {}
        for prefix, m in scored.items():
            m_device = next(m.parameters()).device
            logits = m(input_ids=ids.to(m_device), attention_mask=mask.to(m_device)).logits[:, :-1].to(device)  # [B, T-1, V_m]
            logp = torch.log_softmax(logits.double(), -1)  # [B, T-1, V_m]
            logps[prefix] = logp
            own = logp[..., :v_tok]  # the tokenizer's ids come first in a padded head
            target = torch.gather(own, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
            add(f"{prefix}ce", -(target * valid).sum())
            kl = (torch.special.xlogy(truth, truth) - torch.where(truth > 0, truth * own, 0.0)).sum(-1)  # [B, T-1]
            add(f"{prefix}kl_true", (kl * valid).sum())
            inside = torch.where(truth > 0, own.exp(), 0.0).sum(-1)  # [B, T-1]
            add(f"{prefix}outside_mass", ((1 - inside) * valid).sum())
        if teacher is not None:
            v = min(logps[""].shape[-1], logps["teacher_"].shape[-1])
            s = torch.log_softmax(logps[""][..., :v], -1)  # both renormalised on the shared vocabulary
            t = torch.log_softmax(logps["teacher_"][..., :v], -1)
            add("kl_teacher", ((t.exp() * (t - s)).sum(-1) * valid).sum())
        add("tokens", valid.sum())
    n = max(sums.pop("tokens"), 1.0)
    return {**{k: v / n for k, v in sums.items()}, "tokens": int(n)}


def judge(lang: SyntheticLanguage, words: list[str], *, ended: bool,
          sentences_per_doc: tuple[int, int]) -> tuple[int | None, float]:
    """(index of the first token the language cannot produce where it stands, or None; the true log-probability
    of the tokens before it). Tokens are `words`, then ``<eos>`` if `ended`: an impossible word, or an ``<eos>``
    where the document cannot end, is the bad one. From there on the context is outside the language, and
    so are the tokens an on-policy step would train on."""
    dists = lang.next_token_distributions([BOS] + words, sentences_per_doc)  # a sampled "<bos>" is a word
    tokens = words + [EOS] * ended
    bad = len(dists) - 1 if len(dists) <= len(words) else (
        len(words) if ended and dists[-1].get(EOS, 0.0) <= 0.0 else None)
    good = tokens[:bad] if bad is not None else tokens
    return bad, sum(math.log(d[w]) for d, w in zip(dists, good))


@torch.no_grad()
def score_samples(model, tokenizer, lang: SyntheticLanguage, *, sentences_per_doc: tuple[int, int], n: int = 256,
                  max_new_tokens: int = 96, temperature: float = 1.0, seed: int = 0,
                  batch_size: int = 64) -> dict[str, Any]:
    """Sample `n` documents from `model` after ``<bos>`` and check them against the language.

    Returns ``valid``: the share the language can produce (every word possible where it stands, ending
    in ``<eos>`` where a document may end); ``true_nll``: the true per-token NLL of the valid ones
    (``<eos>`` included; the language's entropy rate is what a perfect sampler averages); ``tokens``:
    mean sampled length; ``offpath``: the share of sampled tokens from the first impossible one on (an
    ``<eos>`` where the document cannot end counts as one). Sampling is seeded and leaves the global RNG
    as it was."""
    device = next(model.parameters()).device
    token_id = tokenizer.get_vocab()
    word_of = {i: w for w, i in token_id.items()}
    bos = token_id[BOS]
    valid, nll, counted, lengths, offpath = 0, 0.0, 0, 0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            prompt = torch.full((b, 1), bos, dtype=torch.long, device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=token_id[EOS], pad_token_id=token_id[EOS],
                                 bos_token_id=bos)[:, 1:].tolist()  # [b, <= max_new_tokens]
            for row in out:
                words = [word_of.get(t, UNK) for t in row]  # an id of a padded head is no word
                ended = EOS in words
                words = words[:words.index(EOS)] if ended else words
                bad, logp = judge(lang, words, ended=ended, sentences_per_doc=sentences_per_doc)
                lengths += len(words) + ended
                if bad is not None:
                    offpath += len(words) + ended - bad
                elif ended:  # a cut one (no <eos> within max_new_tokens) is no document, nor off the paths
                    valid += 1
                    nll -= logp
                    counted += len(words) + 1
    return {"valid": valid / n, "true_nll": nll / counted if counted else float("nan"), "tokens": lengths / n,
            "offpath": offpath / max(lengths, 1)}
