"""The OOM ladder inside a real run: a simulated memory budget (a real
torch.OutOfMemoryError from the model's forward) makes the run step down, finish,
and train every step exactly once; attempts.jsonl and the fit memory record it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finellama_rl.fitmem import fit_key, remembered_rung
from finellama_rl.rungs import ladder_for
from finellama_rl.plan import choose_start_rung
from finellama_rl.results import read_jsonl
from finellama_rl.train import EXIT_LADDER_EXHAUSTED, run_training

SMALL = ["experiment=smoke", "eval.num_examples=4", "eval.max_new_tokens=8", "trainer.max_completion_tokens=8"]


@pytest.fixture(autouse=True)
def private_fit_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("FINELLAMA_FIT_MEMORY", str(tmp_path / "fit_memory.json"))


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_simulated_oom_steps_down_and_trains_each_step_once(algo, make_config, tmp_path):
    # micro batch 4 x (prompt <= 96 + completion 8) tokens > 120 and 2 x ... > 120: two OOMs, then micro batch 1.
    cfg = make_config(*SMALL, f"trainer={algo}", "trainer.max_steps=4", "trainer.save_every=2",
                      "debug.oom_above_tokens=120", "eval.before_training=false")
    assert run_training(cfg) == 0
    attempts = read_jsonl(tmp_path / "run" / "attempts.jsonl")
    assert [(a["rung"], a["micro_batch"], a["outcome"]) for a in attempts] == [(0, 4, "oom"), (1, 2, "oom"), (2, 1, "completed")]
    effective = cfg.trainer.micro_batch * cfg.trainer.grad_accum
    assert all(a["micro_batch"] * a["grad_accum"] == effective for a in attempts), "effective batch kept"
    assert "OutOfMemoryError: simulated out of memory" in attempts[0]["error"]
    assert attempts[-1]["steps_done"] == 4 and not any(a["changes_experiment"] for a in attempts)
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["step"] == 4
    # simulated out-of-memory says nothing about real memory: a fault-injected run never writes the fit memory
    assert remembered_rung(cfg, ladder_for(cfg)) is None and not (tmp_path / "fit_memory.json").exists()
    assert choose_start_rung(cfg) == (0, "start")


def test_ladder_exhausted_reports_every_attempt(make_config, tmp_path, capsys):
    cfg = make_config(*SMALL, "trainer.max_steps=2", "debug.oom_above_tokens=5", "eval.before_training=false")
    assert run_training(cfg) == EXIT_LADDER_EXHAUSTED
    attempts = read_jsonl(tmp_path / "run" / "attempts.jsonl")
    assert len(attempts) == len(ladder_for(cfg)) and all(a["outcome"] == "oom" for a in attempts)
    out = capsys.readouterr().out
    assert "out of memory on every rung" in out and "ladder:" in out


def test_plan_cli_table():
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.plan", "model=qwen2.5-3b", "trainer=ppo",
                           "hardware=a100_40", "trainer.prompts_per_step=64", "trainer.micro_batch=64",
                           "trainer.max_completion_tokens=256"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.split() and ln.split()[0] in ("a100_40", "a100_80", "h200")}
    assert "fits after step-down" in lines["a100_40"]
    rung = {hw: int(ln.split()[3]) for hw, ln in lines.items()}
    assert rung["a100_40"] > rung["a100_80"] > rung["h200"]  # less memory, lower rung
    for part in ("weights_4bit", "activations", "logits", "kv_cache", "value_head", "peak (training)"):
        assert part in proc.stdout


def test_planner_picks_start_rung_for_gpu_profiles():
    from finellama_rl.compose import load_config

    big = ["model=qwen2.5-3b", "trainer=ppo", "trainer.prompts_per_step=64", "trainer.micro_batch=64", "trainer.max_completion_tokens=256"]
    r40, why = choose_start_rung(load_config([*big, "hardware=a100_40"]))
    r80, _ = choose_start_rung(load_config([*big, "hardware=a100_80"]))
    assert why.startswith("planner") and r40 > r80 > 0
    assert choose_start_rung(load_config([*big, "hardware=a100_40", "ladder.use_planner=false"])) == (0, "start")
    cfg = load_config([*big, "hardware=a100_40"])
    assert fit_key(cfg).startswith("qwen2.5-3b|ppo|a100_40|")
    assert fit_key(cfg) != fit_key(load_config([*big, "hardware=a100_40", "hardware.slurm.mem_gb=8"]))
