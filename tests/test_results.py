"""results.py owns the layout: every file and folder of a run, a sweep and the results
folder is named by RunPaths, SweepPaths or ResultsPaths, and no other module of the
package spells one of those names as a path (a grep over the package's syntax trees:
`x / "ledger.jsonl"`, `Path("...eval_results.json")`, `.with_name("metrics_discarded.jsonl")`,
`.glob("*/config.yaml")`)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Set, Tuple

from finellama_rl.results import ResultsPaths, RunPaths, SweepPaths, is_run_folder, iter_run_dirs, run_dir_problem

PKG = Path(__file__).resolve().parent.parent / "finellama_rl"
OWNER = PKG / "results.py"
PATH_CALLS = {"Path", "PurePath", "with_name", "glob", "rglob", "joinpath", "join", "open", "mkdir"}


def owned_names() -> Set[str]:
    """Every path component RunPaths, SweepPaths and ResultsPaths name (config.yaml, logs, submitit, ...)."""
    root = Path("/R")
    paths = [getattr(RunPaths(root), n) for n in dir(RunPaths) if isinstance(getattr(RunPaths, n), property)]
    paths += [RunPaths(root).eval_at_step(1), RunPaths(root).oom_claim(1), RunPaths(root).job_log("7"),
              RunPaths(root).job_log("7", watchdog=True), RunPaths(root).rank_exit_of(0), SweepPaths(root).ledger,
              SweepPaths(root).submitit_logs, ResultsPaths(root).index,
              ResultsPaths(root).index_lock]
    names = {part for p in paths for part in p.relative_to(root).parts}
    return names | {"oom_claim-", "_0_log.out"}  # prefixes and suffixes of names with a number or job id in them


def _constant_texts(node: ast.AST) -> List[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def path_literals(tree: ast.AST) -> List[ast.AST]:
    """String literals used as paths: operands of `/`, arguments of Path(...), .with_name,
    .glob, .joinpath, os.path.join, open(...)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            found += [node.left, node.right]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in PATH_CALLS:
                found += list(node.args)
    return found


def offenders(source: str, names: Set[str]) -> List[str]:
    out: List[Tuple[int, str]] = []
    for node in path_literals(ast.parse(source)):
        for text in _constant_texts(node):
            parts = [p for p in text.replace("*", "/").split("/") if p]
            hit = [p for p in parts if p in names or any(p.startswith(n) and n.endswith(("_", "-")) for n in names)]
            if hit:
                out.append((node.lineno, f"line {node.lineno}: {text!r}"))
    return [text for _, text in sorted(out)]


def test_the_owner_names_every_path_of_a_run():
    names = owned_names()
    for expected in ("config.yaml", "metrics.jsonl", "metrics_discarded.jsonl", "eval_results.json", "eval_baseline.json",
                     "evals", "best_checkpoint.json", "attempts.jsonl", "checkpoints", "run.lock", "tensorboard", "logs",
                     "submitit", "watch", "job_events.jsonl", "current_attempt.json", "rank_exit.0.json", "stop_request",
                     "ledger.jsonl", "rm_data.jsonl", "rm_eval.json", "reward_model"):
        assert expected in names, expected


def test_the_grep_finds_planted_path_literals():
    names = owned_names()
    planted = '''
from pathlib import Path
a = Path(run_dir) / "ledger.jsonl"
b = run / "logs" / "submitit" / f"{job}_0_log.out"
c = paths.metrics.with_name("metrics_discarded.jsonl")
d = sorted(sweep.glob("*/config.yaml"))
e = Path("results/x/eval_results.json")
fine = "see config.yaml for the settings"   # a message, not a path
g = model_dir / "config.json"               # a model folder's file, not a run folder's
'''
    hits = offenders(planted, names)
    assert [h.split(":")[0] for h in hits] == ["line 3", "line 4", "line 4", "line 4", "line 5", "line 6", "line 7"], hits


def test_no_run_folder_path_literal_outside_the_owner():
    names = owned_names()
    found = {str(p.relative_to(PKG)): offenders(p.read_text(), names) for p in PKG.rglob("*.py") if p != OWNER}
    assert {k: v for k, v in found.items() if v} == {}


def test_run_folders_are_told_apart_from_sweeps(tmp_path):
    sweep = tmp_path / "sweep"
    run = RunPaths(sweep / "ppo").make()
    run.config.write_text("trainer: {}\n")
    (sweep / ".hidden").mkdir()
    RunPaths(sweep / ".hidden").config.write_text("x: 1\n")
    assert is_run_folder(run.root) and not is_run_folder(sweep)
    assert list(iter_run_dirs(sweep)) == [run.root]
    SweepPaths(sweep).ledger.write_text("")
    assert "holds other runs" in run_dir_problem(sweep, tmp_path)
    assert "inside the run folder" in run_dir_problem(run.root / "nested", tmp_path)
    assert run_dir_problem(sweep / "new", tmp_path) is None
