"""finellama_rl.index: concurrent writers lose no entry; a damaged index (truncated,
wrong schema) is detected, moved aside and rebuilt from the run folders."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import pytest

from finellama_rl import index
from finellama_rl.results import atomic_write_json, atomic_write_text

WRITERS, ENTRIES_PER_WRITER = 8, 5


def eval_doc(run: str, step: int, strict: float, lenient: float, n: int = 20, sweep: str = "sw") -> dict:
    """A minimal eval_results.json (schema v1) document."""
    return {"schema_version": 1, "run": run, "sweep": sweep, "run_dir": f"/x/{sweep}/{run}", "model": "tiny",
            "model_source": "tiny", "trainer": "grpo", "hardware": "cpu", "data": "arithmetic", "step": step,
            "date": f"2026-01-01T00:00:{step % 60:02d}", "accuracy": {"strict": strict, "lenient": lenient},
            "correct": {"strict": round(strict * n), "lenient": round(lenient * n)}, "total": n,
            "protocol": {"decoding": "greedy", "shots": 0, "max_new_tokens": 16}, "baseline": None, "records": []}


def write_run(root: Path, sweep: str, run: str, docs: dict) -> Path:
    """A run folder with config.yaml (enough for the scan) and the given eval files."""
    folder = root / sweep / run
    atomic_write_text(folder / "config.yaml", "# test fixture\n")
    for rel, doc in docs.items():
        atomic_write_json(folder / rel, doc)
    return folder


def _writer(root: str, worker: int, barrier) -> None:
    """One concurrent job: writes its eval files and adds each to the index."""
    barrier.wait()
    for j in range(ENTRIES_PER_WRITER):
        run = f"run{worker}"
        doc = eval_doc(run, step=j + 1, strict=worker / 100 + j / 1000, lenient=0.5)
        path = Path(root) / "sw" / run / "evals" / f"step_{j + 1:06d}-n20-greedy.json"
        atomic_write_text(path.parent.parent / "config.yaml", "# test fixture\n")
        atomic_write_json(path, doc)
        index.add_entry(Path(root), doc, path)


def test_concurrent_writers_lose_no_entry(tmp_path):
    ctx = mp.get_context("spawn")  # no fork of a pytest process that may hold torch threads
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    entries = index.read_index(tmp_path / "eval_results.json")
    assert len(entries) == WRITERS * ENTRIES_PER_WRITER
    got = {(e["run"], e["step"]): e for e in entries}
    for w in range(WRITERS):
        for j in range(ENTRIES_PER_WRITER):
            e = got[(f"run{w}", j + 1)]
            assert e["accuracy"]["strict"] == pytest.approx(w / 100 + j / 1000)
            assert e["path"] == f"sw/run{w}/evals/step_{j + 1:06d}-n20-greedy.json"
            assert e["checkpoint"] == f"step_{j + 1:06d}" and e["n"] == 20
    assert not list(tmp_path.glob("eval_results.json.damaged-*"))


def fixture_tree(root: Path) -> None:
    write_run(root, "sw", "grpo-a", {"eval_baseline.json": eval_doc("grpo-a", 0, 0.1, 0.3),
                                     "evals/step_000002.json": eval_doc("grpo-a", 2, 0.2, 0.4),
                                     "eval_results.json": eval_doc("grpo-a", 4, 0.5, 0.6)})
    write_run(root, "sw", "ppo-b", {"eval_results.json": eval_doc("ppo-b", 4, 0.25, 0.75),
                                    "evals/step_000004-n50-greedy.json": {**eval_doc("ppo-b", 4, 0.3, 0.7, n=50), "checkpoint": "step_000004"}})
    atomic_write_text(root / "sw" / "ppo-b" / "evals" / "half.json", '{"accuracy": ')  # a torn eval file: skipped


EXPECTED = {("grpo-a", "base", 0.1, 0.3, 20), ("grpo-a", "step_000002", 0.2, 0.4, 20), ("grpo-a", "step_000004", 0.5, 0.6, 20),
            ("ppo-b", "step_000004", 0.25, 0.75, 20), ("ppo-b", "step_000004", 0.3, 0.7, 50)}


def as_set(entries):
    return {(e["run"], e["checkpoint"], e["accuracy"]["strict"], e["accuracy"]["lenient"], e["n"]) for e in entries}


@pytest.mark.parametrize("damage", ["truncated", "wrong_schema", "not_a_list", "entry_missing_keys"])
def test_damaged_index_is_detected_and_rebuilt(tmp_path, caplog, damage):
    fixture_tree(tmp_path)
    entries = index.rebuild(tmp_path)
    assert as_set(entries) == EXPECTED
    path = tmp_path / "eval_results.json"
    good = path.read_text()
    damaged = {
        "truncated": good[: len(good) // 2],
        "wrong_schema": json.dumps({**json.loads(good), "schema_version": 99}),
        "not_a_list": json.dumps({**json.loads(good), "entries": {"a": 1}}),
        "entry_missing_keys": json.dumps({**json.loads(good), "entries": [{"run": "x"}]}),
    }[damage]
    path.write_text(damaged)
    with pytest.raises(index.IndexDamaged):
        index.read_index(path)

    new_doc = eval_doc("ppo-b", 6, 0.9, 0.95)
    new_path = tmp_path / "sw" / "ppo-b" / "evals" / "step_000006-n20-greedy.json"
    atomic_write_json(new_path, new_doc)
    with caplog.at_level(logging.WARNING, logger="finellama_rl.index"):
        index.add_entry(tmp_path, new_doc, new_path)
    assert any("is damaged" in r.getMessage() and "rebuilt 6 entries" in r.getMessage() for r in caplog.records)
    assert as_set(index.read_index(path)) == EXPECTED | {("ppo-b", "step_000006", 0.9, 0.95, 20)}
    aside = list(tmp_path.glob("eval_results.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == damaged  # kept as evidence, never deleted


def test_missing_index_is_built_from_the_run_folders_and_adds_replace(tmp_path):
    fixture_tree(tmp_path)
    doc = eval_doc("grpo-a", 4, 0.55, 0.65)
    path = tmp_path / "sw" / "grpo-a" / "eval_results.json"
    atomic_write_json(path, doc)
    index.add_entry(tmp_path, doc, path)
    index.add_entry(tmp_path, doc, path)  # the same file twice: one entry
    got = as_set(index.read_index(tmp_path / "eval_results.json"))
    assert got == (EXPECTED - {("grpo-a", "step_000004", 0.5, 0.6, 20)}) | {("grpo-a", "step_000004", 0.55, 0.65, 20)}


def test_add_eval_file_never_raises(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="finellama_rl.index"):
        assert index.add_eval_file(tmp_path, tmp_path / "missing.json") is None
    assert "could not add" in caplog.text
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"run": "r"}))
    with pytest.raises(ValueError, match="not an eval document"):
        index.add_entry(tmp_path, {"run": "r"}, bad)


def test_results_root_follows_the_run_folder(tmp_path):
    from finellama_rl.config import RunConfig

    moved = tmp_path / "elsewhere" / "sw" / "grpo-a"
    assert index.results_root(RunConfig(results_dir="results", sweep="sw", name="grpo-a", dir=str(moved))) == tmp_path / "elsewhere"
    assert index.results_root(RunConfig(results_dir=str(tmp_path / "r"), sweep="sw", name="x", dir="/tmp/x")) == tmp_path / "r"


def test_entry_paths_outside_the_root_are_absolute(tmp_path):
    doc = eval_doc("r", 1, 0.5, 0.5)
    outside = tmp_path / "other" / "e.json"
    entry = index.entry_from_document(doc, outside, tmp_path / "root")
    assert entry["path"] == str(outside.resolve())
    assert entry["protocol"]["decoding"] == "greedy" and entry["pass_at_k"] is None
