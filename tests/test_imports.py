"""No import cycle inside lb/: every module's run-time imports form a DAG.

Read from the source with `ast`, nothing imported. A run-time edge is any
`import lb...` / `from lb... import ...` that can execute: at module level,
in a class body, and inside a function too (an import deferred into a
function still closes the loop, only later). Imports under
`if TYPE_CHECKING:` never execute and are not edges.

Importing lb.a.b also runs lb/a/__init__.py, so a module outside package
lb.a that imports lb.a.b depends on lb.a as well; a module inside lb.a does
not (its package is already being imported when it runs).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "lb"


def all_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can execute, skipping `if TYPE_CHECKING:` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                yield from runtime_imports(ast.Module(body=[child], type_ignores=[]))
        else:
            yield from runtime_imports(node)


def imported_modules(module: str, is_package: bool, node: ast.Import | ast.ImportFrom,
                     known: dict[str, Path]) -> set[str]:
    """The lb modules one import statement loads (not yet counting parent packages)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    found = {base}
    for alias in node.names:  # `from lb import admin`: admin is a module of its own
        if f"{base}.{alias.name}" in known:
            found.add(f"{base}.{alias.name}")
    return found


def with_packages(module: str, target: str) -> set[str]:
    """`target` and the packages above it, less those `module` is inside of
    (or is): they are already being imported when `module` runs."""
    parts = target.split(".")
    loaded = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    return {name for name in loaded if not (module == name or module.startswith(name + "."))}


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules its run-time imports load."""
    known = all_modules(root)
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in runtime_imports(tree):
            for target in imported_modules(module, path.name == "__init__.py", node, known):
                edges |= {t for t in with_packages(module, target) if t in known}
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [shortest_cycle(graph, component) for component in components]


def shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, as [a, b, ..., a]."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle in the component {sorted(component)}")


def test_the_walk_finds_each_kind_of_edge(tmp_path: Path) -> None:
    sources = {
        "p/__init__.py": "from p.sub import thing\n",
        "p/sub/__init__.py": "",
        "p/sub/thing.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import hidden\n"
                          "else:\n    from p import shown\n",
        "p/hidden.py": "",
        "p/shown.py": "def later():\n    import p.late\n",
        "p/late.py": "from . import shown\nfrom .sub import thing\n",
    }
    for path, text in sources.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    graph = import_graph(tmp_path / "p")
    assert graph["p"] == {"p.sub", "p.sub.thing"}
    assert graph["p.sub.thing"] == {"p.shown"}  # not p.hidden (TYPE_CHECKING), nor p.sub (its own package)
    assert graph["p.shown"] == {"p.late"}  # an import inside a function is an edge
    assert graph["p.late"] == {"p.shown", "p.sub", "p.sub.thing"}  # relative, and p.sub's __init__ runs
    assert find_cycles(graph) == [["p.late", "p.shown", "p.late"]]


def test_a_cycle_is_named_in_order() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_under_lb() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles under lb/:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)
