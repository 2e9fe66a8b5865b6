"""Preference data: both record formats, validation errors, truncation, the pair collator, synthetic pairs."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import processors

from distill.data.preference import (
    PreferenceCollator,
    load_preference_dataset,
    main as preference_main,
    tokenize_preferences,
    write_preference_dataset,
)
from distill.data.synthetic import SyntheticLanguage, build_tokenizer

# Role names are not in the word-level vocabulary and become <unk>; that is fine here.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(SyntheticLanguage(0))


@pytest.fixture(scope="module")
def chat_tok():
    t = build_tokenizer(SyntheticLanguage(0))
    t.chat_template = CHAT_TEMPLATE
    return t


@pytest.fixture(scope="module")
def nobos_tok():
    # Like GPT-2: a bos token exists but is never added.
    t = build_tokenizer(SyntheticLanguage(0))
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return t


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def _tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


PLAIN = [
    {"prompt": "the cat", "chosen": "sleeps .", "rejected": "the ."},
    {"prompt": "a red dog", "chosen": "runs quickly .", "rejected": "book red ."},
]


# -- loading -----------------------------------------------------------------------------
def test_plain_jsonl_parquet_and_directory_load(tmp_path: Path) -> None:
    ds = load_preference_dataset(str(_jsonl(tmp_path / "pairs.jsonl", PLAIN)))
    assert ds.column_names == ["prompt", "chosen", "rejected"] and ds.to_list() == PLAIN
    datasets.Dataset.from_list(PLAIN).to_parquet(str(tmp_path / "pairs.parquet"))
    assert load_preference_dataset(str(tmp_path / "pairs.parquet")).to_list() == PLAIN
    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "train.jsonl", PLAIN)
    _jsonl(tmp_path / "d" / "eval.jsonl", PLAIN[:1])
    assert len(load_preference_dataset(str(tmp_path / "d"), split="eval")) == 1
    with pytest.raises(FileNotFoundError, match="python -m distill.data.preference"):
        load_preference_dataset(str(tmp_path / "nope" / "train.jsonl"))


def test_chat_formats_normalise_to_an_explicit_prompt(tmp_path: Path) -> None:
    user = ("user", "the cat")
    implicit = {"chosen": _msgs(user, ("assistant", "sleeps .")), "rejected": _msgs(user, ("assistant", "the ."))}
    # Multi-turn: everything before the last message is prompt.
    turns = _msgs(("user", "a dog"), ("assistant", "runs ."), ("user", "the cat"))
    multi = {"chosen": turns + _msgs(("assistant", "sleeps .")), "rejected": turns + _msgs(("assistant", "."))}
    ds = load_preference_dataset(str(_jsonl(tmp_path / "chat.jsonl", [implicit, multi])))
    assert ds[0] == {"chosen": _msgs(("assistant", "sleeps .")), "rejected": _msgs(("assistant", "the .")),
                     "prompt": _msgs(user)}
    assert ds[1]["prompt"] == turns and ds[1]["rejected"] == _msgs(("assistant", "."))

    # Explicit prompt; repeating it inside chosen is tolerated.
    explicit = [{"prompt": _msgs(user), "chosen": implicit["chosen"], "rejected": implicit["rejected"][1:]}]
    ds2 = load_preference_dataset(str(_jsonl(tmp_path / "explicit.jsonl", explicit)))
    assert ds2[0] == {"prompt": _msgs(user), "chosen": ds[0]["chosen"], "rejected": ds[0]["rejected"]}


def test_chat_tokenizes_with_the_template(tmp_path: Path, tok, chat_tok) -> None:
    user = ("user", "the cat")
    rec = {"chosen": _msgs(user, ("assistant", "sleeps .")), "rejected": _msgs(user, ("assistant", "the ."))}
    ds = load_preference_dataset(str(_jsonl(tmp_path / "chat.jsonl", [rec])))
    out, stats = tokenize_preferences(ds, chat_tok, max_length=32)
    row = out[0]
    assert _tokens(tok, row["prompt_ids"]) == ["<bos>", "<unk>", "the", "cat", "<unk>"]
    assert _tokens(tok, row["chosen_ids"]) == ["sleeps", ".", "<eos>"]
    assert _tokens(tok, row["rejected_ids"]) == ["the", ".", "<eos>"]
    assert stats == {"n": 1, "prompt_truncated": 0, "response_truncated": 0, "dropped": 0, "max_tokens": 8}
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_preferences(ds, tok, max_length=32)


@pytest.mark.parametrize("records,match", [
    (PLAIN + [{"prompt": "a", "chosen": "b ."}], r"record 2: field 'rejected' is missing"),
    ([PLAIN[0], {**PLAIN[1], "rejected": ""}], r"record 1: field 'rejected' is empty"),
    ([{**PLAIN[0], "chosen": "   "}], r"record 0: field 'chosen' is empty"),
    ([{"chosen": "a", "rejected": "b"}], r"field 'prompt'"),
    ([{"chosen": _msgs(("user", "a"), ("assistant", "b")), "rejected": _msgs(("user", "X"), ("assistant", "c"))}],
     r"record 0: field 'rejected' differs from 'chosen'.*explicit 'prompt'"),
    ([{"chosen": _msgs(("user", "a"), ("assistant", "b")), "rejected": _msgs(("user", "a"), ("assistant", ""))}],
     r"record 0: field 'rejected' is empty"),
    ([{"chosen": _msgs(("user", "a"), ("assistant", "b")), "rejected": _msgs(("user", "a"), ("user", "c"))}],
     r"record 0: field 'rejected' must end with an assistant message"),
])
def test_bad_records_name_the_record_and_field(tmp_path: Path, records, match) -> None:
    with pytest.raises(ValueError, match=match):
        load_preference_dataset(str(_jsonl(tmp_path / "bad.jsonl", records)))


def test_chosen_equal_to_rejected_is_allowed() -> None:
    ds = datasets.Dataset.from_list([{"prompt": "the", "chosen": "cat .", "rejected": "cat ."}])
    out, _ = tokenize_preferences(ds, build_tokenizer(SyntheticLanguage(0)), max_length=8)
    assert out[0]["chosen_ids"] == out[0]["rejected_ids"]


# -- tokenising and truncation -----------------------------------------------------------------
def _words(n: int, offset: int = 0) -> list[str]:
    vocab = SyntheticLanguage(0).vocab
    return [vocab[(offset + i) % len(vocab)] for i in range(n)]


def test_truncation_rules_and_counts(tok) -> None:
    long_prompt, long_resp = _words(10), _words(12, offset=20)
    ds = datasets.Dataset.from_list([
        {"prompt": " ".join(long_prompt), "chosen": "sleeps .", "rejected": "runs ."},  # prompt cut
        {"prompt": "the cat", "chosen": " ".join(long_resp), "rejected": "runs ."},  # chosen cut
        {"prompt": "the cat", "chosen": "sleeps .", "rejected": "runs ."},  # untouched
    ])
    out, stats = tokenize_preferences(ds, tok, max_length=10, max_prompt_length=5)
    assert stats == {"n": 3, "prompt_truncated": 1, "response_truncated": 1, "dropped": 0, "max_tokens": 16}
    ids = tok.convert_tokens_to_ids
    # Prompt: bos kept, then its LAST 4 words; responses intact with eos.
    assert out[0]["prompt_ids"] == ids(["<bos>"] + long_prompt[-4:])
    assert out[0]["chosen_ids"] == ids(["sleeps", ".", "<eos>"])
    # Response: its FIRST max_length - len(prompt) = 7 tokens, eos lost; the other side is intact.
    assert out[1]["prompt_ids"] == ids(["<bos>", "the", "cat"])
    assert out[1]["chosen_ids"] == ids(long_resp[:7])
    assert out[1]["rejected_ids"] == ids(["runs", ".", "<eos>"])
    assert out[2] == {"prompt_ids": ids(["<bos>", "the", "cat"]), "chosen_ids": ids(["sleeps", ".", "<eos>"]),
                      "rejected_ids": ids(["runs", ".", "<eos>"])}
    for row in out:
        for side in ("chosen_ids", "rejected_ids"):
            assert len(row["prompt_ids"]) + len(row[side]) <= 10
    # Default max_prompt_length is max_length // 2.
    _, default_stats = tokenize_preferences(ds, tok, max_length=12)
    assert default_stats["prompt_truncated"] == 1


def test_pairs_without_room_for_a_response_are_dropped(tok) -> None:
    ds = datasets.Dataset.from_list([
        {"prompt": " ".join(_words(8)), "chosen": "sleeps .", "rejected": "runs ."},
        {"prompt": "the cat", "chosen": "sleeps .", "rejected": "runs ."},
    ])
    out, stats = tokenize_preferences(ds, tok, max_length=6, max_prompt_length=6)
    assert stats == {"n": 1, "prompt_truncated": 0, "response_truncated": 0, "dropped": 1, "max_tokens": 12}
    assert len(out) == 1 and out[0]["prompt_ids"] == tok.convert_tokens_to_ids(["<bos>", "the", "cat"])
    with pytest.raises(ValueError, match="max_prompt_length <= max_length"):
        tokenize_preferences(ds, tok, max_length=6, max_prompt_length=7)


def test_tokenizer_without_bos(nobos_tok) -> None:
    ds = datasets.Dataset.from_list([{"prompt": " ".join(_words(6)), "chosen": "sleeps .", "rejected": "runs ."}])
    out, stats = tokenize_preferences(ds, nobos_tok, max_length=8, max_prompt_length=4)
    assert out[0]["prompt_ids"] == nobos_tok.convert_tokens_to_ids(_words(6)[-4:])
    assert stats["prompt_truncated"] == 1
    empty = datasets.Dataset.from_list([{"prompt": "", "chosen": "sleeps .", "rejected": "runs ."}])
    with pytest.raises(ValueError, match="record 0: empty prompt"):
        tokenize_preferences(empty, nobos_tok, max_length=8)


# -- collator -------------------------------------------------------------------------------
def _manual_labels(prompt: list[int], response: list[int], width: int) -> list[int]:
    seq = prompt + response
    labels = [-100] * width
    for t in range(len(seq) - 1):
        if t + 1 >= len(prompt):
            labels[t] = seq[t + 1]
    return labels


def test_collator_layout_and_labels() -> None:
    examples = [
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
        {"prompt_ids": [1, 5], "chosen_ids": [10, 11, 12, 13, 2], "rejected_ids": [14, 2]},
        {"prompt_ids": torch.tensor([1]), "chosen_ids": torch.tensor([15, 2]), "rejected_ids": torch.tensor([16])},
    ]
    batch = PreferenceCollator(0, pad_to_multiple_of=4)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    n_pairs = batch["input_ids"].shape[0] // 2
    assert n_pairs == 3 and batch["input_ids"].shape == (6, 8)
    as_list = [{k: list(map(int, v)) for k, v in ex.items()} for ex in examples]
    for half, side in enumerate(("chosen_ids", "rejected_ids")):
        for b, ex in enumerate(as_list):
            r = half * n_pairs + b
            seq = ex["prompt_ids"] + ex[side]
            assert batch["input_ids"][r].tolist() == seq + [0] * (8 - len(seq))
            assert batch["attention_mask"][r].tolist() == [1] * len(seq) + [0] * (8 - len(seq))
            assert batch["labels"][r].tolist() == _manual_labels(ex["prompt_ids"], ex[side], 8)
    with pytest.raises(ValueError, match="empty batch"):
        PreferenceCollator(0)([])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        PreferenceCollator(None)


def test_collator_labels_select_response_logps() -> None:
    # Summing gathered log-probs over labels != -100 must cover exactly the response tokens.
    examples = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]}]
    batch = PreferenceCollator(0)(examples)
    logits = torch.randn(2, batch["input_ids"].shape[1], 20, dtype=torch.float64)
    logp = logits.log_softmax(-1)
    mask = batch["labels"] != -100
    gathered = logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_seq = (gathered * mask).sum(-1)
    chosen = sum(logp[0, 2 + i, tok].item() for i, tok in enumerate([7, 8, 2]))
    rejected = sum(logp[1, 2 + i, tok].item() for i, tok in enumerate([9, 2]))
    torch.testing.assert_close(per_seq, torch.tensor([chosen, rejected], dtype=torch.float64))


# -- synthetic pairs ----------------------------------------------------------------------------
def test_synthetic_pairs(tmp_path: Path, tok) -> None:
    meta = write_preference_dataset(tmp_path / "a", seed=0, n_train=120, n_eval=20)
    write_preference_dataset(tmp_path / "b", seed=0, n_train=120, n_eval=20)
    write_preference_dataset(tmp_path / "c", seed=1, n_train=120, n_eval=20)
    train = (tmp_path / "a" / "train.jsonl").read_text()
    assert train == (tmp_path / "b" / "train.jsonl").read_text()
    assert train != (tmp_path / "c" / "train.jsonl").read_text()
    assert (tmp_path / "a" / "eval.jsonl").read_text() != train

    # Idempotent: a second call with the same settings rewrites nothing.
    stamp = (tmp_path / "a" / "train.jsonl").stat().st_mtime_ns
    assert write_preference_dataset(tmp_path / "a", seed=0, n_train=120, n_eval=20) == meta
    assert (tmp_path / "a" / "train.jsonl").stat().st_mtime_ns == stamp

    lang = SyntheticLanguage(0)
    records = [json.loads(line) for line in train.splitlines()]
    assert len(records) == 120
    for rec in records:
        prompt, chosen, rejected = (rec[k].split() for k in ("prompt", "chosen", "rejected"))
        assert 3 <= len(prompt) <= 8 and 2 <= len(chosen) <= 24
        assert len(rejected) == len(chosen) and rejected != chosen
        lang.state_after(prompt + chosen)  # the chosen continuation is grammatical
    assert meta["rejected_grammatical_fraction"] < 0.2

    ds = load_preference_dataset(str(tmp_path / "a"), split="eval")
    out, stats = tokenize_preferences(ds, tok, max_length=64)
    assert stats["n"] == 20 and stats["response_truncated"] == stats["dropped"] == 0
    assert all(len(r["chosen_ids"]) == len(r["rejected_ids"]) for r in out)


def test_synthetic_cli(tmp_path: Path, capsys) -> None:
    preference_main([str(tmp_path / "cli"), "--seed", "2", "--n-train", "10", "--n-eval", "3"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 2 and printed["n_train"] == 10
    assert len((tmp_path / "cli" / "eval.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "cli" / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"prompt_words": (0, 3)}, "prompt_words"),
    ({"replace_prob": 0.0}, "replace_prob"),
    ({"prompt_words": (200, 200)}, "no 1-3 sentence document fits"),
])
def test_synthetic_bad_settings(tmp_path: Path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        write_preference_dataset(tmp_path, n_train=2, n_eval=1, **kwargs)
