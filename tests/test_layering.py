"""Package layering: every package imports only from packages below it, and no module import cycle exists.

Every `import` in every file of `evomerge/` counts: module-level, inside functions, and under `TYPE_CHECKING`
(a lazy import hides an edge from readers, it does not remove it). LAYERS is the picture README's Layout draws;
a package may import its own modules and any package of a lower layer, never one of its own layer or above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "evomerge"

# Lowest first. Packages in one row are peers: they must not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("evomerge.errors",),
    ("evomerge.config", "evomerge.compat"),
    ("evomerge.checkpoints",),
    ("evomerge.merge", "evomerge.fitness", "evomerge.store", "evomerge.zoo", "evomerge.memory"),  # fitness scores weights, not recipes
    ("evomerge.spaces", "evomerge.scoring"),  # genome -> recipe; recipe -> weights -> fitness result
    ("evomerge.runtime",),  # built from a ScorerFactory: it never sees the search
    ("evomerge.search",),
    ("evomerge.dashboard",),
    ("evomerge.service",),
    ("evomerge.__main__",),
]
RANK = {pkg: i for i, row in enumerate(LAYERS) for pkg in row}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file; `from a import b` counts as `a.b` too (b may be a module)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this file's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def edges() -> dict[str, list[tuple[str, int, str]]]:
    """importer module -> [(file, line, imported module)]."""
    out: dict[str, list[tuple[str, int, str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        out[module_name(path)] = [(rel, line, name) for line, name in imported(path)]
    return out


def top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. An import of a module's own parent package is left out: importing any
    submodule runs its package's `__init__` first, so a package that re-exports its submodules is no cycle."""
    found = edges()
    graph = {m: set() for m in found}
    for module, imports in found.items():
        for _, _, name in imports:
            if name in graph and name != module and not module.startswith(name + "."):
                graph[module].add(name)
    return graph


def test_the_walk_sees_lazy_and_type_only_imports():
    """The checks below can only pass for the right reason if the walk finds edges that exist."""
    found = edges()
    assert any(name == "evomerge.runtime.base" for _, _, name in found["evomerge.search.jobs"])  # module level
    assert any(name == "evomerge.scoring" for _, _, name in found["evomerge.search.jobs"])  # inside a function
    assert any(name == "evomerge.merge.api" for _, _, name in found["evomerge.runtime.base"])  # TYPE_CHECKING


def test_every_package_has_a_layer():
    packages = {top(m) for m in edges()} - {"evomerge"}
    assert packages == set(RANK), f"add to LAYERS: {sorted(packages - set(RANK))}; gone: {sorted(set(RANK) - packages)}"


@pytest.mark.parametrize("package", sorted(RANK))
def test_no_import_of_a_peer_or_a_higher_layer(package):
    bad = [f"{rel}:{line} imports {name} (layer {RANK[top(name)]}, {package} is layer {RANK[package]})"
           for module, found in edges().items() if top(module) == package
           for rel, line, name in found
           if name.startswith("evomerge.") and top(name) != package and RANK[top(name)] >= RANK[package]]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    assert cycles(module_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
