"""Experiment tracking (the top-level `tracking` setting): TensorBoard event files that
read back, with the tensorboard package, to the very values in metrics.jsonl, for SFT,
GRPO and PPO; nothing at all with tracking=none; W&B offline when it is installed."""
from __future__ import annotations

import importlib.util

import pytest

from finellama_rl.fileio import read_jsonl
from finellama_rl.trainers.run import run_training

TINY = ["model=tiny", "data=arithmetic", "hardware=cpu", "eval.protocol=finellama", "eval.num_examples=4",
        "eval.max_new_tokens=8", "data.num_train=64", "data.num_test=8", "trainer.max_steps=3", "trainer.warmup_steps=0", "trainer.save_every=3",
        "trainer.max_completion_tokens=8", "trainer.prompts_per_step=4", "trainer.micro_batch=4"]
TRAINERS = {
    "grpo": ["trainer=grpo", "trainer.num_generations=4", "trainer.micro_batch=8", "trainer.lora.dropout=0"],
    "ppo": ["trainer=ppo", "trainer.num_generations=1", "trainer.lora.dropout=0"],
    "sft": ["trainer=sft", "trainer.num_generations=1"],
}


def read_scalars(folder):
    """{tag: {step: value}} from the event files in `folder`, read by the tensorboard package."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tracking_none_opens_nothing(make_config, tmp_path):
    from finellama_rl.job.tracking import open_tracker

    cfg = make_config(*TINY, *TRAINERS["grpo"])
    assert cfg.tracking.value == "none"  # the default
    assert open_tracker(cfg, tmp_path / "run", 0) is None
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tracking_names_the_missing_package(make_config, monkeypatch):
    from finellama_rl.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        make_config(*TINY, *TRAINERS["grpo"], "tracking=wandb")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo", "sft"])
def test_tensorboard_events_hold_the_metrics_jsonl_values(algo, make_config, tmp_path):
    cfg = make_config(*TINY, *TRAINERS[algo], "tracking=tensorboard")
    assert run_training(cfg) == 0
    run = tmp_path / "run"
    scalars = read_scalars(run / "tensorboard")
    metrics = read_jsonl(run / "metrics.jsonl")
    key = "train/loss" if algo == "sft" else "train/reward_mean"
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert scalars[key] == {m["step"]: pytest.approx(m[key], rel=1e-6, abs=1e-7) for m in metrics}
    for m in metrics:  # every numeric field of every line, not only the headline
        for name, value in m.items():
            if name != "step":
                assert scalars[name][m["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert set(scalars["eval/accuracy"]) == {0, 3}  # baseline and final evaluations


@pytest.mark.slow
def test_tensorboard_resume_purges_lost_steps(make_config, tmp_path):
    """Steps 3-4 trained, then lost (their checkpoint gone, as after a hard kill): on resume
    from step 2 their events are purged, as metrics.jsonl's lines are, so each step is
    in the event files exactly once, with the values of the run that finished."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*TINY, *TRAINERS["grpo"], "tracking=tensorboard", "trainer.max_steps=4", "trainer.save_every=2"]
    assert run_training(make_config(*args)) == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step_000004")
    (run / "eval_results.json").unlink()
    assert run_training(make_config(*args)) == 0
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/reward_mean")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.value for e in events] == [pytest.approx(m["train/reward_mean"], rel=1e-6, abs=1e-7) for m in metrics]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is optional (pip install wandb)")
def test_wandb_offline_run_without_network(make_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is our default
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(*TINY, *TRAINERS["grpo"], "tracking=all")
    assert run_training(cfg) == 0
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert offline and any(offline[0].glob("*.wandb"))
    assert (tmp_path / "run" / "tensorboard").is_dir()
