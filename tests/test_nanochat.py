"""nanochat's RL settings as experiment=nanochat_rl, and what they need: pass@k at the
evaluations of a training run (baseline, eval_every, final), not only in the evaluate
command; eval_every on the validation split, baseline and final on test."""
from __future__ import annotations

import json

import pytest

from finellama_rl.trainers.run import run_training


def test_nanochat_preset_composes_with_nanochats_values(make_config):
    cfg = make_config("experiment=nanochat_rl")
    t, ev = cfg.trainer, cfg.eval
    assert t.algo.value == "grpo" and cfg.data.source.value == "gsm8k"
    assert (t.prompts_per_step, t.num_generations, t.max_completion_tokens) == (16, 16, 256)  # 16 x 16, 256 tokens
    assert (t.temperature, t.beta, t.num_iterations, t.lr_schedule.value) == (1.0, 0.0, 1, "linear")
    assert (t.eval_every, t.save_every, t.max_steps) == (60, 60, 467)  # one epoch of 7,473 problems
    assert (ev.num_examples, ev.samples, ev.sample_temperature) == ("400", 8, 1.0)  # pass@1..8 on 400


@pytest.mark.slow
def test_training_evaluations_compute_pass_at_k(make_config, tmp_path):
    from finellama_rl.results import RunPaths

    cfg = make_config("model=tiny", "data=arithmetic", "hardware=cpu", "trainer=grpo", "eval.protocol=finellama",
                      "trainer.max_steps=2", "trainer.save_every=2", "trainer.eval_every=1", "trainer.num_generations=4",
                      "trainer.prompts_per_step=2", "trainer.micro_batch=8", "trainer.max_completion_tokens=8",
                      "trainer.lora.dropout=0", "data.num_train=32", "data.num_test=4", "eval.num_examples=4",
                      "eval.max_new_tokens=8", "eval.samples=4", "eval.sample_temperature=1.0", "tracking=tensorboard")
    assert run_training(cfg) == 0
    run = tmp_path / "run"
    for path in (run / "eval_baseline.json", run / "evals" / "step_000001.json", run / "eval_results.json"):
        passk = json.loads(path.read_text())["pass_at_k"]
        assert passk["samples"] == 4 and set(passk["strict"]) == {"1", "2", "4"}, path
        assert all(0.0 <= v <= 1.0 for v in passk["strict"].values())
    final = json.loads((run / "eval_results.json").read_text())
    assert len(final["records"][0]["samples"]) == 4  # the samples are kept per problem
    from finellama_rl.task.data import load_problems

    for path, split in ((run / "eval_baseline.json", "test"), (run / "evals" / "step_000001.json", "validation"),
                        (run / "eval_results.json", "test")):  # eval_every reads validation; baseline and final test
        doc = json.loads(path.read_text())
        expected = [p["question"] for p in load_problems(cfg.data, split)[:4]]
        assert doc["split"]["name"] == split and [r["question"] for r in doc["records"]] == expected, path
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunPaths(run).tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("eval/pass@4")) == [0, 1, 2]
