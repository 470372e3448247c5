"""Data parallel on CPU: two torchrun ranks (gloo), started the way a multi-GPU job
starts them (`python -m finellama_rl.train ... hardware.processes=2`: the training
process supervises torchrun, finellama_rl/job/distributed.py), for both algorithms.

Checked against a one-process run with the same global batch: the ranks hold identical
adapters (every checkpoint records each rank's weight digest), the run folder has one
set of files, and the per-step rewards, losses and gradient norms and the final adapter
match the one-process run. The one-process run samples in two generate calls of the
same prompts the two ranks sample (trainer.generation_batch = half the step), and
sampling is keyed per sequence (seed, step, its index in the step: job/sampling.py), so
both runs draw the same completions; what remains is float summation order.
Tolerance: 1e-3 relative on rewards, losses and gradient norms, and on the adapter each
tensor's largest difference over its largest entry (measured: 2e-6 on the curve, 2e-5 to
1.5e-4 on the adapter; entry by entry, Adam turns summation-order noise in a near-zero
gradient into 1e-2 of a tiny entry, so elementwise tolerances fail by chance). GRPO runs its default
loss (dapo, normalised by the step's completion tokens) on uneven lengths
(debug.eos_logit_bias): before issue 20 the two-call process weighed its halves by their
own token counts and differed from the two ranks by 17%.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finellama_rl.checkpoint import list_checkpoints, read_state
from finellama_rl.compose import load_config
from finellama_rl.fileio import read_jsonl
from finellama_rl.trainers.run import run_training

COMMON = ["experiment=smoke", "eval.protocol=finellama", "eval.num_examples=2", "eval.max_new_tokens=4",
          "eval.before_training=false", "trainer.max_completion_tokens=12", "trainer.max_steps=3",
          "trainer.save_every=3", "trainer.rewards=[digits]", "trainer.learning_rate=3e-3", "trainer.micro_batch=2",
          "ladder.remember_fit=false", "debug.eos_logit_bias=3"]
ALGO = {
    # global batch 8 sequences; one process samples them in two calls of 4, like the two ranks
    "ppo": (["trainer=ppo", "trainer.prompts_per_step=8"], "trainer.generation_batch=4"),
    "grpo": (["trainer=grpo", "trainer.prompts_per_step=2", "trainer.num_generations=4"], "trainer.generation_batch=4"),
}
KEYS = ("train/reward_mean", "train/loss", "train/grad_norm")


def yaml_of(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def _adapter(run: Path):
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    return ckpt, load_file(str(ckpt / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_two_ranks_match_one_process(algo, tmp_path):
    args, one_process_generation = ALGO[algo]
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = results / "two"
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", *COMMON, *args, "hardware.processes=2",
                           f"run.results_dir={results}", f"run.dir={two}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 of 2 joined the process group (gloo)" in proc.stdout + proc.stderr

    one = results / "one"
    torch.set_num_threads(1)
    assert run_training(load_config([*COMMON, *args, one_process_generation, f"run.results_dir={results}",
                                     f"run.dir={one}"])) == 0

    # one set of files: every step logged once, one eval, each checkpoint once
    a, b = read_jsonl(two / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert len(read_jsonl(two / "attempts.jsonl")) == 1
    assert json.loads((two / "eval_results.json").read_text())["step"] == 3
    assert [c.name for c in list_checkpoints(two / "checkpoints")] == ["step_000003"]
    # identical adapters on both ranks
    ckpt, adapter_two = _adapter(two)
    digests = read_state(ckpt)["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # the curve and the weights of the one-process run with the same global batch
    assert any(r["train/reward_mean"] > 0 for r in b), "the test needs rewards with variance"
    assert any(0 < r["train/frac_truncated"] < 1 for r in b), "the test needs uneven completion lengths"
    if algo == "grpo":
        assert yaml_of(one)["trainer"]["loss_type"] == "dapo"  # the default loss
    for key in KEYS:
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-3, abs=1e-6), key
    _, adapter_one = _adapter(one)
    for name, w in adapter_one.items():  # per tensor, over its largest entry: Adam's 1/sqrt(v) magnifies
        assert (adapter_two[name] - w).abs().max() <= 1e-3 * w.abs().max(), name  # summation order where a gradient is ~0
    worst = max(((adapter_two[k] - w).abs().max() / w.abs().max().clamp(min=1e-12)).item() for k, w in adapter_one.items())
    curve = max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-9) for x, y in zip(a, b) for k in KEYS)
    print(f"{algo}: 2 ranks vs 1 process: max relative difference {curve:.2e} (curve), {worst:.2e} (adapter)")
    assert any(v.abs().max() > 0 for k, v in adapter_one.items() if "lora_B" in k), "training moved the adapter"


@pytest.mark.slow
def test_an_oom_on_one_rank_steps_every_rank_down(tmp_path):
    """Rank 1 runs out of memory in training at step 2 while rank 0 waits for it in the
    gradient all-reduce: rank 1 records the attempt (phase training) and the snapshot and
    exits; the supervisor starts both ranks again at the next rung (micro batch halved on
    both), from the snapshot: no step redone."""
    results = tmp_path / "results"
    run = results / "run"
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.train", *COMMON, *ALGO["ppo"][0], "hardware.processes=2",
                           "debug.oom_at_step=2", "debug.oom_phase=training", "debug.oom_rank=1",
                           f"run.results_dir={results}", f"run.dir={run}"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    attempts = read_jsonl(run / "attempts.jsonl")
    assert [(a["outcome"], a.get("phase"), a.get("rank"), a["micro_batch"]) for a in attempts] == [
        ("oom", "training", 1, 2), ("completed", None, None, 1)], attempts
    assert "starting the 2 ranks again at the next rung" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    digests = read_state(list_checkpoints(run / "checkpoints")[-1])["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
