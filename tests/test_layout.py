"""The layout's rules (docs/architecture.md): which part of racc may import which, no import cycles,
and no module over about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "racc"
BASE = {"errors", "text", "metrics", "cpu"}
# Each part of racc and the parts it may import (besides itself). Lower floors never import
# higher ones: facts (analysis) never rewrite, lowering (backends) decides nothing.
ALLOWED = {
    **{name: BASE for name in BASE},
    "ir": BASE,
    "nn": BASE | {"ir"},
    "analysis": BASE | {"ir", "nn"},
    "backends": BASE | {"ir", "nn"},
    "timing": BASE | {"backends"},
    "passes": BASE | {"ir", "nn", "analysis", "timing"},
    "report": BASE | {"analysis", "passes"},
    "compiler": BASE | {"ir", "nn", "analysis", "backends", "passes", "report", "part"},
    "part": BASE | {"ir", "passes"},
}
TOP = {
    "racc",
    "cli",
    "bench",
    "models",
    "fuzz",
    "zoo",
    "sparsity",
    "data",
    "recover",
    "distill",
    "compress",
    "budget",
}
TOO_LONG: set[str] = set()  # modules allowed past the limit (none)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "racc"


def _exists(module: str) -> bool:
    path = ROOT.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("racc"):
            for alias in node.names:  # `from racc import passes` imports the module racc.passes
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _exists(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("racc")}
    return found


def test_each_part_imports_only_the_floors_below_it():
    wrong = []
    for path in ROOT.rglob("*.py"):
        part = _part(_module(path))
        if part in TOP:
            continue
        assert part in ALLOWED, f"{part} ({path}) is in no floor of docs/architecture.md"
        for target in _imports(path):
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert wrong == []


def test_no_import_cycles_between_modules():
    graph = nx.DiGraph()
    for path in ROOT.rglob("*.py"):
        module = _module(path)
        graph.add_node(module)
        graph.add_edges_from((module, t) for t in _imports(path, top_level_only=True))
    assert list(nx.simple_cycles(graph)) == []


def test_modules_stay_short():
    long = {
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if len(path.read_text().splitlines()) > 420
    }
    assert long <= TOO_LONG, long - TOO_LONG
