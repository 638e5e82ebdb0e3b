"""Package layering: no module imports a package it must stay below.

Every `import` in every file of `evomerge/` counts: module-level, inside functions, and under `TYPE_CHECKING`
(a lazy import hides an edge from readers, it does not remove it). Extend FORBIDDEN with one row per edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "evomerge"

# (importer, imported, why the edge would be upward)
FORBIDDEN = [
    ("evomerge.runtime", "evomerge.search",
     "a runtime is built from a ScorerFactory; only search/jobs.py (make_runtime) knows both"),
    ("evomerge.fitness", "evomerge.merge",
     "fitness scores weights or a module; the scorer (evomerge.scoring) turns a recipe into weights"),
    ("evomerge.scoring", "evomerge.runtime", "scoring sits below the runtimes that call it"),
    ("evomerge.scoring", "evomerge.search", "a scorer reads a job spec as data, it does not import the search"),
]


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


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_lazy_and_type_only_imports():
    """The check below can only pass for the right reason if the walk finds edges that exist."""
    found = edges()
    assert any(name == "evomerge.runtime.base" for _, _, name in found["evomerge.search.jobs"])  # module level
    assert any(name == "evomerge.scoring" for _, _, name in found["evomerge.search.jobs"])  # inside a function
    assert any(name == "evomerge.merge.api" for _, _, name in found["evomerge.runtime.base"])  # TYPE_CHECKING


@pytest.mark.parametrize("importer, imported_package, why", FORBIDDEN, ids=[f"{a}->{b}" for a, b, _ in FORBIDDEN])
def test_no_upward_import(importer, imported_package, why):
    bad = [f"{rel}:{line} imports {name}" for module, found in edges().items() if within(module, importer)
           for rel, line, name in found if within(name, imported_package)]
    assert not bad, f"{importer} must not import {imported_package} ({why}):\n" + "\n".join(bad)
