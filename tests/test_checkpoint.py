"""Checkpoint commit/prune/latest and safe writes."""
from __future__ import annotations

import json

from finellama_rl.checkpoint import (clear_staging, commit_checkpoint, latest_checkpoint, list_checkpoints,
                                     read_state, staging_root)
from finellama_rl.results import append_jsonl, atomic_write_json, read_jsonl


def _stage(root, step):
    d = staging_root(root) / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "optimizer.pt").write_bytes(b"x" * step)
    return d


def test_commit_prune_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        commit_checkpoint(root, _stage(root, step), step, {"data_position": step * 8}, keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_000004", "step_000006"]
    assert latest_checkpoint(root).name == "step_000006"
    assert read_state(latest_checkpoint(root)) == {"step": 6, "data_position": 48}


def test_half_written_checkpoint_is_never_listed(tmp_path):
    root = tmp_path / "checkpoints"
    commit_checkpoint(root, _stage(root, 2), 2, {}, keep_last=3)
    _stage(root, 4)  # a crash mid-save leaves only a staging folder...
    (root / "step_000006").mkdir()  # ...or a step folder without its state file
    assert latest_checkpoint(root).name == "step_000002"
    clear_staging(root)
    assert not staging_root(root).exists()


def test_atomic_json_and_torn_jsonl(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp files left
    append_jsonl(tmp_path / "m.jsonl", {"step": 1})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 2, "tr')  # a crash mid-line
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}]
    append_jsonl(tmp_path / "m.jsonl", {"step": 2})  # the redone step is not glued to the torn line
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]


def test_rewind_metrics_moves_lost_steps_aside(tmp_path):
    from finellama_rl.results import RunPaths
    from finellama_rl.train import rewind_metrics

    paths = RunPaths(tmp_path).make()
    for step in (1, 2, 3, 4, 5):
        append_jsonl(paths.metrics, {"step": step})
    assert rewind_metrics(paths, 4) == 1
    assert [r["step"] for r in read_jsonl(paths.metrics)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics_discarded.jsonl")] == [5]
    assert rewind_metrics(paths, 4) == 0
