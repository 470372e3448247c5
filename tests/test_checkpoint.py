"""Checkpoint commit/prune/latest and safe writes."""
from __future__ import annotations

import json

import pytest

from finellama_rl.checkpoint import (clear_staging, commit_checkpoint, latest_checkpoint, list_checkpoints,
                                     read_state, staging_root)
from finellama_rl.fileio import append_jsonl, atomic_write_json, read_jsonl


def _adapter_bytes(fill: int, n: int = 1000) -> bytes:
    """A real safetensors file with one uint8 tensor of n bytes (verify_checkpoint reads its header)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes([fill]) * n


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
    state = read_state(latest_checkpoint(root))
    assert {k: state[k] for k in ("step", "data_position")} == {"step": 6, "data_position": 48}
    assert state["manifest"] == {"optimizer.pt": {"bytes": 6, "sha256": state["manifest"]["optimizer.pt"]["sha256"]}}


def test_keep_last_0_keeps_every_checkpoint_and_negative_keep_last_is_refused(tmp_path):
    """trainer.keep_last=0: never prune (seed 004 kept all 25 of its checkpoints, seed 003 "unlimited")."""
    import pytest

    from finellama_rl.compose import load_config
    from finellama_rl.errors import ConfigError

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        commit_checkpoint(root, _stage(root, step), step, {}, keep_last=0)
    assert [p.name for p in list_checkpoints(root)] == ["step_000002", "step_000004", "step_000006", "step_000008"]
    commit_checkpoint(root, _stage(root, 10), 10, {}, keep_last=2)  # the same folder later pruned to 2
    assert [p.name for p in list_checkpoints(root)] == ["step_000008", "step_000010"]
    assert load_config(["experiment=smoke", "trainer.keep_last=0"]).trainer.keep_last == 0
    with pytest.raises(ConfigError) as err:
        load_config(["experiment=smoke", "trainer.keep_last=-1"])
    assert err.value.key == "trainer.keep_last"


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
    from finellama_rl.job.run_dir import rewind_metrics

    paths = RunPaths(tmp_path).make()
    for step in (1, 2, 3, 4, 5):
        append_jsonl(paths.metrics, {"step": step})
    assert rewind_metrics(paths, 4) == 1
    assert [r["step"] for r in read_jsonl(paths.metrics)] == [1, 2, 3, 4]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics_discarded.jsonl")] == [5]
    assert rewind_metrics(paths, 4) == 0


# ---------------------------------------------------------- durability and damage

import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


from finellama_rl.checkpoint import KILL_AT_ENV, step_of, verify_checkpoint  # noqa: E402

SAVER = Path(__file__).with_name("ckpt_saver.py")
REPO = Path(__file__).resolve().parent.parent


def _saver(root, last, kill_at=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(KILL_AT_ENV, None)
    if kill_at is not None:
        env[KILL_AT_ENV] = str(kill_at)
    return subprocess.run([sys.executable, str(SAVER), str(root), str(last)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _assert_complete_and_loadable(root, at_least):
    import torch
    from safetensors.torch import load_file

    from finellama_rl.job.snapshot import load_optimizer, load_rng, load_scheduler

    ckpt = latest_checkpoint(root)
    assert ckpt is not None and step_of(ckpt) >= at_least
    assert verify_checkpoint(ckpt) is None
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(step_of(ckpt))
    assert torch.equal(adapter["layer0.lora_A.weight"], torch.randn(64, 32, generator=g))
    assert load_optimizer(ckpt / "optimizer.pt")["state"][0]["step"].item() == step_of(ckpt)
    assert load_scheduler(ckpt / "scheduler.json")["last_epoch"] == step_of(ckpt)
    load_rng(ckpt / "rng_state.safetensors")
    return ckpt


@pytest.mark.slow
def test_sigkill_at_every_point_of_a_save_leaves_a_complete_checkpoint(tmp_path):
    """keep_last=1 and a re-save of every step: SIGKILL at each event of the save protocol
    of step 2 (payload files, state file, fsync, rename, prune, re-save) and at random
    moments of a saving loop; after every kill a complete checkpoint loads, and a
    restarted saver resumes from it."""
    import shutil

    sys.path.insert(0, str(SAVER.parent))
    import ckpt_saver

    root, pristine = tmp_path / "checkpoints", tmp_path / "pristine"
    assert _saver(pristine, 1).returncode == 0  # step 1 committed
    k = 0
    while True:
        k += 1
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root)
        proc = _saver(root, 2, kill_at=k)
        if proc.returncode == 0:
            break  # k is past the last event: every point was hit
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert f"SIGKILL at checkpoint event {k}" in proc.stdout
        _assert_complete_and_loadable(root, at_least=1)
        ckpt_saver.main(root, 2)  # resume works
        _assert_complete_and_loadable(root, at_least=2)
        assert list_checkpoints(root)[-1].name == "step_000002"  # (step 1 too if killed before its prune)
    assert k == 16, k  # 15 points: 3 payload files + 6 commit/prune for the save, 3 + 3 for the re-save

    rng = random.Random(0)
    for _ in range(3):  # SIGKILL from outside at random moments of a long saving loop
        proc = subprocess.Popen([sys.executable, str(SAVER), str(root), "400"],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
        time.sleep(2.0 + rng.random() * 2.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_complete_and_loadable(root, at_least=2)
    last = step_of(latest_checkpoint(root))
    ckpt_saver.main(root, last + 2)
    _assert_complete_and_loadable(root, at_least=last + 2)
    assert [c.name for c in list_checkpoints(root)] == [f"step_{last + 2:06d}"]  # keep_last=1


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        d = _stage(root, step)
        (d / "adapter_model.safetensors").write_bytes(_adapter_bytes(step))
        (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        commit_checkpoint(root, d, step, {}, keep_last=3)
    newest = root / "step_000004"
    assert latest_checkpoint(root) == newest and verify_checkpoint(newest) is None
    data = bytearray((newest / "adapter_model.safetensors").read_bytes())
    data[500] ^= 0xFF  # a flipped byte
    (newest / "adapter_model.safetensors").write_bytes(bytes(data))
    assert "SHA-256" in verify_checkpoint(newest)
    assert latest_checkpoint(root).name == "step_000002"
    (newest / "adapter_model.safetensors").write_bytes(bytes(data[:100]))  # truncated
    assert "bytes" in verify_checkpoint(newest) and latest_checkpoint(root).name == "step_000002"
    (newest / "adapter_model.safetensors").unlink()  # a missing file
    assert "missing" in verify_checkpoint(newest) and latest_checkpoint(root).name == "step_000002"
    # a re-save of the damaged step replaces it; the previous checkpoint stays until then
    d = _stage(root, 4)
    (d / "adapter_model.safetensors").write_bytes(_adapter_bytes(4))
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    commit_checkpoint(root, d, 4, {}, keep_last=1)
    assert latest_checkpoint(root).name == "step_000004" and verify_checkpoint(root / "step_000004") is None
    assert [c.name for c in list_checkpoints(root)] == ["step_000004"]


def test_resave_of_a_complete_step_keeps_it_with_keep_last_1(tmp_path):
    root = tmp_path / "checkpoints"
    commit_checkpoint(root, _stage(root, 2), 2, {"x": 1}, keep_last=1)
    before = (root / "step_000002" / "finellama_state.json").read_text()
    commit_checkpoint(root, _stage(root, 2), 2, {"x": 2}, keep_last=1)
    assert (root / "step_000002" / "finellama_state.json").read_text() == before  # never removed, never zero
    assert not any((root / ".staging").iterdir())


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_files_keep_the_users_umask(tmp_path, umask, mode):
    """safetensors writes 0600 through its own temporary file whatever the umask; a committed
    checkpoint has the permissions `open()` would give (group-readable under umask 002)."""
    import os

    import torch
    from safetensors.torch import save_file

    root = tmp_path / "checkpoints"
    old = os.umask(umask)
    try:
        staged = staging_root(root) / "checkpoint-2"
        (staged / "sub").mkdir(parents=True)
        for name in ("adapter_model.safetensors", "value_head.safetensors", "sub/rng_state.safetensors"):
            save_file({"w": torch.arange(4.0)}, str(staged / name))
        torch.save({"step": 2}, staged / "scheduler.pt")
        assert (staged / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # the library's own mode
        final = commit_checkpoint(root, staged, 2, {}, keep_last=1)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(final)): p.stat().st_mode & 0o777 for p in final.rglob("*") if p.is_file()}
    assert modes and all(m == mode for m in modes.values()), modes
    assert (final / "sub").stat().st_mode & 0o777 == mode | 0o111 & ~umask
