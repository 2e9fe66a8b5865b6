"""Every fenced code block of README.md and docs/*.md runs, or says why not (rules in tests/doc_blocks.py)."""
import json
import os
import subprocess

import pytest
import yaml

from tests.helpers import python, pythonpath, tiny_recipe
from tests.doc_blocks import (REPO, SHELL, Block, Unrunnable, blocks, check_block, classify, doc_files,
                                        shell_commands)


def _all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in blocks(path)]


def _page_dir(tmp_path, page) -> str:
    """A fresh working directory for one page, with the repository's recipes, configs and assets."""
    d = tmp_path / page.stem
    d.mkdir()
    for name in ("recipes", "configs", "assets"):
        (d / name).symlink_to(REPO / name)
    return str(d)


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": pythonpath(REPO), **extra}


def test_every_block_is_marked_or_runnable():
    problems = []
    for b in _all_blocks():
        try:
            check_block(b)
            if b.mark is None and b.lang in SHELL:
                shell_commands(b)
            if b.mark is None and b.lang == "yaml":
                yaml.safe_load(b.text)
            if b.mark is None and b.lang == "jsonl":
                [json.loads(line) for line in b.text.splitlines() if line.strip()]
        except (Unrunnable, yaml.YAMLError, json.JSONDecodeError) as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


def test_docs_blocks_run(assets, tmp_path):
    pages: dict = {}
    for b in _all_blocks():
        check_block(b)
        if b.mark != "skip" and b.lang != "text":
            pages.setdefault(b.path, []).append(b)
    jobs, python_runs, run_dir = [], [], None
    for page, page_blocks in pages.items():
        cwd = _page_dir(tmp_path, page)
        for b in page_blocks:
            if b.mark == "save":
                (tmp_path / page.stem / b.arg).write_text(b.text)
        script = "".join(f"# {b.where}\n{b.text}" for b in page_blocks if b.lang == "python" and b.mark is None)
        if script:
            python_runs.append((page, cwd, script))
        for b in page_blocks:
            if b.lang not in SHELL or b.mark is not None:
                continue
            for c in shell_commands(b):
                argv = c.argv
                if c.kind in ("report", "export"):  # on a run this test trains, in place of the directory named
                    run_dir = run_dir or _tiny_run(assets, tmp_path)
                    argv = [run_dir] + ([str(tmp_path / f"export{len(jobs)}")] if c.kind == "export" else []) + \
                        [a for a in argv[2 if c.kind == "export" else 1:]]
                jobs.append({"cwd": cwd, "kind": c.kind, "argv": argv, "env": c.env, "where": c.block.where, "text": c.text})
    assert jobs and python_runs  # the docs do show both; an empty run would mean the extraction broke

    failures = []
    for page, cwd, script in python_runs:
        (tmp_path / f"{page.stem}_blocks.py").write_text(script)
        with open(tmp_path / f"{page.stem}_blocks.log", "w") as log:
            proc = subprocess.run(python(str(tmp_path / f"{page.stem}_blocks.py")), cwd=cwd, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=300, env=_env())
        if proc.returncode:
            failures.append(f"python blocks of {page.name}: exit {proc.returncode}\n"
                            f"{(tmp_path / f'{page.stem}_blocks.log').read_text()[-3000:]}")

    # Each distinct command once, all in one interpreter: a dry run costs well under a second there.
    unique = list({json.dumps([j["cwd"], j["kind"], j["argv"], j["env"]]): j for j in jobs}.values())
    (tmp_path / "jobs.json").write_text(json.dumps(unique))
    with open(tmp_path / "batch.log", "w") as log:
        proc = subprocess.run(python("-m", "tests.doc_blocks", str(tmp_path / "jobs.json"),
                               str(tmp_path / "results.json")), stdout=log, stderr=subprocess.STDOUT, timeout=600,
                              env=_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, (tmp_path / "batch.log").read_text()[-4000:]
    for job, result in zip(unique, json.loads((tmp_path / "results.json").read_text())):
        if result["rc"] != 0:
            failures.append(f"{job['where']}: `{job['text']}` (run as {job['kind']} {job['argv']}) exited "
                            f"{result['rc']}:\n{result['output']}")
        elif job["kind"] == "train":
            assert "dry run: no weights loaded" in result["output"], result["output"]
    assert not failures, "\n\n".join(failures)
    print(f"{len(python_runs)} pages of python blocks, {len(jobs)} commands ({len(unique)} distinct):",
          *[f"{j['where']}: {j['text']}" for j in jobs], sep="\n  ")
    assert {j["kind"] for j in unique} >= {"train", "report", "export"}


def _tiny_run(assets, tmp_path) -> str:
    raw = tiny_recipe(assets, tmp_path / "tiny_run", train={"max_steps": 2, "report_to": "none"},
                      launch={"num_processes": 1})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    with open(tmp_path / "tiny.log", "w") as log:
        proc = subprocess.run(python("-m", "distill.train", str(tmp_path / "tiny.yaml")), stdout=log,
                              stderr=subprocess.STDOUT, timeout=300, env=_env())
    assert proc.returncode == 0, (tmp_path / "tiny.log").read_text()[-4000:]
    return str(tmp_path / "tiny_run")


def test_unmarked_and_unknown_blocks_are_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```\nsome output\n```\n\n```bash\npip install x\n```\n\n<!-- docs-test: skip -->\n```bash\nls\n```\n"
                    "\n<!-- docs-test: skip (needs 8 GPUs) -->\n```bash\nls\n```\n"
                    "\n```bash\ntorchrun --nproc_per_node 2 distill/train.py r.yaml\n```\n"
                    "\n```bash\naccelerate launch --no-such-flag -m distill.train r.yaml\n```\n")
    found = blocks(page)
    with pytest.raises(Unrunnable, match="untagged block"):
        check_block(found[0])
    with pytest.raises(Unrunnable, match="`pip install x` is not a command"):
        shell_commands(found[1])
    with pytest.raises(Unrunnable, match="needs a reason"):
        check_block(found[2])
    check_block(found[3])
    with pytest.raises(Unrunnable, match="start distill as a module"):
        shell_commands(found[4])
    with pytest.raises(Unrunnable, match="accelerate refuses these arguments"):
        shell_commands(found[5])
    c = classify(found[1], ["OMP_NUM_THREADS=1", "deepspeed", "--num_gpus", "2", "--module", "distill.train", "RECIPE.yaml",
                            "train.max_steps=3"])
    assert (c.kind, c.argv, c.env) == ("train", ["recipes/quickstart.yaml", "train.max_steps=3"], {"OMP_NUM_THREADS": "1"})
    c = classify(found[1], ["distill", "train", "r.yaml", "--resume"])  # the console script
    assert (c.kind, c.argv) == ("train", ["r.yaml", "--resume"])
    c = classify(found[1], ["python", "-m", "distill.export", "runs/x", "out"])
    assert (c.kind, c.argv) == ("export", ["runs/x", "out"])
