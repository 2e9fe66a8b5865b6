"""Every test the docs cite exists: a page that says "`test_x` shows it" must point at a test that still runs."""
from __future__ import annotations

import ast
import re

from tests.doc_blocks import REPO, doc_files

NAMED = re.compile(r"\b(tests/(?:\w+/)?\w+\.py)(?:::(\w+))?|`(test_\w+)`|`(\w+_check)`")


def _tests_by_file() -> dict[str, set[str]]:
    """tests/**/test_*.py -> the names of the test functions it defines (methods of test classes too)."""
    out = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        out[path.relative_to(REPO).as_posix()] = {n.name for n in ast.walk(tree)
                                                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}
    return out


def unknown_references(text: str, tests: dict[str, set[str]]) -> list[str]:
    """The references to tests in `text` that name no test, file under tests/ or test script of the checkout."""
    every = set().union(*tests.values())
    modules = {f.rsplit("/", 1)[-1][:-len(".py")] for f in tests}
    bad = []
    for m in NAMED.finditer(text):
        path, function, name, script = m.groups()
        if path is not None:
            known = path in tests or (REPO / path).is_file()
            if not known or (function is not None and function not in tests.get(path, set())):
                bad.append(m.group(0))
        elif name is not None and name not in every and name not in modules:
            bad.append(name)
        elif script is not None and not (REPO / "tests" / "scripts" / f"{script}.py").is_file():
            bad.append(script)
    return bad


def test_every_test_the_docs_and_the_code_cite_exists():
    tests = _tests_by_file()
    sources = [*doc_files(), *sorted((REPO / "distill").rglob("*.py")), *sorted((REPO / "benchmarks").glob("*.py"))]
    problems = [f"{p.relative_to(REPO)}: {ref}" for p in sources for ref in unknown_references(p.read_text(), tests)]
    assert not problems, "references to tests that do not exist:\n" + "\n".join(problems)


def test_a_stale_reference_is_found():
    tests = {"tests/test_a.py": {"test_one"}}
    text = ("`test_one` and `tests/test_a.py::test_one` exist; `test_gone`, `tests/test_a.py::test_two`, "
            "`tests/test_nothing.py` and `nothing_check` do not; `test_a` is the module; "
            "split(test_size=64) is code, not a test's name")
    assert unknown_references(text, tests) == ["test_gone", "tests/test_a.py::test_two", "tests/test_nothing.py",
                                               "nothing_check"]
