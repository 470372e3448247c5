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


# ------------------------------------------------------------------ rooms and import rules
# docs/ARCHITECTURE.md states these rules; this test is their enforcement.
ENTRY_POINTS = {"launch", "train", "evaluate", "status", "report", "plan", "prefetch", "fitmem", "index", "demo",
                "sbatch_scripts"}
FOLDERS = ("task", "login", "job", "trainers", "rewards", "eval")
BASE = {"config", "errors"}  # the floor: the schema and the error family

# room -> rooms it may import (its own included)
MAY_IMPORT = {
    "base": {"base"},
    "task": {"base", "task"},
    "shared": {"base", "task", "shared"},
    "login": {"base", "task", "shared", "login"},
    "job": {"base", "task", "shared", "job"},
    "rewards": {"base", "task", "shared", "job", "rewards"},
    "eval": {"base", "task", "shared", "job", "eval"},
    "trainers": {"base", "task", "shared", "job", "rewards", "eval", "trainers"},
    "entry": {"base", "task", "shared", "job", "login", "rewards", "eval", "trainers"},
}
LAYER = {"base": 0, "task": 1, "shared": 2, "login": 3, "job": 3, "rewards": 4, "eval": 4, "trainers": 5, "entry": 6}

# (importer, imported) pairs the rules would refuse, each with why it is right.
ALLOWED = {
    ("finellama_rl.demo", "finellama_rl.train"):
        "the demo runs each RL run through train's own main(), exactly as `python -m finellama_rl.train` would",
}

# rooms where no heavy library may be imported at module level: the login side plans a
# 100-run sweep in seconds, and everything it stands on must stay light
LIGHT_ROOMS = {"base", "task", "shared", "login"}
HEAVY = {"torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate"}


def room(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "package"
    if len(parts) == 1 and parts[0] in ENTRY_POINTS:
        return "entry"
    if len(parts) == 1 and parts[0] in BASE:
        return "base"
    if parts[0] in FOLDERS:
        return parts[0]
    return "shared"  # other top-level modules and ladder/


def rule_breaks(g: Dict[str, Set[str]]) -> List[str]:
    out = []
    for m in sorted(g):
        for i in sorted(g[m]):
            if i == "finellama_rl" or (m, i) in ALLOWED:
                continue
            if room(i) not in MAY_IMPORT[room(m)] or (room(m) == room(i) == "entry"):
                out.append(f"{m} ({room(m)}) -> {i} ({room(i)})")
    return out


def module_level_imports(path: Path) -> Set[str]:
    out: Set[str] = set()
    for node in ast.parse(path.read_text()).body:  # top level only (a lazy import inside a function is fine)
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_every_module_has_a_room():
    rooms = {m: room(m) for m in all_modules()}
    assert set(rooms.values()) - {"package"} <= set(MAY_IMPORT), rooms
    assert {m for m, r in rooms.items() if r == "entry"} == {f"finellama_rl.{e}" for e in ENTRY_POINTS}


def test_rule_checker_finds_planted_breaks():
    planted = {"finellama_rl.task.data": {"finellama_rl.job.model"},            # task reaches up
               "finellama_rl.job.oom_loop": {"finellama_rl.login.slurm"},        # job -> login
               "finellama_rl.login.preflight": {"finellama_rl.rewards.judge"},   # login -> rewards
               "finellama_rl.launch": {"finellama_rl.plan"},                     # entry -> entry
               "finellama_rl.trainers.grpo": {"finellama_rl.job.model", "finellama_rl.results"}}  # fine
    assert len(rule_breaks(planted)) == 4


def test_imports_follow_the_rooms_rules():
    assert rule_breaks(graph()) == []


def test_no_import_goes_up_a_layer():
    g = graph()
    up = [f"{m} -> {i}" for m in g for i in g[m] if i != "finellama_rl" and (m, i) not in ALLOWED
          and LAYER[room(i)] > LAYER[room(m)]]
    assert up == []


def test_allow_list_entries_are_still_needed():
    g = graph()
    assert all(i in g[m] for m, i in ALLOWED), "an allow-list entry no longer happens: remove it"


def test_light_rooms_import_no_heavy_library_at_module_level():
    heavy = {m: sorted(module_level_imports(p) & HEAVY) for m, p in all_modules().items() if room(m) in LIGHT_ROOMS}
    assert {m: h for m, h in heavy.items() if h} == {}


def test_commands_of_the_login_side_load_no_heavy_library():
    """What a login node runs imports neither torch nor TRL, also transitively (measured in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys\nimport finellama_rl.launch, finellama_rl.plan, finellama_rl.status, finellama_rl.report, "
            "finellama_rl.index, finellama_rl.fitmem, finellama_rl.prefetch\n"
            f"print(sorted(h for h in {sorted(HEAVY)!r} if h in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
