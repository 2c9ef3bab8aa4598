"""The package's imports go one way: no module imports, however late, a module that imports it.

The graph is read from the source with `ast`, so nothing is imported and the test runs without
torch or mlx. Every `import` and `from ... import` counts, at module level or inside a function
(a late import only hides a circle until the day someone moves it up), except those under
`if TYPE_CHECKING:`, which never run. Edges:

- `import a.b.c` is an edge to `a.b.c`;
- `from P import n` is an edge to `P.n` when that is a module, otherwise to `P` (its `__init__`
  when `P` is a package): `from . import x` is an edge to the submodule `x`, and
  `from .pkg import name` to `pkg/__init__`, which is where `name` is looked up;
- importing a module also runs its packages' `__init__`s, so each package above the target is an
  edge too, except the importer's own packages: they are running already when the importer is
  (an `__init__` that re-exports its submodules is the usual, safe, shape).

Imports by string (`importlib.import_module`, `edge_pu.export`'s lazy names) are not seen; they
are the way to import upward on purpose. A registry entry written "edge_pu.module:Name" (the
backends') is seen by a second check, which adds those edges and still finds no circle.

    pytest -q tests/test_imports.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "edge_pu"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, a package named by its `__init__.py`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping `if TYPE_CHECKING:` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        stack.extend(children)


def _resolve_base(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module that `from <node.module> import ...` names, relative dots resolved."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    keep = len(package) - (node.level - 1)
    assert keep > 0, f"{name}: relative import beyond the top package"
    return ".".join(package[:keep] + ([node.module] if node.module else []))


REGISTRY_ENTRY = re.compile(r"(edge_pu(?:\.\w+)+):\w+")


def registry_edges(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules its "edge_pu.module:Name" string constants name."""
    files = module_files(root)
    out: dict[str, set[str]] = {}
    for name, path in files.items():
        found = {m.group(1) for node in ast.walk(ast.parse(path.read_text(), str(path)))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and (m := REGISTRY_ENTRY.fullmatch(node.value)) and m.group(1) in files}
        if found - {name}:
            out[name] = found - {name}
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for the edges)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if is_package:
            own_packages.add(name)
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = _resolve_base(name, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in files else base)
        edges = set()
        for target in targets:
            parts = target.split(".")
            # the target and the packages above it that the importer is not itself inside
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in files and mod not in own_packages and mod != name:
                    edges.add(mod)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None; depth-first, deterministic (sorted)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected knot, found by cutting each found cycle's last edge."""
    graph = {k: set(v) for k, v in graph.items()}
    cycles = []
    while cycle := find_cycle(graph):
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def test_cycle_finder_on_a_hand_made_graph():
    """a -> b -> c -> a is found (starting from its first node in order); a DAG has none; a
    self-loop counts."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    assert len(all_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}})) == 2


def test_graph_reads_relative_and_late_imports(tmp_path):
    """A tiny package: relative imports resolve, `from . import sub` is the submodule, a late
    import inside a function counts, TYPE_CHECKING does not, and the circle is found."""
    pkg = tmp_path / "edge_pu"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import high\n",
        "high.py": "from . import low\nfrom .sub import thing\n",
        "sub/__init__.py": "from .leaf import thing\n",
        "sub/leaf.py": "def f():\n    from ..high import x\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph["edge_pu.low"] == set()
    assert graph["edge_pu.high"] == {"edge_pu.low", "edge_pu.sub"}
    assert graph["edge_pu.sub"] == {"edge_pu.sub.leaf"}
    assert graph["edge_pu.sub.leaf"] == {"edge_pu.high"}
    assert find_cycle(graph) == ["edge_pu.high", "edge_pu.sub", "edge_pu.sub.leaf", "edge_pu.high"]


def test_edge_pu_has_no_import_cycles():
    graph = import_graph()
    assert "edge_pu.planner" in graph or "edge_pu.planner.plan" in graph  # the walk saw the tree
    cycles = all_cycles(graph)
    assert not cycles, "import cycles (a -> b means a imports b):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_no_file_in_edge_pu_is_over_500_lines():
    """The project's own limit (issue 26): each file readable alone."""
    long = {str(p.relative_to(ROOT)): n for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines: {long}"


def test_no_cycle_through_the_backend_registry_either():
    """planner -> backends -> (registry) torch_backend -> planner was one, hidden from the
    first check; `detect` now lives in edge_pu.hardware, which imports nothing of ours."""
    graph = import_graph()
    extra = registry_edges()
    assert extra["edge_pu.backends"] >= {"edge_pu.backends.torch_backend"}  # the walk saw it
    for name, targets in extra.items():
        graph[name] = graph[name] | targets
    cycles = all_cycles(graph)
    assert not cycles, "cycles through registry strings:\n" + "\n".join(
        " -> ".join(c) for c in cycles)
