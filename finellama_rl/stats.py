"""training_stats.json: the per-step training record (like the seed run's) and a
summary, rebuilt from metrics.jsonl so a resumed run has one continuous history.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List

from finellama_rl.config import Config
from finellama_rl.results import RunPaths
from finellama_rl.fileio import atomic_write_json, number_or_none, read_jsonl

STEP_KEYS = {
    "reward_mean": "train/reward_mean",
    "reward_std": "train/reward_std",
    "loss": "train/loss",
    "policy_loss": "train/policy_loss",
    "value_loss": "train/value_loss",
    "kl": "train/kl",
    "learning_rate": "train/learning_rate",
    "seconds_per_step": "perf/sec_per_step",
    "tokens_per_second": "perf/tokens_per_sec",
}


def dedupe_steps(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Keep the last record of each step (a step redone after a crash replaces the lost one)."""
    by_step = {int(r["step"]): r for r in records if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def summarize(steps: List[Dict[str, Any]], wall_time_s: float) -> Dict[str, Any]:
    rewards = [s["reward_mean"] for s in steps if s.get("reward_mean") is not None]
    tail = rewards[-max(1, len(rewards) // 10):] if rewards else []
    sps = [s["seconds_per_step"] for s in steps if s.get("seconds_per_step") is not None]
    return {
        "logged_steps": len(steps),
        "last_step": steps[-1]["step"] if steps else 0,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "reward_mean_last_10pct": statistics.fmean(tail) if tail else None,
        "seconds_per_step_mean": statistics.fmean(sps) if sps else None,
        "wall_time_s_this_attempt": wall_time_s,
    }


def write_training_stats(paths: RunPaths, cfg: Config, wall_time_s: float) -> Dict[str, Any]:
    steps = []
    for r in dedupe_steps(read_jsonl(paths.metrics, require={"step": int})):
        steps.append({"step": r["step"], **{name: number_or_none(r.get(key)) for name, key in STEP_KEYS.items()}})
    doc = {"run": cfg.run.name, "trainer": cfg.trainer.algo.value, "model": cfg.model.name,
           "hardware": cfg.hardware.name, "steps": steps, "summary": summarize(steps, wall_time_s)}
    atomic_write_json(paths.training_stats, doc)
    return doc
