"""`distill.run` from Python: docs/python.md's blocks run as written, a `datasets.Dataset` gives the batches the same
records give from a file, and values another process cannot read are refused by key before anything starts."""
import json
import os
import subprocess
from pathlib import Path

import datasets
import pytest
import torch
import yaml

import distill
from tests.doc_blocks import blocks
from tests.helpers import REPO, TINY_LLAMA, check, python, pythonpath

DOC = REPO / "docs" / "python.md"
BUILT = '''
# A trainer subclass built from the run's recipe.yaml, not trained: the subclass, whatever the recipe names.
class Mine(distill.DistillTrainer): pass
m = Mine.from_recipe("runs/texts_from_python/recipe.yaml", data={"train": splits, "eval": splits}, output_dir="runs/built",
                     log=lambda s: None)
print("from_recipe:", type(m).__name__, list(m.trainables), len(m.data.train))
'''


@pytest.mark.multiprocess
def test_the_python_page_runs(tmp_path):
    code = "".join(b.text for b in blocks(DOC) if b.lang == "python")
    (tmp_path / "page.py").write_text(code + BUILT)
    proc = subprocess.run(python("page.py"), cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": pythonpath(REPO)})
    check(proc)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "from_recipe: Mine ['student'] 256"  # the Dataset's train split
    texts = tmp_path / "runs" / "texts_from_python"
    ce = json.loads((texts / "summary.json").read_text())
    assert f"student eval CE {ce['before']['ce']:.3f} -> {ce['after']['ce']:.3f}" in lines
    assert ce["after"]["ce"] < ce["before"]["ce"]
    saved = yaml.safe_load((texts / "recipe.yaml").read_text())
    assert saved["data"]["train"].startswith("<datasets.DatasetDict train: ") and saved["launch"]["num_processes"] == 1
    grpo = tmp_path / "runs" / "grpo_from_python"
    assert yaml.safe_load((grpo / "recipe.yaml").read_text())["grpo"]["reward_funcs"] == ["__main__:ends_with_bang"]
    logged = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/ends_with_bang" in m for m in logged) and "eval/rewards/ends_with_bang" in logged[0]


def test_a_dataset_gives_the_batches_its_records_give_from_a_file(assets, tmp_path):
    from transformers import AutoTokenizer

    from distill.data.loading import build_text_data
    from tests.helpers import tiny_recipe

    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()[:40]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])

    def batches(train):
        recipe, _ = distill.load_recipe(tiny_recipe(assets, tmp_path / "run", data={"train": train, "eval": None}))
        return [b for step in zip(range(3), build_text_data(recipe, tokenizer, 0, 1).train_batches()) for b in step[1]]

    from_file = batches(str(tmp_path / "train.jsonl"))
    for given in (datasets.Dataset.from_list(rows), datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})):
        got = batches(given)
        assert len(got) == len(from_file) == 6  # 3 steps of 2 micro-batches
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(got, from_file))


def _lm_recipe(tmp_path, **data) -> dict:
    rows = [{"text": "a b c"}] * 8
    return {"trainer": "lm", "output_dir": str(tmp_path / "run"), "model": {"config": TINY_LLAMA},
            "data": {"train": datasets.Dataset.from_list(rows), "tokenizer": str(tmp_path), **data},
            "launch": {"num_processes": 2}}


