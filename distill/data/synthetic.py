"""A small synthetic language whose true next-token distribution is known.

Nothing can be downloaded, so tests and the quickstart train on text generated
here. Because the generator is a deterministic finite-state machine, the exact
next-word distribution after any prefix can be computed, which lets us say how
far a trained model is from the best achievable cross-entropy.

Sentences look like ``the red cat sees a small dog quickly .``. The grammar
has subject/object/prepositional noun phrases, animacy-dependent verb choice
(inanimate subjects only take ``falls``/``waits``), deterministic steps
(a preposition is always followed by ``the``; ``reads a``/``reads the`` by
``book``) and noisy ones whose word probabilities are drawn from the seed.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import random
from pathlib import Path
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: list[str] = [PAD, BOS, EOS, UNK]

DETS = ["the", "a", "every", "some"]
ADJS = ["red", "blue", "green", "small", "big", "old", "young", "happy"]
ANIMATE = ["cat", "dog", "bird", "fox", "man", "woman", "child", "teacher"]
INANIMATE = ["tree", "house", "ball", "book"]
NAMES = ["alice", "bob"]
TVERBS = ["sees", "likes", "chases", "finds", "holds"]
IVERBS = ["sleeps", "runs", "sings", "waits", "falls"]
ADVS = ["quickly", "slowly", "quietly"]
PREPS = ["near", "under", "with"]
CONJS = ["and", "but"]
ENDS = [".", "!", "?"]
COMMA = ","

_FORMAT_VERSION = 1
State = str  # e.g. "S", "DET:subj", "SUBJ:anim"; opaque outside this module


class SyntheticLanguage:
    """Stochastic finite-state grammar of simple English-like sentences.

    The vocabulary is fixed; only the probabilities depend on ``seed``, so all
    seeds share one tokenizer but define different distributions.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self.vocab: list[str] = (
            DETS + ADJS + ANIMATE + INANIMATE + NAMES + TVERBS + ["reads"]
            + IVERBS + ADVS + PREPS + CONJS + ENDS + [COMMA]
        )
        # state -> {word: prob}; transitions are word-determined so the
        # state after a prefix is unique (the grammar is unambiguous).
        self._dist: dict[State, dict[str, float]] = {}
        self._next: dict[tuple[State, str], State] = {}
        self._build(rng)
        # Cumulative tables make sampling O(log k) per word.
        self._cum: dict[State, tuple[list[str], list[float]]] = {
            state: (list(dist), list(itertools.accumulate(dist.values())))
            for state, dist in self._dist.items()
        }

    # -- construction -----------------------------------------------------
    def _build(self, rng: random.Random) -> None:
        def choice(words: list[str]) -> dict[str, float]:
            # Half Dirichlet(1), half uniform: seed-dependent but with every
            # allowed word kept reasonably likely (learnable, testable).
            g = [rng.gammavariate(1.0, 1.0) for _ in words]
            s = sum(g)
            return {w: 0.5 * x / s + 0.5 / len(words) for w, x in zip(words, g)}

        def mix(*parts: tuple[float, dict[str, float]]) -> dict[str, float]:
            out: dict[str, float] = {}
            for weight, dist in parts:
                for w, p in dist.items():
                    out[w] = out.get(w, 0.0) + weight * p
            return out

        def add(state: State, dist: dict[str, float], nxt: dict[str, State]) -> None:
            self._dist[state] = dist
            for w in dist:
                self._next[(state, w)] = nxt[w] if w in nxt else nxt["*"]

        nouns = ANIMATE + INANIMATE
        ends = choice(ENDS)
        # Sentence start and object position share structure but not weights.
        add("S", mix((0.85, choice(DETS)), (0.15, choice(NAMES))),
            {**{n: "SUBJ:anim" for n in NAMES}, "*": "DET:subj"})
        add("VT", mix((0.8, choice(DETS)), (0.2, choice(NAMES))),
            {**{n: "END" for n in NAMES}, "*": "DET:obj"})
        after_noun = {"subj": None, "obj": "END", "pp": "PPEND"}
        for role in ("subj", "obj", "pp"):
            # Per-role noun weights: likely subjects differ from likely objects.
            noun_dist = choice(nouns)
            noun_next = {n: after_noun[role] or ("SUBJ:anim" if n in ANIMATE else "SUBJ:inan")
                         for n in nouns}
            add(f"DET:{role}", mix((0.35, choice(ADJS)), (0.65, noun_dist)),
                {**noun_next, "*": f"ADJ1:{role}"})
            add(f"ADJ1:{role}", mix((0.2, choice(ADJS)), (0.8, noun_dist)),
                {**noun_next, "*": f"ADJ2:{role}"})
            add(f"ADJ2:{role}", dict(noun_dist), noun_next)
        add("SUBJ:anim", mix((0.5, choice(TVERBS)), (0.1, {"reads": 1.0}), (0.4, choice(IVERBS))),
            {"reads": "VREAD", **{v: "VT" for v in TVERBS}, "*": "END"})
        add("SUBJ:inan", choice(["falls", "waits"]), {"*": "END"})
        add("VREAD", choice(["the", "a"]), {"*": "READDET"})
        add("READDET", {"book": 1.0}, {"*": "END"})
        add("END", mix((0.2, choice(ADVS)), (0.2, choice(PREPS)), (0.08, {COMMA: 1.0}), (0.52, ends)),
            {**{a: "ADV" for a in ADVS}, **{p: "PREP" for p in PREPS}, COMMA: "COMMA", "*": "S"})
        add("ADV", mix((0.3, choice(PREPS)), (0.7, ends)),
            {**{p: "PREP" for p in PREPS}, "*": "S"})
        add("PREP", {"the": 1.0}, {"*": "DET:pp"})
        add("PPEND", dict(ends), {"*": "S"})
        add("COMMA", choice(CONJS), {"*": "S"})
        for dist in self._dist.values():
            assert abs(sum(dist.values()) - 1.0) < 1e-9

    # -- queries ----------------------------------------------------------
    def state_after(self, prefix_words: list[str]) -> State:
        """Grammar state after ``prefix_words`` (a leading ``<bos>`` is ignored)."""
        state: State = "S"
        words = prefix_words[1:] if prefix_words[:1] == [BOS] else prefix_words
        for i, w in enumerate(words):
            nxt = self._next.get((state, w))
            if nxt is None:
                raise ValueError(f"word {w!r} at position {i} is impossible after {words[:i]!r}")
            state = nxt
        return state

    def next_word_distribution(self, prefix_words: list[str]) -> dict[str, float]:
        """True next-word distribution after ``prefix_words`` (sums to 1).

        Document ends are not modelled here; see :meth:`next_token_distribution`.
        """
        return dict(self._dist[self.state_after(prefix_words)])

    def next_token_distribution(
        self, prefix_words: list[str], sentences_per_doc: tuple[int, int] = (1, 4)
    ) -> dict[str, float]:
        """True next-token distribution including ``<eos>``.

        Assumes the document's sentence count is uniform on
        ``sentences_per_doc`` (inclusive), as :func:`write_dataset` draws it.
        """
        words = prefix_words[1:] if prefix_words[:1] == [BOS] else prefix_words
        state = self.state_after(words)
        # End punctuation always closes a sentence (every such arc leads to "S").
        done = sum(w in ENDS for w in words)
        at_boundary = bool(words) and words[-1] in ENDS
        return self._with_eos(state, done, sentences_per_doc, at_boundary=at_boundary)

    def next_token_distributions(
        self, words: list[str], sentences_per_doc: tuple[int, int] = (1, 4)
    ) -> list[dict[str, float]]:
        """:meth:`next_token_distribution` after every prefix of ``words``, in one pass.

        ``n`` words (no ``<eos>``) give ``n + 1`` distributions: after ``<bos>`` alone, then after each word; the last
        one predicts what follows the whole text (``<eos>`` for a complete document). A word the
        language cannot produce there ends the list early: it has ``i + 1`` entries when word ``i``
        is impossible, so a caller can tell valid text by its length.
        """
        words = words[1:] if words[:1] == [BOS] else words
        state: State = "S"
        done, at_boundary = 0, False
        out = [self._with_eos(state, done, sentences_per_doc, at_boundary=at_boundary)]
        for w in words:
            if out[-1].get(w, 0.0) <= 0.0:
                break
            state = self._next[(state, w)]
            at_boundary = w in ENDS
            done += at_boundary
            out.append(self._with_eos(state, done, sentences_per_doc, at_boundary=at_boundary))
        return out

    def _with_eos(
        self, state: State, done: int, spd: tuple[int, int], *, at_boundary: bool
    ) -> dict[str, float]:
        lo, hi = spd
        dist = self._dist[state]
        # "S" is also reached after "and"/"but", where the document cannot end.
        if not at_boundary or done < lo:
            return dict(dist)
        # P(n == done | n >= done) for n ~ Uniform{lo..hi}.
        p_eos = 1.0 if done >= hi else 1.0 / (hi - done + 1)
        out = {w: (1.0 - p_eos) * p for w, p in dist.items()} if p_eos < 1.0 else {}
        out[EOS] = p_eos
        return out

    def _sample(self, rng: random.Random, state: State) -> str:
        words, cum = self._cum[state]
        i = bisect.bisect_right(cum, rng.random() * cum[-1])
        return words[min(i, len(words) - 1)]

    def sample_sentence(self, rng: random.Random) -> list[str]:
        """One sentence as a word list, ending in ``.``, ``!`` or ``?``."""
        state: State = "S"
        out: list[str] = []
        while True:
            w = self._sample(rng, state)
            out.append(w)
            state = self._next[(state, w)]
            if w in ENDS:
                return out

    def sample_document(self, rng: random.Random, n_sentences: int) -> str:
        """``n_sentences`` sentences joined into one space-separated string."""
        return " ".join(w for _ in range(n_sentences) for w in self.sample_sentence(rng))

    def true_entropy_per_token(
        self,
        n_docs: int = 2000,
        *,
        seed: int = 12345,
        sentences_per_doc: tuple[int, int] = (1, 4),
        include_eos: bool = True,
    ) -> float:
        """Monte-Carlo estimate of the best achievable cross-entropy (nats/token).

        With ``include_eos`` the targets are exactly what a causal LM trained on
        ``<bos> words <eos>`` predicts (every word plus the final ``<eos>``), so
        this is the floor for the eval loss. Averaging the exact conditional
        entropy at each visited state (rather than ``-log p`` of samples) keeps
        the variance low.
        """
        lo, hi = sentences_per_doc
        if not 1 <= lo <= hi:
            raise ValueError(f"sentences_per_doc must satisfy 1 <= lo <= hi, got {sentences_per_doc}")
        rng = random.Random(seed)
        total, count = 0.0, 0
        # A state's entropy depends on the state and, at a sentence boundary past `lo` sentences, on the chance of
        # <eos> there (`min(done, hi)` fixes it): each distinct one summed once, the same sum each time, so long
        # documents (millions of visits) cost a lookup per visit and the estimate is what summing every visit gives.
        entropies: dict[tuple[State, int], float] = {}
        for _ in range(n_docs):
            n = rng.randint(lo, hi)
            state: State = "S"
            done, at_boundary = 0, False
            while True:
                key = (state, min(done, hi) if include_eos and at_boundary and done >= lo else -1)
                h = entropies.get(key)
                if h is None:
                    if include_eos:
                        dist = self._with_eos(state, done, sentences_per_doc, at_boundary=at_boundary)
                    else:
                        dist = self._dist[state]
                    h = entropies[key] = sum(p * math.log(p) for p in dist.values() if p > 0)
                total -= h
                count += 1
                if done == n:
                    break  # the prediction just counted was the <eos> one
                w = self._sample(rng, state)
                state = self._next[(state, w)]
                at_boundary = w in ENDS
                done += at_boundary
                if not include_eos and done == n:
                    break
        return total / count


