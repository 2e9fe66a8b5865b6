"""A user's own data: never written over, each split read from its own place, hub keys, eos at document ends."""
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill.config.recipe import validate_recipe
from distill.config.errors import RecipeError
from distill.data.loading import build_text_data, ensure_synthetic, source_options, tokenized_splits
from distill.data.text import load_text_dataset
from distill.loop.preflight import preflight
from distill.trainers.distill import DistillTrainer
from tests.helpers import bpe_tokenizer, tiny_recipe


def _digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_synthetic_seed_never_writes_over_a_users_files(assets, tmp_path, capsys):
    from distill.cli.train import main

    mine = tmp_path / "mine"
    _jsonl(mine / "train.jsonl", ["the cat sees the dog ."] * 40)
    _jsonl(mine / "eval.jsonl", ["bob sleeps ."] * 8)
    before = _digest(mine)
    raw = tiny_recipe(assets, tmp_path / "run", data={"train": str(mine / "train.jsonl"), "eval": str(mine / "eval.jsonl"),
                                                      "synthetic_seed": 0, "tokenizer": assets["tokenizer"]})
    preflight(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)
    (tmp_path / "r.yaml").write_text(json.dumps(raw))
    assert main([str(tmp_path / "r.yaml"), "--dry-run"]) == 0
    assert _digest(mine) == before  # no meta.json, no tokenizer/, the files as they were
    assert "wrote the synthetic data" not in capsys.readouterr().out

    # Files elsewhere in the directory, but not the named ones: refused, nothing written.
    raw["data"].update(train=str(mine / "other" / "train.jsonl"), eval=str(mine / "other" / "eval.jsonl"))
    (mine / "other").mkdir()
    (mine / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="only into a directory that does not exist yet.*notes.txt"):
        preflight(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)
    assert sorted(p.name for p in (mine / "other").iterdir()) == ["notes.txt"]
    # Names the writer would not produce: refused before anything is written.
    raw["data"].update(train=str(tmp_path / "new" / "mine.jsonl"), eval=None)
    with pytest.raises(RecipeError, match="`data.train: .*mine.jsonl` is not there"):
        preflight(validate_recipe(raw, DistillTrainer), DistillTrainer, world_size=1, dry_run=True)
    assert not (tmp_path / "new").exists()


def test_synthetic_data_is_written_only_where_no_directory_is(assets, tmp_path):
    target = tmp_path / "data" / "prompts"
    raw = tiny_recipe(assets, tmp_path / "run", kd={"on_policy": {"max_new_tokens": 8}},
                      data={"train": str(target / "train.jsonl"), "eval": str(target / "eval.jsonl"), "synthetic_seed": 3})
    recipe = validate_recipe(raw, DistillTrainer)
    assert ensure_synthetic(recipe, DistillTrainer.write_synthetic) == target
    assert {"train.jsonl", "eval.jsonl", "meta.json", "tokenizer"} <= {p.name for p in target.iterdir()}
    assert "prompt" in json.loads((target / "train.jsonl").read_text().splitlines()[0])
    assert not list(target.parent.glob(".*tmp"))  # written beside, then renamed into place
    written = _digest(target)
    # The same directory in an offline recipe (text data by default): used as it is, not rewritten as text.
    offline = validate_recipe({**raw, "kd": {"alpha": 0.5}}, DistillTrainer)
    assert ensure_synthetic(offline, DistillTrainer.write_synthetic) is None
    assert _digest(target) == written


def test_synthetic_writers_refuse_a_directory_of_someone_elses_data(tmp_path):
    from distill.data.preference import write_preference_dataset
    from distill.data.synthetic import write_dataset

    _jsonl(tmp_path / "train.jsonl", ["my own text"])
    before = _digest(tmp_path)
    for write in (write_dataset, write_preference_dataset):
        with pytest.raises(FileExistsError, match="distill did not write"):
            write(tmp_path, n_train=4, n_eval=2)
    assert _digest(tmp_path) == before


def _data(**kw):
    return SimpleNamespace(**{"train": None, "eval": None, "train_split": "train", "eval_split": None,
                              "dataset_config": None, "revision": None, **kw})


def _texts(data, key):
    return load_text_dataset(getattr(data, key), **source_options(data, key))["text"]


