"""Fit memory: keyed by every memory setting, never written by fault-injected runs,
steps back up after clean runs, shown by plan, cleared by one command, per user."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from finellama_rl.ladder import fitmem
from finellama_rl.compose import load_config
from finellama_rl.ladder.rungs import Rung
from finellama_rl.login.planner import choose_start_rung
from finellama_rl.ladder.run_ladder import ladder_for

GPU = ["model=qwen2.5-3b", "trainer=grpo", "hardware=a100_80"]


@pytest.fixture(autouse=True)
def memory_file(tmp_path, monkeypatch):
    path = tmp_path / "state" / "fit_memory.json"
    monkeypatch.setenv("FINELLAMA_FIT_MEMORY", str(path))
    return path


def cfg_of(*overrides):
    return load_config([*GPU, *overrides], resolve_paths=False)


@pytest.mark.parametrize("change", [
    "hardware.slurm.mem_gb=16", "hardware.gpu_mem_gb=40", "hardware.gpus_per_node=2", "trainer.max_completion_tokens=128",
    "trainer.max_prompt_tokens=128", "trainer.micro_batch=2", "trainer.prompts_per_step=16", "model=qwen2.5-7b",
    "trainer=ppo", "trainer.quantization.enabled=false", "trainer.lora.r=64", "trainer.activation_checkpointing=true",
])
def test_key_changes_with_every_memory_setting(change):
    assert fitmem.fit_key(cfg_of()) != fitmem.fit_key(cfg_of(change))


@pytest.mark.parametrize("same", ["trainer.learning_rate=3e-4", "trainer.seed=7", "eval.num_examples=all", "run.name=x"])
def test_key_ignores_what_does_not_change_memory(same):
    assert fitmem.fit_key(cfg_of()) == fitmem.fit_key(cfg_of(same))


def test_fault_injected_runs_never_write(memory_file):
    for debug in ("debug.oom_above_tokens=100", "debug.host_mem_mb_per_sequence=500", "debug.crash_after_step=50"):
        cfg = cfg_of(debug)
        assert fitmem.remember_fit(cfg, ladder_for(cfg)[1]) is False
    assert not memory_file.exists()
    cfg = cfg_of()
    assert fitmem.remember_fit(cfg, ladder_for(cfg)[1]) is True and memory_file.exists()


def test_steps_back_up_after_clean_runs():
    cfg = cfg_of("ladder.use_planner=false")
    ladder = ladder_for(cfg)
    fitmem.remember_fit(cfg, ladder[2], clean=False)  # ran out of memory at 0 and 1, worked at 2
    assert choose_start_rung(cfg) == (2, "fit memory")
    fitmem.remember_fit(cfg, ladder[2], clean=True)
    assert choose_start_rung(cfg)[0] == 2
    fitmem.remember_fit(cfg, ladder[2], clean=True)  # a second clean run at 2: next time try 1
    rung, why = choose_start_rung(cfg)
    assert rung == 1 and "trying rung 1" in why
    fitmem.remember_fit(cfg, ladder[2], clean=False)  # the probe at 1 ran out of memory: back to 2
    assert choose_start_rung(cfg) == (2, "fit memory")
    fitmem.remember_fit(cfg, ladder[2], clean=True)
    fitmem.remember_fit(cfg, ladder[2], clean=True)
    fitmem.remember_fit(cfg, ladder[1], clean=True)  # the probe at 1 worked
    assert choose_start_rung(cfg) == (1, "fit memory")


def test_plan_shows_it_and_one_command_clears_it(memory_file, tmp_path):
    cfg = cfg_of()
    fitmem.remember_fit(cfg, ladder_for(cfg)[3], clean=True)
    env = {**os.environ, "FINELLAMA_FIT_MEMORY": str(memory_file)}
    plan = subprocess.run([sys.executable, "-m", "finellama_rl.plan", *GPU], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "fit memory: rung 3 worked (1 clean run(s)" in plan.stdout and "launch starts at rung 3" in plan.stdout
    show = subprocess.run([sys.executable, "-m", "finellama_rl.fitmem"], capture_output=True, text=True, env=env, cwd=REPO)
    assert f"fit memory: {memory_file} (1 entry)" in show.stdout and fitmem.fit_key(cfg) in show.stdout
    clear = subprocess.run([sys.executable, "-m", "finellama_rl.fitmem", "--clear"], capture_output=True, text=True,
                           env=env, cwd=REPO)
    assert clear.returncode == 0 and "forgot 1 fit memory entry" in clear.stdout and not memory_file.exists()
    assert choose_start_rung(cfg)[1].startswith("planner")


def test_clear_one_setting(memory_file):
    a, b = cfg_of(), cfg_of("trainer.micro_batch=2")
    fitmem.remember_fit(a, ladder_for(a)[1])
    fitmem.remember_fit(b, ladder_for(b)[1])
    assert fitmem.forget(b) == 1
    assert list(json.loads(memory_file.read_text())) == [fitmem.fit_key(a)]


def test_per_user_location_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("FINELLAMA_FIT_MEMORY")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "shared_hf"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert fitmem.fit_memory_path() == Path.home() / ".local" / "state" / "finellama_rl" / "fit_memory.json"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert fitmem.fit_memory_path() == tmp_path / "state" / "finellama_rl" / "fit_memory.json"


def test_damaged_memory_is_ignored_with_a_warning(memory_file, capsys):
    memory_file.parent.mkdir(parents=True)
    memory_file.write_bytes(b"\xff{not json")
    cfg = cfg_of("ladder.use_planner=false")
    assert choose_start_rung(cfg) == (0, "start")
    assert "fit memory" in capsys.readouterr().err
    fitmem.remember_fit(cfg, Rung(1, ladder_for(cfg)[1].setting, False, ""))
    assert fitmem.remembered_rung(cfg, ladder_for(cfg)) == 1
