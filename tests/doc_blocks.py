"""The fenced code blocks of README.md and docs/*.md, and how `tests/system/test_docs_blocks.py` runs each one.

Rules (a block that fits none of them fails the test, so new docs cannot add untested code):

- A marker on the last non-blank line before a block changes what happens to it:
  `<!-- docs-test: skip (reason) -->` leaves it alone (GPU or multi-machine commands, installs,
  benchmarks; the reason is required) and `<!-- docs-test: save NAME -->` writes it to NAME in the
  page's working directory, for later blocks of the page to use (a trainer module, a recipe).
- `text` blocks are output samples and file listings; they are not run.
- `python` blocks of one page run in order as one script (a later block may use what an earlier one
  defined), in a subprocess, in the page's working directory.
- `yaml` blocks must parse, and so must every line of a `jsonl` block.
- `bash` blocks are split into commands (`\\` continuations joined, `&&` split, comments dropped,
  leading `VAR=value` kept as environment). `python -m distill.train` / `distill train` run with
  `--dry-run` (recipe, overrides and role plan checked; nothing trained). `accelerate launch`,
  `torchrun` and `deepspeed` lines are parsed by the launcher's own argument parser and must start
  `distill.train` as a module, which then runs with `--dry-run`. `python -m distill.report` /
  `distill.export` run for real on a run directory the test trains, in place of the one they name.
  `python -m distill.data.synthetic` runs as written. Any other command fails.
- Each page gets a fresh working directory holding links to the repository's `recipes/`,
  `configs/` and `assets/`; `RECIPE.yaml` (the placeholder of the multi-node examples) stands for
  `recipes/quickstart.yaml`. Saved files are written first, then python blocks run, then commands.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDERS = {"RECIPE.yaml": "recipes/quickstart.yaml"}
SHELL = ("bash", "sh", "shell")


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    text: str
    mark: str | None = None
    arg: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path}:{self.line}"


@dataclass
class Command:
    """One shell command a doc shows, reduced to what the test runs: `kind` and the module's argv."""
    block: Block
    text: str
    kind: str  # train | report | export | synthetic
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class Unrunnable(ValueError):
    """A block or command the rules above do not cover."""


