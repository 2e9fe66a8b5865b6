"""The package's layout (docs/concepts.md, "Layers"): subpackages by concern, imports one way from the bottom up,
no circle at all (`TYPE_CHECKING` imports and imports inside functions included)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DISTILL = ROOT / "distill"

PACKAGES = ["config", "data", "losses", "models", "plan", "runtime", "generation", "teacher_cache", "rl", "loop",
            "trainers", "cli", "pipelines"]
"""Bottom to top: a module may import its own package and the packages before it, never one after it."""
ENTRY_POINTS = {"distill", "distill.__main__", "distill.train", "distill.export", "distill.report", "distill.recipe_doc",
                "distill.teacher_cache.__main__"}
"""Above every package: `import distill` and the `python -m` names kept as thin shims over `cli/`."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    base = ROOT / name.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every distill module `source` imports: at module level, inside functions and under `if TYPE_CHECKING:`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = module.split(".")[: None if is_package else -1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n for n in names if n.startswith("distill.") and _exists(n)}
    return found


def build_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p.read_text(), module_name(p), p.name == "__init__.py") for p in DISTILL.rglob("*.py")}


def rank(module: str) -> int:
    """The module's place in the package order; entry points are above every package."""
    if module in ENTRY_POINTS:
        return len(PACKAGES)
    return PACKAGES.index(module.split(".")[1])


def order_violations(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {n}: `{n.split('.')[1]}/` is above `{m.split('.')[1]}/` in the package order ({' < '.join(PACKAGES)})"
            for m, imported in sorted(graph.items()) for n in sorted(imported) if rank(n) > rank(m)]


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    # A package that holds the importing module is initialised before it anyway: no edge to it.
    edges = {m: sorted(n for n in imported if n in graph and n != m and not m.startswith(n + ".")) for m, imported in graph.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            return path[path.index(m):] + [m]
        if m in done:
            return None
        path.append(m)
        for n in edges[m]:
            if circle := visit(n):
                return circle
        path.pop()
        done.add(m)
        return None

    for m in sorted(edges):
        if circle := visit(m):
            return circle
    return None


GRAPH = build_graph()


def test_every_module_belongs_to_a_declared_package():
    loose = sorted(m for m in GRAPH if m not in ENTRY_POINTS and m.split(".")[1] not in PACKAGES)
    assert not loose, f"modules outside the declared packages {PACKAGES}: {loose}; move them into the package of their concern"
    assert {m.split(".")[1] for m in GRAPH if m not in ENTRY_POINTS} == set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_states_its_purpose_in_one_line_and_in_readme(package):
    doc = ast.get_docstring(ast.parse((DISTILL / package / "__init__.py").read_text()))
    assert doc and "\n" not in doc, f"distill/{package}/__init__.py must start with a one-line docstring: its purpose"
    row = re.search(rf"^\| `distill/{package}/` \| (.*) \|$", (ROOT / "README.md").read_text(), re.M)
    assert row and row.group(1) == doc, f"README's layout table needs the row | `distill/{package}/` | {doc} |"


def test_entry_points_are_thin_shims():
    for name in ENTRY_POINTS - {"distill"}:
        path = ROOT / (name.replace(".", "/") + ".py")
        assert len(path.read_text().splitlines()) <= 8, f"{path} is an entry-point name only: its code belongs in distill/cli/"


def test_imports_follow_the_package_order():
    bad = order_violations(GRAPH)
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    circle = find_circle(GRAPH)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_a_back_import_fails_the_checks():
    # What the recipe once did: a type-checking import of a higher layer, and a circle through it.
    hint = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from distill.loop.trainer import RoleTrainer\n"
    graph = {**GRAPH, "distill.config.schema": GRAPH["distill.config.schema"] | imports_of(hint, "distill.config.schema")}
    assert order_violations(graph) == ["distill.config.schema imports distill.loop.trainer: `loop/` is above `config/` in the "
                                       f"package order ({' < '.join(PACKAGES)})"]
    assert find_circle(graph) is not None  # the loop imports the schema
    inner = "def role():\n    from distill.config.recipe import validate_recipe\n"
    graph = {**GRAPH, "distill.config.deepspeed": GRAPH["distill.config.deepspeed"] | imports_of(inner, "distill.config.deepspeed")}
    assert not order_violations(graph)  # same package: allowed by the order ...
    assert find_circle(graph)[0] == "distill.config.deepspeed"  # ... but a circle, even from inside a function


def test_no_distill_import_hides_inside_a_function():
    hidden = {}
    for path in DISTILL.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        inner = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and n not in top
                 and imports_of(ast.unparse(n), module_name(path), path.name == "__init__.py")
                 and not any(isinstance(b, ast.If) and n in ast.walk(b) for b in tree.body)]
        if inner and module_name(path) != "distill.data":  # its lazy exports keep `python -m distill.data.x` light
            hidden[module_name(path)] = [ast.unparse(n) for n in inner]
    assert not hidden, f"imports inside functions (move them to the top; a circle is no reason): {hidden}"


