"""The package's import graph has no circles, and its boundaries hold: only
slurm.py imports submitit, and TRL is reached from the trainers folder only.

Every import counts, module-level or inside a function (a lazy import is still a
dependency: evaluate -> passk -> evaluate was a circle although both were lazy)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PKG = Path(__file__).resolve().parent.parent / "finellama_rl"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imported(path: Path) -> Set[str]:
    """Every module name this file imports (absolute names)."""
    out: Set[str] = set()
    pkg = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def graph() -> Dict[str, Set[str]]:
    mods = all_modules()
    return {m: {i for i in imported(p) if i in mods and i != m} for m, p in mods.items()}


def cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_lazy_imports():
    g = graph()
    assert "finellama_rl.config" in g["finellama_rl.compose"]
    assert "finellama_rl.login.slurm" in g["finellama_rl.launch"]  # imported inside a function


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_only_slurm_imports_submitit():
    users = sorted(m for m, p in all_modules().items() if any(i.split(".")[0] == "submitit" for i in imported(p)))
    assert users == ["finellama_rl.login.slurm"]


def test_only_trainers_import_trl():
    users = sorted(m for m, p in all_modules().items() if any(i.split(".")[0] == "trl" for i in imported(p)))
    assert users and all(m.startswith("finellama_rl.trainers.") for m in users), users
