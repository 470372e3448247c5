"""The OOM ladder inside a real run: a simulated memory budget (a real
torch.OutOfMemoryError from the model's forward) makes the run step down, finish,
and train every step exactly once; attempts.jsonl and the fit memory record it. An
OOM injected mid-run in generation steps the generation batch, one in training the
micro batch; the failing step is retried from the host snapshot of the step before
(no checkpoint exists yet), on the same prompts, with the same completions (keyed
sampling), and no step is trained twice: the run ends with the uninterrupted run's weights."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from finellama_rl.ladder.fitmem import fit_key, remembered_rung
from finellama_rl.ladder.run_ladder import ladder_for
from finellama_rl.login.planner import choose_start_rung
from finellama_rl.fileio import read_jsonl
from finellama_rl.trainers.run import run_training
from finellama_rl.errors import EXIT_LADDER_EXHAUSTED

SMALL = ["experiment=smoke", "eval.protocol=finellama", "eval.num_examples=4", "eval.max_new_tokens=8",
         "trainer.max_prompt_tokens=96", "trainer.max_completion_tokens=8"]


@pytest.fixture(autouse=True)
def private_fit_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("FINELLAMA_FIT_MEMORY", str(tmp_path / "fit_memory.json"))


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_simulated_oom_steps_down_and_trains_each_step_once(algo, make_config, tmp_path):
    # micro batch 4 x (prompt <= 96 + completion 8) tokens > 120 and 2 x ... > 120: two OOMs, then micro batch 1.
    batch = ["trainer.prompts_per_step=2", "trainer.num_generations=4"] if algo == "grpo" else []  # 8 sequences
    cfg = make_config(*SMALL, f"trainer={algo}", *batch, "trainer.max_steps=4", "trainer.save_every=2",
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
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("hardware"))
    col = re.split(r"\s{2,}", header).index("planned rung")
    rung = {hw: int(re.split(r"\s{2,}", ln)[col]) for hw, ln in lines.items()}
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


# ------------------------------------------------- mid-run OOMs: phase, knob, no step redone

# 16 completion tokens: the random model writes a digit in about one 16-token completion of four, so
# PPO's 12 completions all miss the digits reward (no gradient) about once in 50 seeds (once in 7 at 8 tokens)
MID = ["experiment=smoke", "eval.protocol=finellama", "eval.num_examples=2", "eval.max_new_tokens=4",
       "eval.before_training=false", "trainer.max_completion_tokens=16", "trainer.max_steps=3", "trainer.save_every=100",
       "trainer.rewards=[digits]", "trainer.learning_rate=3e-3", "trainer.micro_batch=2", "ladder.remember_fit=false"]
MID_ALGO = {"ppo": ["trainer=ppo", "trainer.prompts_per_step=4"],
            "grpo": ["trainer=grpo", "trainer.prompts_per_step=2", "trainer.num_generations=4"]}


def _recording_run(cfg, monkeypatch):
    """run_training that records, per attempt and global step, the (question, completion)
    pairs its first reward source saw."""
    import finellama_rl.job.faults as faults
    from finellama_rl.rewards import sources

    trackers, seen = [], []
    install, build = faults.install_fault_injection, sources.build_reward_sources

    def tracked(*a, **kw):
        trackers.append(install(*a, **kw))
        return trackers[-1]

    def recording(*a, **kw):
        def wrap(f, first):
            def g(completions, **cols):
                if first:
                    seen.append((len(trackers), trackers[-1].step, sorted(zip(cols["question"], completions))))
                return f(completions=completions, **cols)
            g.__name__ = f.__name__
            return g
        return [wrap(f, i == 0) for i, f in enumerate(build(*a, **kw))]

    monkeypatch.setattr(faults, "install_fault_injection", tracked)
    monkeypatch.setattr(sources, "build_reward_sources", recording)
    assert run_training(cfg) == 0
    by_step = {}
    for attempt, step, questions in seen:  # the last attempt that computed a step is the one that trained it
        by_step.setdefault(step, {}).setdefault(attempt, []).extend(questions)
    return {step: sorted(v[max(v)]) for step, v in by_step.items()}


def _adapter(run):
    from safetensors.torch import load_file

    from finellama_rl.checkpoint import latest_checkpoint

    return load_file(str(latest_checkpoint(run / "checkpoints") / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_oom_mid_run_steps_the_phase_knob_and_redoes_no_step(algo, make_config, tmp_path, monkeypatch):
    import torch

    straight = tmp_path / "straight"
    data = _recording_run(make_config(*MID, *MID_ALGO[algo], run_dir=str(straight)), monkeypatch)
    assert sorted(data) == [1, 2, 3]
    for phase, knob in (("generation", "generation_batch"), ("training", "micro_batch")):
        run = tmp_path / phase
        cfg = make_config(*MID, *MID_ALGO[algo], "debug.oom_at_step=2", f"debug.oom_phase={phase}", run_dir=str(run))
        got = _recording_run(cfg, monkeypatch)
        attempts = read_jsonl(run / "attempts.jsonl")
        assert [(a["outcome"], a.get("phase")) for a in attempts] == [("oom", phase), ("completed", None)], attempts
        first, second = attempts
        other = "micro_batch" if knob == "generation_batch" else "generation_batch"
        assert second[knob] == first[knob] // 2 and second[other] == first[other], (phase, attempts)
        assert first["steps_done"] == 1 and second["steps_done"] == 2  # step 2 retried once, step 1 not redone
        assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
        assert not (run / "metrics_discarded.jsonl").exists()
        assert got == data, f"{phase}: the steps saw other prompts or completions than the uninterrupted run"
        a, b = _adapter(run), _adapter(straight)  # same samples, same gradients: the weights of a run never interrupted
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (phase, name)
        assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)


def test_a_generation_oom_at_step_3_samples_what_a_clean_run_samples(make_config, tmp_path, monkeypatch):
    """PPO, 4 steps: a generation-phase OOM at step 3 halves the generation batch and retries
    step 3; every step samples the completions of the clean run at the same seed (before
    keyed sampling, none of steps 3 and 4's completions were the same)."""
    args = [*MID, *MID_ALGO["ppo"], "trainer.max_steps=4", "debug.eos_logit_bias=2"]
    clean = _recording_run(make_config(*args, run_dir=str(tmp_path / "clean")), monkeypatch)
    oom = _recording_run(make_config(*args, "debug.oom_at_step=3", "debug.oom_phase=generation",
                                     run_dir=str(tmp_path / "oom")), monkeypatch)
    attempts = read_jsonl(tmp_path / "oom" / "attempts.jsonl")
    assert [(a["outcome"], a.get("phase"), a["generation_batch"]) for a in attempts] == [
        ("oom", "generation", 4), ("completed", None, 2)]
    assert sorted(clean) == [1, 2, 3, 4] and len({c for pairs in clean.values() for _, c in pairs}) > 4
    assert oom == clean


def test_generation_budget_steps_the_generation_batch(make_config, tmp_path):
    """debug.oom_generation_above_sequences: a generation forward of more sequences fails."""
    cfg = make_config(*MID, *MID_ALGO["ppo"], "trainer.max_steps=1", "debug.oom_generation_above_sequences=2")
    assert run_training(cfg) == 0
    attempts = read_jsonl(tmp_path / "run" / "attempts.jsonl")
    assert [(a["outcome"], a.get("phase"), a["generation_batch"], a["micro_batch"]) for a in attempts] == [
        ("oom", "generation", 4, 2), ("completed", None, 2, 2)]