COMPAT = "distill.runtime.compat"
"""The one module that touches DeepSpeed's and accelerate's private API."""
OTHER_PRIVATE = {
    "_dynamo": "torch._dynamo: torch's compiler settings and dynamic-shape marks (decode, compiled layers)",
    "_compiled_call_impl": "torch.nn.Module: the compiled forward `torch.compile` installs, swapped by the decode engine",
    "_get_default_store": "torch.distributed: the store the rank watchdog publishes exits through",
    "_exit": "os._exit: a rank leaves without running atexit hooks that would wait on dead peers",
    "_fingerprint": "datasets: a Dataset's content hash, the recipe's label for a dataset given from Python",
}
"""Private names of other libraries the package reads, and why; every other private attribute it reaches on an object
not its own is DeepSpeed's or accelerate's, and belongs in `COMPAT`."""


def private_uses(source: str) -> list[str]:
    """Private attributes reached on objects other than `self`/`cls`, and DeepSpeed's internal modules, in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and ast.unparse(node.value) not in ("self", "cls") and node.attr not in OTHER_PRIVATE:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr == "__compatible_ops__":
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"line {node.lineno}: import {m}" for m in modules if m.startswith(("deepspeed.runtime", "deepspeed.ops"))]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "deepspeed.runtime." in node.value:
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_deepspeed_and_accelerate_internals_are_used_in_compat_only():
    used = {module_name(p): uses for p in DISTILL.rglob("*.py") if module_name(p) != COMPAT and (uses := private_uses(p.read_text()))}
    assert not used, f"private API outside distill/runtime/compat.py (move it there, saying why and for which versions): {used}"
    assert private_uses((DISTILL / "runtime" / "compat.py").read_text()), "the check finds nothing even where the patches are"
    patched = "import deepspeed.ops\nfor n, slot in slots.items():\n    slot.plugin._set_selected(n == name)\n"
    assert sorted(private_uses(patched)) == ["line 1: import deepspeed.ops", "line 3: slot.plugin._set_selected"]


def private_names_of_distill() -> set[str]:
    """Every private name the package defines: functions, classes, module and class attributes, instance attributes."""
    names = set()
    for path in DISTILL.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__") and n != "_"}


def reached_private_names(source: str, private: set[str]) -> list[str]:
    """Where `source` imports a private name from distill, or reaches one of `private` as an attribute, a
    `setattr`/`getattr` name or a `__dict__` key."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "distill":
            names = [a.name for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr in private:
            names = [node.attr]
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("setattr", "getattr", "delattr", "setdefault")):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and a.value in private]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("__dict__") \
                and isinstance(node.slice, ast.Constant) and node.slice.value in private:
            names = [node.slice.value]
        found += [f"line {node.lineno}: {n}" for n in names]
    return found


def test_tests_and_benchmarks_use_the_public_api_only():
    private = private_names_of_distill()
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    used = {str(p.relative_to(ROOT)): r for p in files if (r := reached_private_names(p.read_text(), private))}
    assert not used, f"tests and benchmarks reach private names of distill (make them public and documented, or test the behaviour): {used}"
    assert {"_probe_addmm_mode", "_upcast"} <= private  # the scan sees the package's private names
    reaching = ("from distill.losses.kd import _upcast\nmonkeypatch.setattr(chunked, '_probe_addmm_mode', f)\n"
                "trainer._upcast(x)\nmodel.__dict__['_probe_addmm_mode']\n")
    assert sorted(reached_private_names(reaching, private)) == ["line 1: _upcast", "line 2: _probe_addmm_mode", "line 3: _upcast",
                                                         "line 4: _probe_addmm_mode"]
