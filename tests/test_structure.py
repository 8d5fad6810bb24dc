"""The layout rules of docs/architecture.md, checked on the source: no import circle among the project's modules
(function-level imports included: a deferred import does not make a circle go away), no file in l2e_dist/
over 600 lines, the L2E engine free of DeepSpeed, and no docstring pointing outside the repository."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("l2e_dist", "launcher")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its body (module level, functions, TYPE_CHECKING aside)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    graph = {name: _imports(path, name, modules) for name, path in sources.items()}
    for name in graph:  # importing a package runs its __init__, not its submodules: only package -> child edges
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_circle_among_the_project_modules():
    graph = _graph()
    assert "l2e_dist.checkpoint.manifest" in graph["l2e_dist.checkpoint.io"]  # the parser sees real imports
    assert _cycles(graph) == []


# docs/architecture.md's layer table: a package may import only packages of a lower layer.
LAYERS = {
    "errors": 0, "fileio": 0, "console": 0, "config_utils": 1, "parallel": 2, "model": 2, "l2e": 2, "data": 3, "config": 4,
    "checkpoint": 5, "training": 6, "config_reference": 6, "bench": 7, "analysis": 7, "emergence": 7, "launcher": 8,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return "launcher" if parts[0] == "launcher" else parts[1] if len(parts) > 1 else parts[0]


def test_imports_follow_the_layers_of_docs_architecture():
    upward = sorted(
        f"{name} -> {target}" for name, targets in _graph().items() for target in targets
        if _package(name) != _package(target) and LAYERS[_package(target)] >= LAYERS[_package(name)]
    )
    assert not upward, upward
    assert set(LAYERS) >= {_package(m) for m in _sources() if m != "l2e_dist"}  # every package has a layer


def test_the_l2e_engine_knows_nothing_of_deepspeed_or_the_trainer():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith("l2e_dist.l2e"):
            outside = {t for t in targets if not t.startswith(("l2e_dist.l2e", "l2e_dist.errors", "l2e_dist.config_utils"))}
            assert not outside, f"{name} imports {outside}"
            assert "deepspeed" not in _sources()[name].read_text(), name


def test_launchers_are_thin_and_libraries_do_not_import_them():
    graph = _graph()
    assert not [n for n, t in graph.items() if n.startswith("l2e_dist") and any(x.startswith("launcher") for x in t)]


def test_no_library_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "l2e_dist").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these files: {long}"


def test_no_docstring_points_outside_the_repository():
    offenders = [str(p.relative_to(ROOT)) for package in (*PACKAGES, "tests", "configs", "docs")
                 for p in (ROOT / package).rglob("*") if p.suffix in (".py", ".md", ".yaml")
                 and ("/work/" in p.read_text() or "../shared/" in p.read_text()) and p.name != "test_structure.py"]
    assert not offenders, offenders


def _is_slow_mark(node: ast.expr) -> bool:
    return "mark.slow" in ast.unparse(node)


def _fast_test_modules() -> dict[str, Path]:
    """Test modules with at least one test that `scripts/test.sh --fast` (-m "not slow") runs: not marked slow
    as a whole (pytestmark), with a test function that carries no slow mark."""
    fast = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        body = ast.parse(path.read_text(), str(path)).body
        if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in n.targets)
               and _is_slow_mark(n.value) for n in body):
            continue
        if any(isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
               and not any(_is_slow_mark(d) for d in n.decorator_list) for n in body):
            fast[_module_name(path)] = path
    return fast


def test_the_fast_tier_imports_every_package():
    """`scripts/test.sh --fast` touches every package of the layer table: each is imported by a test module
    that keeps a test outside the slow tier."""
    modules = set(_sources())
    fast = _fast_test_modules()
    assert "tests.test_structure" in fast and "tests.test_slurm" not in fast  # the slow-mark reader works
    imported = {_package(m) for name, path in fast.items() for m in _imports(path, name, modules)}
    assert set(LAYERS) - imported == set(), "no fast test imports these packages"
