"""The package's imports run one way (docs/concepts.md, "Layers"): no circle, and each layer imports only below it."""
from __future__ import annotations

import ast
from pathlib import Path

DISTILL = Path(__file__).resolve().parents[1] / "distill"

# Each module (or package, by prefix) and the distill modules it may import at all.
LAYERS = {
    "distill.errors": set(),
    "distill.registry": set(),
    "distill.presets": {"distill.errors"},
    "distill.dsconfig": {"distill.errors", "distill.presets"},
    "distill.recipe": {"distill.errors", "distill.presets", "distill.dsconfig"},
    "distill.losses": {"distill.errors", "distill.registry", "distill.losses"},
    "distill.data": {"distill.errors", "distill.recipe", "distill.data"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(DISTILL.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(distill modules imported at module level, ones imported inside a function); `if TYPE_CHECKING:` ones skipped."""
    tree = ast.parse(path.read_text())
    top, inner = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            pkg = _module_name(path).split(".")[: None if path.name == "__init__.py" else -1]
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found = {n for n in names if n.startswith("distill.") and (DISTILL.parent / (n.replace(".", "/") + ".py")).exists()
                 or (DISTILL.parent / n.replace(".", "/") / "__init__.py").exists() and n.startswith("distill.")}
        if found and not _under_type_checking(tree, node):  # type hints only: no import at run time
            (top if node in tree.body else inner).update(found)
    return top, inner


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING" and node in ast.walk(n)
               for n in tree.body)


GRAPH = {_module_name(p): _imports(p) for p in DISTILL.rglob("*.py")}


def test_no_import_circle():
    # A package that holds the importing module is initialised before it anyway: no edge to it.
    edges = {m: {n for n in top if n in GRAPH and n != m and not m.startswith(n + ".")} for m, (top, _) in GRAPH.items()}
    seen, on_path = set(), []

    def visit(m):
        if m in on_path:
            raise AssertionError("import circle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in seen:
            return
        on_path.append(m)
        for n in sorted(edges[m]):
            visit(n)
        on_path.pop()
        seen.add(m)

    for m in sorted(edges):
        visit(m)


def test_lower_layers_import_only_below_them():
    for module, (top, inner) in GRAPH.items():
        layer = next((k for k in sorted(LAYERS, key=len, reverse=True) if module == k or module.startswith(k + ".")), None)
        if layer is None:
            continue
        allowed = LAYERS[layer]
        bad = {n for n in top | inner if not any(n == a or n.startswith(a + ".") for a in allowed)}
        assert not bad, f"{module} imports {sorted(bad)}; its layer may import only {sorted(allowed)}"


def test_no_distill_import_hides_inside_a_function():
    hidden = {m: sorted(inner) for m, (_, inner) in GRAPH.items() if inner and m != "distill.data"}
    assert not hidden, f"imports inside functions (move them to the top; a circle is no reason): {hidden}"