def build_tokenizer(lang: SyntheticLanguage) -> Any:
    """Word-level fast tokenizer for ``lang``: ``<pad>``=0, adds ``<bos>``/``<eos>``.

    Returns a ``transformers.PreTrainedTokenizerFast`` that round-trips through
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + lang.vocab)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos_id, eos_id = vocab[BOS], vocab[EOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="right",
    )


def write_atomic(path: Path, text: str) -> None:
    # Another rank may read while we write; readers only ever see whole files.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_tokenizer_atomic(tokenizer, out: Path) -> None:
    """`tokenizer.save_pretrained(out)` where every file lands whole: each rank of a launch may write the same
    (deterministic) data directory while another rank already loads its tokenizer."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(str(tmp))
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def existing_meta(out: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The meta.json of a complete dataset directory written with `config`, else None (write it anew).

    Raises FileExistsError when `out` holds data files that no distill writer wrote (no meta.json of ours):
    those are someone's own data, never written over."""
    ours = None
    try:
        ours = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    if not isinstance(ours, dict) or "format_version" not in ours:
        foreign = [n for n in ("train.jsonl", "eval.jsonl", "tokenizer", "meta.json") if (out / n).exists()]
        if foreign:
            raise FileExistsError(f"{out} holds {', '.join(foreign)} that distill did not write (no meta.json of its "
                                  "own): they are left alone; write the synthetic data into another directory")
        return None
    needed = [out / "train.jsonl", out / "eval.jsonl", out / "tokenizer" / "tokenizer.json"]
    if not all(p.exists() for p in needed):
        return None
    return ours if all(ours.get(k) == v for k, v in config.items()) else None


def write_dataset(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_eval: int = 200,
    sentences_per_doc: tuple[int, int] = (1, 4),
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``eval.jsonl``, ``tokenizer/`` and ``meta.json``.

    Idempotent: if ``meta.json`` records the same settings and every file is
    present, nothing is rewritten. ``meta.json`` is written last, so its
    presence means the directory is complete. Returns the meta dict.
    """
    out = Path(out_dir)
    lo, hi = sentences_per_doc
    config = {"format_version": _FORMAT_VERSION, "seed": seed, "n_train": n_train,
              "n_eval": n_eval, "sentences_per_doc": [lo, hi]}
    old = existing_meta(out, config)
    if old is not None:
        return old

    out.mkdir(parents=True, exist_ok=True)
    lang = SyntheticLanguage(seed)
    splits = {}
    # Separate streams so changing n_eval does not change the training docs.
    for name, n, stream in (("train", n_train, 1), ("eval", n_eval, 2)):
        rng = random.Random(seed * 1_000_003 + stream)
        splits[name] = [{"text": lang.sample_document(rng, rng.randint(lo, hi))} for _ in range(n)]
    return write_splits(out, splits, lang, {
        **config,
        "vocab": lang.vocab,
        "entropy_per_token": lang.true_entropy_per_token(sentences_per_doc=(lo, hi)),
        "entropy_per_word": lang.true_entropy_per_token(sentences_per_doc=(lo, hi),
                                                        include_eos=False),
    })


def cut_documents(lang: SyntheticLanguage, rng: random.Random, n: int, prompt_words: tuple[int, int], *,
                  sentences, record) -> list[dict]:
    """`n` records, each a document of `sentences(rng)` sentences cut after its first k words (k uniform on
    `prompt_words`; documents no longer than k are skipped): `record(prompt, rest)` makes the record."""
    lo, hi = prompt_words
    records: list[dict] = []
    while len(records) < n:
        words = lang.sample_document(rng, sentences(rng)).split()
        k = rng.randint(lo, hi)
        if len(words) > k:
            records.append(record(" ".join(words[:k]), " ".join(words[k:])))
    return records


def write_splits(out: Path, splits: dict[str, list[dict]], lang: SyntheticLanguage, meta: dict[str, Any]) -> dict[str, Any]:
    """Write `<split>.jsonl` for each split, the tokenizer, and last `meta.json`, whose presence
    marks the directory complete (see `existing_meta`). Returns the meta written."""
    if not (out / "meta.json").exists():  # ours from the first file on: another rank writing it at once must see that
        write_atomic(out / "meta.json", json.dumps({"format_version": meta["format_version"], "complete": False}) + "\n")
    for name, records in splits.items():
        write_atomic(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    tokenizer = build_tokenizer(lang)
    save_tokenizer_atomic(tokenizer, out / "tokenizer")
    meta = {**meta, "vocab_size": len(tokenizer)}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def writer_cli(description: str, write, argv: list[str] | None = None, *, extra: dict[str, int] | None = None) -> None:
    """The CLI of a synthetic-data writer: ``OUT_DIR [--seed S] [--n-train N] [--n-eval N] [--<extra> V]``.

    ``write(args)`` writes the data and returns its meta, printed as JSON (without the vocabulary)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out_dir")
    for flag, default in {"seed": 0, "n-train": 2000, "n-eval": 200, **(extra or {})}.items():
        parser.add_argument(f"--{flag}", type=int, default=default)
    args = parser.parse_args(argv)
    meta = {k: v for k, v in write(args).items() if k != "vocab"}
    print(json.dumps({"out_dir": str(args.out_dir), **meta}, indent=2))


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m distill.data.synthetic OUT_DIR [--seed S] [--min-sentences K] ...``."""
    writer_cli("Write the synthetic distillation dataset.", lambda a: write_dataset(
        a.out_dir, seed=a.seed, n_train=a.n_train, n_eval=a.n_eval, sentences_per_doc=(a.min_sentences, a.max_sentences)),
        argv, extra={"min-sentences": 1, "max-sentences": 4})


if __name__ == "__main__":
    main()