def doc_files() -> list[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def blocks(path: Path) -> list[Block]:
    """Fenced blocks of one markdown file with their markers; an unclosed fence is an error."""
    out: list[Block] = []
    lines = Path(path).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise Unrunnable(f"{path}:{start + 1}: a code block is never closed")
        before = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        mark = _MARK.match(before)
        out.append(Block(Path(path), start + 1, m.group(1), "\n".join(body) + "\n",
                         mark.group(1) if mark else None, mark.group(2) if mark else ""))
        i += 1
    return out


def check_block(b: Block) -> None:
    """Raise Unrunnable for a block with a bad marker or a language the test does not run."""
    if b.mark not in (None, "skip", "save"):
        raise Unrunnable(f"{b.where}: unknown marker `docs-test: {b.mark}`; use `skip (reason)` or `save NAME`")
    if b.mark == "skip" and not re.fullmatch(r"\(.+\)", b.arg):
        raise Unrunnable(f"{b.where}: `docs-test: skip` needs a reason in parentheses")
    if b.mark == "save" and not re.fullmatch(r"[\w.-]+", b.arg):
        raise Unrunnable(f"{b.where}: `docs-test: save` needs a plain file name")
    if b.mark is None and b.lang not in ("text", "python", "yaml", "jsonl") + SHELL:
        what = "an untagged block" if not b.lang else f"a ```{b.lang} block"
        raise Unrunnable(f"{b.where}: {what} the docs test cannot run: tag output samples ```text, or mark the block "
                         "`<!-- docs-test: skip (reason) -->`")


def shell_commands(b: Block) -> list[Command]:
    """The commands of a shell block, each classified; raises Unrunnable for any the test cannot run."""
    out = []
    for line in b.text.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens:
            cut = tokens.index("&&") if "&&" in tokens else len(tokens)
            out.append(classify(b, tokens[:cut]))
            tokens = tokens[cut + 1:]
    return out


def classify(b: Block, tokens: list[str]) -> Command:
    text = shlex.join(tokens)
    env = {}
    while tokens and _ENV.match(tokens[0]):
        k, v = tokens.pop(0).split("=", 1)
        env[k] = v
    tokens = [PLACEHOLDERS.get(t, t) for t in tokens]
    module, args = _module_of(tokens, b, text)
    kinds = {"distill.train": "train", "distill.report": "report", "distill.export": "export",
             "distill.data.synthetic": "synthetic"}
    if module not in kinds:
        raise Unrunnable(f"{b.where}: `{text}` is not a command the docs test can run: mark the block "
                         "`<!-- docs-test: skip (reason) -->` if it cannot run here")
    return Command(b, text, kinds[module], args, env)


def _module_of(tokens: list[str], b: Block, text: str) -> tuple[str | None, list[str]]:
    """(module, its argv) of a python / distill / launcher command line."""
    head = tokens[0] if tokens else ""
    if head in ("python", "python3") and len(tokens) > 2 and tokens[1] == "-m":
        return tokens[2], tokens[3:]
    if head == "distill" and len(tokens) > 1:
        from distill.cli.main import COMMANDS

        return COMMANDS.get(tokens[1]), tokens[2:]
    if head in ("accelerate", "torchrun", "deepspeed"):
        return _parse_launcher(tokens, b, text)
    return None, []


def _parse_launcher(tokens: list[str], b: Block, text: str) -> tuple[str | None, list[str]]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if tokens[0] == "accelerate":
                from accelerate.commands.launch import launch_command_parser

                if tokens[1:2] != ["launch"]:
                    return None, []
                a = launch_command_parser().parse_args(tokens[2:])
                if a.config_file and not (REPO / a.config_file).is_file():
                    raise Unrunnable(f"{b.where}: `{text}`: config file {a.config_file} does not exist")
                script, rest = a.training_script, a.training_script_args
            elif tokens[0] == "torchrun":
                from torch.distributed.run import get_args_parser

                a = get_args_parser().parse_args(tokens[1:])
                script, rest = a.training_script, a.training_script_args
            else:
                from deepspeed.launcher.runner import parse_args

                a = parse_args(tokens[1:])
                script, rest = a.user_script, a.user_args
    except SystemExit:
        raise Unrunnable(f"{b.where}: `{text}`: {tokens[0]} refuses these arguments: {err.getvalue().strip()}") from None
    if not a.module:
        raise Unrunnable(f"{b.where}: `{text}`: start distill as a module (`-m distill.train` / `--module distill.train`)")
    return script, list(rest)


def run_batch(jobs_file: str, results_file: str) -> None:
    """Run commands in this one process (one interpreter start for all of them): each job is
    {cwd, kind, argv, env}; results are exit status and output, in order."""
    import importlib

    modules = {"train": "distill.train", "report": "distill.report", "export": "distill.export",
               "synthetic": "distill.data.synthetic"}
    results = []
    for job in json.loads(Path(jobs_file).read_text()):
        os.chdir(job["cwd"])
        sys.path.insert(0, job["cwd"])  # what `python -m` puts first: the working directory
        saved_env = dict(os.environ)
        os.environ.update(job["env"])
        out = io.StringIO()
        argv = job["argv"] + (["--dry-run"] if job["kind"] == "train" else [])
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                rc = importlib.import_module(modules[job["kind"]]).main(argv) or 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # reported with the command, not raised: the other jobs still run
            rc, out = 1, io.StringIO(out.getvalue() + f"\n{type(e).__name__}: {e}")
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            sys.path.remove(job["cwd"])
        results.append({"rc": rc, "output": out.getvalue()[-4000:]})
    Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    run_batch(sys.argv[1], sys.argv[2])