def test_objects_that_other_processes_cannot_read_are_refused_by_key(tmp_path):
    """With 2 processes to start, a Dataset, a function of __main__ or a lambda, and a trainer class of __main__ are
    refused, naming the key, before any process or lock is taken; an importable function is passed by name."""
    with pytest.raises(distill.RecipeError, match=r"`data.train` is a Dataset, .*save_to_disk"):
        distill.run(_lm_recipe(tmp_path))
    with pytest.raises(distill.RecipeError, match=r"`data.eval` is a Dataset"):
        distill.run(_lm_recipe(tmp_path, train="texts.jsonl", eval=datasets.Dataset.from_list([{"text": "x"}])))

    class Mine(distill.LMTrainer):
        pass

    Mine.__module__ = "__main__"
    with pytest.raises(distill.RecipeError, match=r"`trainer`: .*Mine is defined in __main__"):
        distill.run(_lm_recipe(tmp_path, train="texts.jsonl"), trainer=Mine)
    grpo = {"grpo": {"reward_funcs": ["distill.data.reward_task:end_mark", lambda completions, **kw: [0.0] * len(completions)],
                     "reward_weights": None}, "output_dir": str(tmp_path / "grpo"), "train": {"max_steps": 1}}
    with pytest.raises(distill.RecipeError, match=r"`grpo.reward_funcs\[1\]`: .*lambda.* cannot be imported by name"):
        distill.run("grpo_quickstart", **grpo)
    assert not (tmp_path / "run").exists() and not (tmp_path / "grpo").exists()


def test_reward_functions_given_as_callables_are_the_functions_named():
    from distill.cli.api import portable
    from distill.data.reward_task import end_mark, whole_sentences
    from distill.rl.rewards import load_reward_functions

    recipe, _ = distill.load_recipe("grpo_quickstart", grpo={"reward_funcs": [end_mark, "distill.data.reward_task:whole_sentences"]})
    funcs = load_reward_functions(recipe.grpo.reward_funcs, recipe.grpo.reward_weights)
    assert [(f.fn, f.name, f.weight) for f in funcs] == [(end_mark, "end_mark", 1.0), (whole_sentences, "whole_sentences", 0.5)]
    names = ["distill.data.reward_task:end_mark", "distill.data.reward_task:whole_sentences"]
    assert recipe.model_dump(mode="json")["grpo"]["reward_funcs"] == names  # as recipe.yaml names them
    assert portable(recipe.model_dump())["grpo"]["reward_funcs"] == names  # as launched processes read them
    with pytest.raises(distill.RecipeError, match="share a name"):  # checked as for names: their metrics would mix
        distill.load_recipe("grpo_quickstart", grpo={"reward_funcs": [end_mark, "distill.data.reward_task:end_mark"],
                                                     "reward_weights": None})


def test_load_recipe_takes_a_file_a_name_or_a_mapping_with_keys_and_overrides(tmp_path):
    recipe, cls = distill.load_recipe("quickstart", "train.max_steps=7", train={"max_steps": 5, "log_every": 2})
    assert cls is distill.DistillTrainer and (recipe.train.max_steps, recipe.train.log_every) == (7, 2)  # dotted last
    assert recipe.train.micro_batch_size == 16  # the rest of `train` kept: keys merge
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    again, _ = distill.load_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "out"))
    assert again.train == recipe.train and again.output_dir == str(tmp_path / "out")
    mapping, cls = distill.load_recipe(recipe, trainer=distill.DistillTrainer)
    assert cls is distill.DistillTrainer and mapping.model_dump() == recipe.model_dump()
    with pytest.raises(distill.RecipeError, match="no `trainer:` key"):
        distill.load_recipe({"output_dir": "x", "data": {"train": "x.jsonl"}})
    with pytest.raises(distill.RecipeError, match="unknown key `train.max_step`"):
        distill.load_recipe("quickstart", train={"max_step": 3})


def test_a_resumed_run_must_be_given_the_same_dataset(tmp_path):
    """recipe.yaml names a Dataset by its fingerprint: the same records match, other records are another run's."""
    from distill.loop.rundir import check_resume_identity

    def recipe(texts):
        lm = _lm_recipe(tmp_path) | {"launch": {"num_processes": 1}}
        lm["data"]["train"] = datasets.Dataset.from_list([{"text": t} for t in texts])
        return distill.load_recipe(lm)[0]

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe(["a b", "c d"]).model_dump(mode="json")))
    check_resume_identity(ckpt, recipe(["a b", "c d"]))  # built again from the same records
    with pytest.raises(distill.RecipeError, match=r"data.train: \"<datasets.Dataset \w+: 2 rows.*\" -> \"<datasets.Dataset \w+"):
        check_resume_identity(ckpt, recipe(["a b", "c e"]))
