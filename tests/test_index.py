"""finellama_rl.index: concurrent writers lose no entry; a damaged index (truncated,
wrong schema) is detected, moved aside and rebuilt from the run folders."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import pytest

from finellama_rl import index
from finellama_rl.eval import results_index
from finellama_rl.fileio import atomic_write_json, atomic_write_text

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
        results_index.add_entry(Path(root), doc, path)


def test_concurrent_writers_lose_no_entry(tmp_path):
    ctx = mp.get_context("spawn")  # no fork of a pytest process that may hold torch threads
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    entries = results_index.read_index(tmp_path / "eval_results.json")
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
    entries = results_index.rebuild(tmp_path)
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
    with pytest.raises(results_index.IndexDamaged):
        results_index.read_index(path)

    new_doc = eval_doc("ppo-b", 6, 0.9, 0.95)
    new_path = tmp_path / "sw" / "ppo-b" / "evals" / "step_000006-n20-greedy.json"
    atomic_write_json(new_path, new_doc)
    with caplog.at_level(logging.WARNING, logger="finellama_rl.eval.results_index"):
        results_index.add_entry(tmp_path, new_doc, new_path)
    assert any("is damaged" in r.getMessage() and "rebuilt 6 entries" in r.getMessage() for r in caplog.records)
    assert as_set(results_index.read_index(path)) == EXPECTED | {("ppo-b", "step_000006", 0.9, 0.95, 20)}
    aside = list(tmp_path.glob("eval_results.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == damaged  # kept as evidence, never deleted


def test_missing_index_is_built_from_the_run_folders_and_adds_replace(tmp_path):
    fixture_tree(tmp_path)
    doc = eval_doc("grpo-a", 4, 0.55, 0.65)
    path = tmp_path / "sw" / "grpo-a" / "eval_results.json"
    atomic_write_json(path, doc)
    results_index.add_entry(tmp_path, doc, path)
    results_index.add_entry(tmp_path, doc, path)  # the same file twice: one entry
    got = as_set(results_index.read_index(tmp_path / "eval_results.json"))
    assert got == (EXPECTED - {("grpo-a", "step_000004", 0.5, 0.6, 20)}) | {("grpo-a", "step_000004", 0.55, 0.65, 20)}


def test_add_eval_file_never_raises(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="finellama_rl.eval.results_index"):
        assert results_index.add_eval_file(tmp_path, tmp_path / "missing.json") is None
    assert "could not add" in caplog.text
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"run": "r"}))
    with pytest.raises(ValueError, match="not an eval document"):
        results_index.add_entry(tmp_path, {"run": "r"}, bad)


def test_results_root_follows_the_run_folder(tmp_path):
    from finellama_rl.config import RunConfig

    moved = tmp_path / "elsewhere" / "sw" / "grpo-a"
    assert results_index.results_root(RunConfig(results_dir="results", sweep="sw", name="grpo-a", dir=str(moved))) == tmp_path / "elsewhere"
    assert results_index.results_root(RunConfig(results_dir=str(tmp_path / "r"), sweep="sw", name="x", dir="/tmp/x")) == tmp_path / "r"


def test_entry_paths_outside_the_root_are_absolute(tmp_path):
    doc = eval_doc("r", 1, 0.5, 0.5)
    outside = tmp_path / "other" / "e.json"
    entry = results_index.entry_from_document(doc, outside, tmp_path / "root")
    assert entry["path"] == str(outside.resolve())
    assert entry["protocol"]["decoding"] == "greedy" and entry["pass_at_k"] is None


# ------------------------------------------------------------------ schema 2 and schema-1 files

V1_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "eval_results_v1.json"


def eval_doc_v2(run: str, step: int, correct: dict, n: int, protocol: str = "qwen_boxed", primary: str = "math_verify") -> dict:
    """A schema-2 eval document as eval/core.py writes it (records left out)."""
    from finellama_rl.eval.statistics import wilson_interval

    return {"schema_version": 2, "run": run, "sweep": "sw", "model": "tiny", "trainer": "grpo", "hardware": "cpu",
            "data": "arithmetic", "step": step, "date": "2026-11-30T00:00:00", "primary": primary,
            "protocol": {"name": protocol, "primary": primary, "shots": 0, "system_prompt": "You are a helpful assistant.",
                         "num_examples": "all", "chat_template_sha256": "ab" * 32,
                         "decoding": {"decoding": "greedy", "max_new_tokens": 1024}},
            "accuracy": {k: v / n for k, v in correct.items()}, "correct": correct, "total": n,
            "ci95": {k: list(wilson_interval(v, n)) for k, v in correct.items()}, "records": []}


def test_entries_of_schema_2_documents_carry_protocol_and_intervals(tmp_path):
    doc = eval_doc_v2("r", 3, {"math_verify": 40, "strict": 10, "lenient": 30}, 50)
    e = results_index.entry_from_document(doc, tmp_path / "sw" / "r" / "eval_results.json", tmp_path)
    assert (e["primary"], e["schema_version"], e["n"], e["checkpoint"]) == ("math_verify", 2, 50, "step_000003")
    assert e["accuracy"] == {"math_verify": 0.8, "strict": 0.2, "lenient": 0.6}
    assert e["ci95"]["math_verify"] == pytest.approx([0.6696, 0.8876], abs=1e-4)  # Wilson 40/50
    p = e["protocol"]
    assert (p["name"], p["primary"], p["system_prompt"], p["max_new_tokens"], p["decoding"]) == (
        "qwen_boxed", "math_verify", "You are a helpful assistant.", 1024, "greedy")
    bad = {**doc, "primary": "lm_eval_strict"}
    with pytest.raises(ValueError, match="accuracy.lm_eval_strict"):
        results_index.entry_from_document(bad, tmp_path / "x.json", tmp_path)


def test_schema_1_eval_file_is_read_as_finellama_strict(tmp_path):
    doc = json.loads(V1_FIXTURE.read_text())
    e = results_index.entry_from_document(doc, tmp_path / "seed" / "run" / "eval_results.json", tmp_path)
    assert (e["schema_version"], e["primary"], e["protocol"]["name"], e["n"]) == (1, "strict", "finellama", 6)
    assert e["accuracy"] == {"strict": pytest.approx(2 / 6), "lenient": pytest.approx(4 / 6)}
    assert e["correct"] == {"strict": 2, "lenient": 4}
    assert e["ci95"]["strict"] == pytest.approx([0.0968, 0.7000], abs=1e-4)  # Wilson 2/6, computed from correct/total
    assert e["protocol"]["system_prompt"].startswith("Solve the math problem")


def test_schema_1_index_is_rebuilt_quietly(tmp_path, caplog):
    fixture_tree(tmp_path)
    write_run(tmp_path, "sw", "qwen", {"eval_results.json": eval_doc_v2("qwen", 5, {"math_verify": 7, "strict": 1}, 10)})
    old = {"schema_version": 1, "kind": results_index.INDEX_KIND, "updated": "2026-11-20T00:00:00",
           "entries": [{"run": "grpo-a", "step": 4, "accuracy": {"strict": 0.5, "lenient": 0.6}, "n": 20, "path": "x"}]}
    (tmp_path / "eval_results.json").write_text(json.dumps(old))
    with pytest.raises(results_index.IndexOutdated):
        results_index.read_index(tmp_path / "eval_results.json")
    new_doc = eval_doc_v2("qwen", 6, {"math_verify": 8, "strict": 2}, 10)
    new_path = tmp_path / "sw" / "qwen" / "evals" / "step_000006-qwen_boxed-n10-greedy.json"
    atomic_write_json(new_path, new_doc)
    with caplog.at_level(logging.INFO, logger="finellama_rl.eval.results_index"):
        results_index.add_entry(tmp_path, new_doc, new_path)
    assert not any("damaged" in r.getMessage() for r in caplog.records)
    assert any("older schema_version 1" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert len(list(tmp_path.glob("eval_results.json.outdated-*"))) == 1
    entries = results_index.read_index(tmp_path / "eval_results.json")
    assert len(entries) == len(EXPECTED) + 2 and {e["schema_version"] for e in entries} == {1, 2}
    qwen = sorted((e["step"], e["primary"], e["accuracy"]["math_verify"]) for e in entries if e["run"] == "qwen")
    assert qwen == [(5, "math_verify", 0.7), (6, "math_verify", 0.8)]


def test_index_command_prints_protocol_and_interval(tmp_path, capsys):
    write_run(tmp_path, "sw", "qwen", {"eval_results.json": eval_doc_v2("qwen", 5, {"math_verify": 7, "strict": 1}, 10)})
    assert index.main([str(tmp_path)]) == 0
    assert "sw/qwen step_000005: qwen_boxed/math_verify 70.0% [39.7, 89.2] (n=10)" in capsys.readouterr().out
