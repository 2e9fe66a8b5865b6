"""tests/mutations.py, the mutation tool: its list still applies to the code, and on a small checkout of its own
it tells a caught mutation from one that survives and from one that cannot be applied. (The mutations
themselves are not run here: `python tests/mutations.py` does that, in tens of minutes.)"""
from __future__ import annotations

import ast
import shutil

from tests.mutations import MUTATIONS, REPO, M, apply, run_mutation


def test_every_mutation_applies_once_and_names_tests_that_exist(tmp_path):
    """A mutation whose text no longer occurs (the code moved on) or whose guard was renamed is stale."""
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    defined: dict[str, set[str]] = {}
    problems = []
    for m in MUTATIONS:
        copy = tmp_path / m.name / m.file
        copy.parent.mkdir(parents=True)
        shutil.copy(REPO / m.file, copy)
        if (why := apply(m, tmp_path / m.name)) is not None:
            problems.append(f"{m.name}: {why}")
        for node in m.tests:
            path, _, name = node.partition("::")
            if path not in defined:
                tree = ast.parse((REPO / path).read_text())
                defined[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            if name.split("[")[0] not in defined[path]:
                problems.append(f"{m.name}: no test {node}")
    assert not problems, "\n".join(problems)


def _checkout(root):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text("def double(x):\n    return 2 * x  # twice\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_mod.py").write_text("from pkg.mod import double\n\n\ndef test_double():\n    assert double(3) == 6\n")
    return root


def test_caught_survived_and_errors_on_a_checkout_of_its_own(tmp_path):
    root = _checkout(tmp_path / "repo")
    before = (root / "pkg" / "mod.py").read_text()

    def result(old, new, tests=("tests/test_mod.py::test_double",)):
        row = run_mutation(M("m", "pkg/mod.py", old, new, list(tests), "doubles"), root)
        return row["result"], row["detail"]

    assert result("2 * x", "3 * x") == ("caught", "tests/test_mod.py::test_double - assert 9 == 6")
    assert result("# twice", "# two times") == ("survived", "")
    assert result("4 * x", "3 * x") == ("error", "the text to replace occurs 0 times in pkg/mod.py, not once")
    assert result("x", "y")[1] == "the text to replace occurs 2 times in pkg/mod.py, not once"
    assert result("2 * x", "2 *")[1].startswith("pkg/mod.py does not compile once mutated")
    assert result("2 * x", "3 * x", ["tests/test_mod.py::test_triple"])[0] == "error"  # no such test: nothing ran
    assert (root / "pkg" / "mod.py").read_text() == before  # mutations happen in copies only
