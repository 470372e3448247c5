"""training_stats.json: the per-step training record (like the seed run's) and a
summary, rebuilt from metrics.jsonl so a resumed run has one continuous history; and
the rules every reader of metrics.jsonl applies (status, report, training_stats.json).

The rules (`read_metrics`): a line's step is an integer in [0, trainer.max_steps] of the
run's config.yaml (>= 0 when the config is unreadable), else the line is skipped; every
other value is a finite number, and train/reward_mean lies within what the run's reward
sources can give (each source scores in [0, 1], weighted by trainer.reward_weights: [0, 2]
for the default correctness + format), else that value is left out (unknown). One
warning line per file says how many lines were touched and the first problem.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from finellama_rl.config import Config
from finellama_rl.results import RunPaths
from finellama_rl.fileio import Check, atomic_write_json, config_value, is_finite, number_or_none, read_jsonl

REWARD_KEY = "train/reward_mean"
SLACK = 1e-6  # float sums of weights


@dataclass(frozen=True)
class MetricLimits:
    """What a metrics line of one run may hold: steps up to max_steps, the reward range."""

    max_steps: Optional[int] = None
    reward: Optional[Tuple[float, float]] = None

    @classmethod
    def of_config_data(cls, data: Dict[str, Any]) -> "MetricLimits":
        """From a config.yaml read as plain data (fileio.read_run_config_data); unknown parts stay None."""
        max_steps = config_value(data, "trainer.max_steps")
        ok = isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0
        return cls(max_steps if ok else None, reward_range(config_value(data, "trainer.rewards"),
                                                           config_value(data, "trainer.reward_weights")))


def reward_range(rewards: Any, weights: Any) -> Optional[Tuple[float, float]]:
    """[lo, hi] of the weighted sum of reward sources that each score in [0, 1] (rule
    rewards, a reward model's probability, a judge's verdict); None when unknown."""
    if not isinstance(rewards, list) or not rewards:
        return None
    if weights is None:
        weights = [1.0] * len(rewards)
    if not isinstance(weights, list) or len(weights) != len(rewards) or not all(is_finite(w) for w in weights):
        return None
    return sum(min(0.0, w) for w in weights) - SLACK, sum(max(0.0, w) for w in weights) + SLACK


def metrics_check(limits: MetricLimits) -> Check:
    """read_jsonl's check for metrics.jsonl under `limits` (the rules in the module docstring)."""
    def check(record: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        step = record["step"]
        if step < 0 or (limits.max_steps is not None and step > limits.max_steps):
            bound = f"[0, {limits.max_steps}]" if limits.max_steps is not None else ">= 0"
            return None, f"step {step} is outside {bound}"
        dropped = [k for k, v in record.items() if k != "step" and not is_finite(v)]
        reward = record.get(REWARD_KEY)
        if limits.reward and is_finite(reward) and not limits.reward[0] <= reward <= limits.reward[1]:
            dropped.append(REWARD_KEY)
        if not dropped:
            return record, None
        first = dropped[0]
        why = (f"{first} {record[first]!r} is outside [{limits.reward[0] + SLACK:g}, {limits.reward[1] - SLACK:g}]"
               if first == REWARD_KEY and is_finite(record[first]) else f"{first} {record[first]!r} is not a finite number")
        return {k: v for k, v in record.items() if k not in dropped}, why

    return check


def read_metrics(paths: RunPaths, limits: MetricLimits = MetricLimits(), quiet: bool = False) -> List[Dict[str, Any]]:
    """metrics.jsonl under the rules above."""
    return read_jsonl(paths.metrics, require={"step": int}, quiet=quiet, check=metrics_check(limits))

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