def test_eval_reads_its_own_split_from_directories_and_saved_datasets(tmp_path):
    import datasets

    files = tmp_path / "files"
    _jsonl(files / "train.jsonl", ["train a", "train b"])
    _jsonl(files / "validation.jsonl", ["held out"])
    data = _data(train=str(files), eval=str(files))
    assert _texts(data, "train") == ["train a", "train b"]
    assert _texts(data, "eval") == ["held out"]  # was the train split

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}),
                          "test": datasets.Dataset.from_dict({"text": ["e1"]})}).save_to_disk(str(saved))
    data = _data(train=str(saved), eval=str(saved))
    assert (_texts(data, "train"), _texts(data, "eval")) == (["t1", "t2"], ["e1"])
    data.eval_split = "train"  # asked for by name: allowed
    assert _texts(data, "eval") == ["t1", "t2"]
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["only"]}).save_to_disk(str(single))  # once refused: "use load_from_disk"
    assert _texts(_data(train=str(single)), "train") == ["only"]

    # No evaluation split: an error naming the key, never the train split.
    only_train = tmp_path / "only_train"
    _jsonl(only_train / "train.jsonl", ["x"])
    data = _data(train=str(only_train), eval=str(only_train))
    with pytest.raises(RecipeError, match="`data.eval`: .*(no evaluation|eval_split)"):
        list(tokenized_splits(data, lambda src, opts: (load_text_dataset(src, **opts), {})))
    single_dd = tmp_path / "dd_train_only"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]})}).save_to_disk(str(single_dd))
    with pytest.raises(ValueError, match=r"no evaluation split.*\['train'\].*data.eval_split"):
        _texts(_data(eval=str(single_dd)), "eval")


def test_prompt_and_preference_eval_read_their_own_split(tmp_path):
    from distill.data.preference import load_preference_dataset
    from distill.data.prompts import load_prompt_dataset

    d = tmp_path / "p"
    for split in ("train", "eval"):
        (d / f"{split}.jsonl").parent.mkdir(exist_ok=True)
        (d / f"{split}.jsonl").write_text(json.dumps({"prompt": split, "completion": " c", "chosen": " a",
                                                      "rejected": " b"}) + "\n")
    data = _data(train=str(d), eval=str(d))
    for load in (load_prompt_dataset, load_preference_dataset):
        assert load(str(d), **source_options(data, "train"))["prompt"] == ["train"]
        assert load(str(d), **source_options(data, "eval"))["prompt"] == ["eval"]


def test_hub_dataset_that_cannot_load_is_a_recipe_error_naming_the_key(monkeypatch):
    import datasets
    import huggingface_hub.constants

    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    for name in ("distill-tests-no-such-org/no-such-dataset", "distill-tests-no-such-dataset"):
        data = _data(train=name, dataset_config="sub", revision="v1")
        with pytest.raises(RecipeError) as e:  # was the loader's own exception and traceback for a name without "/"
            list(tokenized_splits(data, lambda src, opts: (load_text_dataset(src, **opts), {})))
        msg = str(e.value)
        assert msg.startswith("`data.train`:") and "hub dataset" in msg and "offline" in msg, msg


def test_text_data_ends_with_eos_for_tokenizers_that_add_none(assets, tmp_path):
    from transformers import AutoTokenizer

    tok = bpe_tokenizer(tmp_path / "tok")
    assert tok("a b")["input_ids"][-1] != tok.eos_token_id  # GPT-2 style: no special tokens added
    texts = ["The quick brown fox.", "Where there's a will."]
    raw = tiny_recipe(assets, tmp_path / "run", data={"train": str(_jsonl(tmp_path / "t.jsonl", texts * 4)), "eval": None})
    recipe = validate_recipe(raw, DistillTrainer)
    ends = lambda r, t: [ids[-1] for ids in build_text_data(r, t, 0, 1).train["input_ids"]]  # noqa: E731
    assert set(ends(recipe, tok)) == {tok.eos_token_id}
    off = validate_recipe({**raw, "data": {**raw["data"], "append_eos": False}}, DistillTrainer)
    assert tok.eos_token_id not in ends(off, tok)
    # A tokenizer that adds eos itself gets no second one.
    synthetic = AutoTokenizer.from_pretrained(assets["tokenizer"])
    rows = build_text_data(recipe, synthetic, 0, 1).train["input_ids"]
    assert all(r[-1] == synthetic.eos_token_id != r[-2] for r in rows)
