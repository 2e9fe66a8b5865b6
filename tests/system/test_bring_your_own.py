"""docs/bring-your-own.md, run as written: its files, its distillation run, report and export, then the block that
loads the export. (tests/system/test_docs_blocks.py runs every command of the page with --dry-run only.)"""
import json
import os
import subprocess

import pytest

from tests.helpers import check, python, pythonpath
from tests.doc_blocks import REPO, SHELL, blocks, shell_commands

PAGE = REPO / "docs" / "bring-your-own.md"
MAIN_RUN = ["student.yaml"]
"""The walk-through's run; its other train commands (dry run, teacher, variants) are the docs test's."""


@pytest.mark.multiprocess
def test_the_walk_through_ends_with_a_loadable_student(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": pythonpath(REPO)}
    page = blocks(PAGE)
    for b in page:
        if b.mark == "save":
            (tmp_path / b.arg).write_text(b.text)
    monkeypatch.chdir(tmp_path)
    ran, outputs = [], {}
    for b in page:
        if b.lang == "python" and "AutoPeftModelForCausalLM" not in b.text:  # the LoRA block needs a LoRA run
            (tmp_path / "block.py").write_text(b.text)
            proc = subprocess.run(python("block.py"), cwd=tmp_path, capture_output=True, text=True,
                                  timeout=300, env=env)
            check(proc)
            ran.append(f"python:{b.line}")
            outputs[b.line] = proc.stdout
        elif b.lang in SHELL and b.mark is None:
            for c in shell_commands(b):
                if c.kind == "train" and c.argv != MAIN_RUN:
                    continue
                if c.kind == "train":
                    proc = subprocess.run(python("-m", "distill.train", *c.argv), cwd=tmp_path,
                                          capture_output=True, text=True, timeout=300, env=env)
                    check(proc)
                    outputs["train"] = proc.stdout
                else:
                    import importlib

                    module = {"report": "distill.report", "export": "distill.export"}[c.kind]
                    assert importlib.import_module(module).main(c.argv) == 0, c.text
                ran.append(c.text)
    # The setup, the run, the report, the export, and last the block that loads the export.
    assert ran[1:] == ["python -m distill.train student.yaml", "python -m distill.report runs/student",
                       "python -m distill.export runs/student exported"] + [ran[-1]] and ran[-1].startswith("python:")
    assert "samples at step 6 (greedy):" in outputs["train"] and "note: " in outputs["train"]
    assert outputs[int(ran[-1].split(":")[1])].startswith("The quick brown fox")
    summary = json.loads((tmp_path / "runs" / "student" / "summary.json").read_text())
    assert summary["after"]["ce"] < summary["before"]["ce"]
    assert "## Samples" in (tmp_path / "runs" / "student" / "report" / "summary.md").read_text()
