"""Tests for distill.data: synthetic language, tokenizer, loading, collation."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from distill.data import (
    CausalCollator,
    SyntheticLanguage,
    build_tokenizer,
    load_text_dataset,
    make_dataloader,
    tokenize_dataset,
    write_dataset,
)
from distill.data.synthetic import EOS, main as synthetic_main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(out, seed=0, n_train=64, n_eval=16)
    return out


# -- synthetic language ---------------------------------------------------------
def test_language_deterministic_per_seed() -> None:
    def docs(seed: int) -> list[str]:
        lang, rng = SyntheticLanguage(seed), random.Random(7)
        return [lang.sample_document(rng, 3) for _ in range(20)]

    assert docs(0) == docs(0)
    assert docs(0) != docs(1)
    assert SyntheticLanguage(0).next_word_distribution([]) == SyntheticLanguage(0).next_word_distribution([])
    assert SyntheticLanguage(0).next_word_distribution([]) != SyntheticLanguage(1).next_word_distribution([])
    assert SyntheticLanguage(0).vocab == SyntheticLanguage(1).vocab


def test_documents_use_vocab_and_end_sentences() -> None:
    lang, rng = SyntheticLanguage(3), random.Random(0)
    for n in (1, 2, 4):
        words = lang.sample_document(rng, n).split()
        assert set(words) <= set(lang.vocab)
        assert sum(w in {".", "!", "?"} for w in words) == n
        assert words[-1] in {".", "!", "?"}
        lang.state_after(words)  # every sampled prefix is grammatical


@pytest.mark.parametrize("prefix", [[], ["the"], ["alice"], ["the", "tree"], ["bob", "reads", "a"]])
def test_next_word_distribution_matches_samples(prefix: list[str]) -> None:
    lang, rng = SyntheticLanguage(0), random.Random(1)
    dist = lang.next_word_distribution(prefix)
    assert math.isclose(sum(dist.values()), 1.0, abs_tol=1e-9)
    assert lang.next_word_distribution(["<bos>", *prefix]) == dist

    # Rejection sampling from sentence starts checks that the prefix -> state
    # resolution of next_word_distribution agrees with what the generator does.
    counts: Counter[str] = Counter()
    k = len(prefix)
    while sum(counts.values()) < 1500:
        words = lang.sample_sentence(rng)
        if words[:k] == prefix:
            counts[words[k]] += 1
    n = sum(counts.values())
    assert set(counts) <= set(dist)
    chi2 = sum((counts[w] - n * p) ** 2 / (n * p) for w, p in dist.items())
    df = max(len(dist) - 1, 1)
    # Generous bound (~df + 6 sd) so the test is robust yet catches wrong tables.
    assert chi2 < df + 6 * math.sqrt(2 * df) + 5, (chi2, counts, dist)


def test_deterministic_steps_and_eos() -> None:
    lang = SyntheticLanguage(0)
    assert lang.next_word_distribution(["the", "cat", "sleeps", "near"]) == {"the": 1.0}
    assert lang.next_word_distribution(["bob", "reads", "the"]) == {"book": 1.0}
    with pytest.raises(ValueError, match="impossible"):
        lang.next_word_distribution(["cat", "the"])
    # Uniform 1..4 sentences: after one sentence P(eos) = 1/4, after 4 it is 1.
    d1 = lang.next_token_distribution(["the", "cat", "sleeps", "."], (1, 4))
    assert math.isclose(d1[EOS], 0.25) and math.isclose(sum(d1.values()), 1.0)
    d4 = lang.next_token_distribution(["alice", "runs", "."] * 4, (1, 4))
    assert d4 == {EOS: 1.0}
    assert EOS not in lang.next_token_distribution(["alice", "runs", ",", "and"], (1, 4))


def test_entropy_rate_estimate() -> None:
    lang = SyntheticLanguage(0)
    h = lang.true_entropy_per_token(n_docs=500)
    assert 0.5 < h < math.log(len(lang.vocab) + 1)
    assert math.isclose(h, lang.true_entropy_per_token(n_docs=500), rel_tol=0)  # seeded
    # The MC estimate agrees with -log p of sampled tokens (a different estimator).
    rng, nll, count = random.Random(5), 0.0, 0
    for _ in range(1500):
        words = lang.sample_document(rng, rng.randint(1, 4)).split() + [EOS]
        for i, w in enumerate(words):
            nll -= math.log(lang.next_token_distribution(words[:i], (1, 4))[w])
            count += 1
    assert abs(nll / count - lang.true_entropy_per_token(n_docs=1500)) < 0.05



@pytest.mark.parametrize("include_eos", [True, False])
def test_entropy_estimate_is_the_mean_entropy_of_the_visited_predictions(include_eos) -> None:
    """The estimate, against the slow way: walk the same seeded documents (`sample_document` draws the words the
    estimate draws) and average the entropy of every true prediction made on the way, each one summed afresh.
    (3, 6) sentences: <eos> has a different chance after each of sentences 3..6, which the estimate must tell apart."""
    lang, spd = SyntheticLanguage(0), (3, 6)
    rng, total, count = random.Random(7), 0.0, 0
    for _ in range(300):
        n = rng.randint(*spd)
        words = lang.sample_document(rng, n).split()
        for i in range(len(words) + include_eos):
            dist = (lang.next_token_distribution(words[:i], spd) if include_eos
                    else lang.next_word_distribution(words[:i]))
            total -= sum(p * math.log(p) for p in dist.values() if p > 0)
            count += 1
    estimate = lang.true_entropy_per_token(300, seed=7, sentences_per_doc=spd, include_eos=include_eos)
    assert estimate == pytest.approx(total / count, rel=1e-12, abs=0)

# -- tokenizer ----------------------------------------------------------------------
def test_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    lang = SyntheticLanguage(0)
    tok = build_tokenizer(lang)
    assert len(tok) < 64 and len(tok) == len(lang.vocab) + 4
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.pad_token_id == 0
    text = "the red cat sees a small dog ."
    ids = loaded(text)["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    assert len(ids) == len(text.split()) + 2 and loaded.unk_token_id not in ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert {loaded.bos_token, loaded.eos_token, loaded.unk_token} == {"<bos>", "<eos>", "<unk>"}


# -- write_dataset / loading --------------------------------------------------------
def test_write_dataset_files_and_idempotence(data_dir: Path) -> None:
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["n_train"] == 64 and meta["vocab_size"] < 64
    assert 0.5 < meta["entropy_per_token"] < 4.0
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    assert len(lines) == 64 and all("text" in json.loads(line) for line in lines)
    mtime = (data_dir / "train.jsonl").stat().st_mtime_ns
    assert write_dataset(data_dir, seed=0, n_train=64, n_eval=16) == meta
    assert (data_dir / "train.jsonl").stat().st_mtime_ns == mtime  # skipped


def test_a_reader_never_sees_a_partly_written_file_while_the_data_is_written_again(tmp_path: Path) -> None:
    # Each rank of a launch writes the same data directory; another rank may load it meanwhile.
    import threading

    from distill.data.preference import write_preference_dataset

    write_preference_dataset(tmp_path, seed=0, n_train=8, n_eval=2)
    files = [tmp_path / "train.jsonl", *sorted((tmp_path / "tokenizer").iterdir())]
    whole = {f: f.read_text() for f in files}
    seen, done = [], threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.extend(f.name for f in files if f.read_text() != whole[f])

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(40):
        (tmp_path / "meta.json").write_text('{"format_version": 1}')  # another writer's config: all is written again
        write_preference_dataset(tmp_path, seed=0, n_train=8, n_eval=2)
    done.set()
    reader.join()
    assert not seen, f"partly written: {sorted(set(seen))}"


def test_a_writer_marks_the_directory_ours_before_its_first_data_file(tmp_path: Path, monkeypatch) -> None:
    # Another rank writing the same directory at once finds the mark and writes too, instead of refusing the half-
    # written directory as someone else's data.
    import distill.data.synthetic as synthetic

    written, write = [], synthetic.write_atomic
    monkeypatch.setattr(synthetic, "write_atomic", lambda path, text: (written.append(path.name), write(path, text)))
    write_dataset(tmp_path, seed=0, n_train=8, n_eval=2)
    assert written[0] == written[-1] == "meta.json" and "train.jsonl" in written
    assert json.loads((tmp_path / "meta.json").read_text())["n_train"] == 8  # the mark replaced by the whole meta


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic_main([str(tmp_path), "--seed", "2", "--n-train", "5", "--n-eval", "3"])
    assert json.loads(capsys.readouterr().out)["seed"] == 2
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 3


def test_load_jsonl_dir_and_parquet(data_dir: Path, tmp_path: Path) -> None:
    train = load_text_dataset(str(data_dir / "train.jsonl"))
    assert len(train) == 64 and train.column_names == ["text"]
    assert len(load_text_dataset(str(data_dir), split="eval")) == 16
    assert load_text_dataset(str(data_dir))["text"] == train["text"]
    pq = tmp_path / "train.parquet"
    train.to_parquet(str(pq))
    assert load_text_dataset(str(pq))["text"] == train["text"]
    txt = tmp_path / "lines.txt"
    txt.write_text("the cat runs .\nbob sleeps .\n")
    assert load_text_dataset(str(txt))["text"] == ["the cat runs .", "bob sleeps ."]


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match="nope/train.jsonl") as info:
        load_text_dataset(str(missing))
    assert "python -m distill.data.synthetic" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_text_dataset("missing.jsonl")

    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(ValueError, match=r"'text'.*\['body', 'id'\]"):
        load_text_dataset(str(other))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text_dataset(str(empty))


# -- tokenisation ------------------------------------------------------------------
def test_tokenize_counts_truncation(data_dir: Path) -> None:
    tok = build_tokenizer(SyntheticLanguage(0))
    ds = load_text_dataset(str(data_dir / "train.jsonl"))
    lengths = [len(t.split()) + 2 for t in ds["text"]]
    max_length = sorted(lengths)[len(lengths) // 2]
    out, stats = tokenize_dataset(ds, tok, max_length=max_length)
    assert out.column_names == ["input_ids"]
    assert stats["n"] == 64 and stats["truncated"] == sum(n > max_length for n in lengths) > 0
    assert stats["max_tokens"] == max(lengths)
    assert all(len(ids) == min(n, max_length) for ids, n in zip(out["input_ids"], lengths))
    assert out[0]["input_ids"][0] == tok.bos_token_id
    _, stats = tokenize_dataset(ds, tok, max_length=1000)
    assert stats["truncated"] == 0 and stats["tokens"] == sum(lengths)


# -- collator --------------------------------------------------------------------
def _manual_labels(ids: list[list[int]], width: int, keep: list[list[bool]] | None = None) -> torch.Tensor:
    out = torch.full((len(ids), width), -100)
    for b, seq in enumerate(ids):
        for t in range(len(seq) - 1):
            if keep is None or keep[b][t + 1]:
                out[b, t] = seq[t + 1]
    return out


def test_collator_shifted_labels_and_padding() -> None:
    ids = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 10, 11, 12, 13, 2]]
    batch = CausalCollator(0)([{"input_ids": s} for s in ids])
    assert batch["input_ids"].shape == (3, 7)
    assert all(v.dtype == torch.long for v in batch.values())
    assert torch.equal(batch["labels"], _manual_labels(ids, 7))
    assert batch["attention_mask"].sum(1).tolist() == [5, 3, 7]
    assert batch["input_ids"][1, 3:].tolist() == [0] * 4
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # The convention: logits[:, t] predicts labels[:, t] == input_ids[:, t + 1].
    real = batch["labels"][:, :-1] != -100
    assert torch.equal(batch["labels"][:, :-1][real], batch["input_ids"][:, 1:][real])


def test_collator_prompt_and_loss_masks() -> None:
    ids = [[1, 5, 6, 7, 8, 2], [1, 9, 10, 2]]
    examples = [
        {"input_ids": ids[0], "prompt_length": 3},
        {"input_ids": ids[1], "loss_mask": [0, 1, 0, 1]},
    ]
    keep = [[t >= 3 for t in range(6)], [False, True, False, True]]
    batch = CausalCollator(0, ignore_index=-7)(examples)
    expected = _manual_labels(ids, 6, keep)
    expected[expected == -100] = -7
    assert torch.equal(batch["labels"], expected)
    # Unshifted HF-style labels are honoured and shifted.
    hf = CausalCollator(0)([{"input_ids": ids[0], "labels": [-100, -100, 6, 7, 8, 2]}])
    assert hf["labels"][0].tolist() == [-100, 6, 7, 8, 2, -100]


def test_collator_lengths() -> None:
    examples = [{"input_ids": torch.tensor([1, 5, 6, 2])}, {"input_ids": [1, 2]}]
    assert CausalCollator(0, pad_to_multiple_of=8)(examples)["input_ids"].shape == (2, 8)
    fixed = CausalCollator(0, fixed_length=16)(examples)
    assert {k: tuple(v.shape) for k, v in fixed.items()} == {k: (2, 16) for k in fixed}
    cut = CausalCollator(0, fixed_length=3)(examples)
    assert cut["input_ids"].tolist() == [[1, 5, 6], [1, 2, 0]]
    assert cut["labels"].tolist() == [[5, 6, -100], [2, -100, -100]]
    assert CausalCollator(0, max_length=2)(examples)["input_ids"].shape == (2, 2)
    with pytest.raises(ValueError):
        CausalCollator(0, fixed_length=12, pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="pad_token_id"):
        CausalCollator(None)


def test_make_dataloader_seeded(data_dir: Path) -> None:
    tok = build_tokenizer(SyntheticLanguage(0))
    ds, _ = tokenize_dataset(load_text_dataset(str(data_dir / "train.jsonl")), tok, max_length=64)
    collator = CausalCollator(tok.pad_token_id, fixed_length=64)

    def first_ids(seed: int) -> torch.Tensor:
        loader = make_dataloader(ds, collator, batch_size=8, shuffle=True, seed=seed, drop_last=True)
        return next(iter(loader))["input_ids"]

    assert first_ids(0).shape == (8, 64)
    assert torch.equal(first_ids(0), first_ids(0))
    assert not torch.equal(first_ids(0), first_ids(1))
